"""Log-probabilities, echo and n on the OpenAI endpoints (docs/serve.md, "Log-probabilities, echo and n"):
every figure the server returns equals the engine's own (`Engine.score`, the prefill, the decode step), with
controls where a check could pass by accident (an off-by-one position, temperature-scaled values, choices that
all came out alike)."""
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from support.serving import running_server


@pytest.fixture(scope="module")
def server(text_engine):
    from lwm.serve import create_app

    app = create_app(text_engine["engine"], text_engine["tok"], model_name="tiny", max_batch_size=4, max_queue=8,
                     batch_wait_ms=0)
    with running_server(app) as url:
        yield dict(url=url, **text_engine)


def post(url, path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def score(engine, ids):
    return engine.score([list(ids)])[0]


def test_engine_logprobs_agree_across_prefill_step_and_score(text_engine):
    """The drawn token's logprob after insert (from the prefill), the step's (from the decode cache) and
    `score` of the whole sequence (one forward, no cache) are one number per token; the step with logprobs is
    one more compile, not one per call."""
    from lwm.inference.engine import TOP_LOGPROBS
    from lwm.inference.sampling import SamplingConfig

    engine, tok = text_engine["engine"], text_engine["tok"]
    prompt = [tok.bos_id] + tok.encode("the cat sat on the mat")
    state = engine.init_state(1, 64)
    state = engine.insert(engine.prefill(prompt), state, 0, max_new_tokens=4, sampling=SamplingConfig(), seed=0)
    first, _, lp0 = engine.drawn(state, logprobs=True)
    state, toks, emitted, lp = engine.step(state, n_steps=3, logprobs=True)
    assert emitted.all() and lp.logprob.shape == (1, 3) and lp.top_ids.shape == (1, 3, TOP_LOGPROBS)
    answer = [int(first[0])] + [int(t) for t in toks[0]]
    ref = score(engine, prompt + answer)
    got = np.concatenate([lp0.logprob[:1], lp.logprob[0]])
    np.testing.assert_allclose(got, ref.logprob[-4:], atol=2e-5)
    assert not np.allclose(got, ref.logprob[-5:-1], atol=2e-5)            # control: one position off
    # greedy: each drawn token is its position's top alternative, and the top list is sorted
    np.testing.assert_array_equal(ref.top_ids[-4:, 0], answer)
    assert (np.diff(ref.top_logprobs[-4:], axis=-1) <= 0).all()
    size = engine._step_jit._cache_size()
    state, *_ = engine.step(state, n_steps=3, logprobs=True)
    assert engine._step_jit._cache_size() == size


def test_echo_scores_a_batch_of_prompts_as_the_engine_does(server):
    """max_tokens=0 + echo + logprobs (pure scoring): the first token's entries are null, the rest equal
    `Engine.score`; the alternatives are the engine's top k; tokens concatenate to the echoed text, whose
    offsets they are. Control: the scores one position off do not match."""
    engine, tok = server["engine"], server["tok"]
    prompts = [[tok.bos_id] + tok.encode("the dog ran to the park"), [tok.bos_id] + tok.encode("a bird")]
    status, out = post(server["url"], "/v1/completions", dict(model="tiny", prompt=prompts, max_tokens=0,
                                                             echo=True, logprobs=3))
    assert status == 200, out
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert out["usage"]["prompt_tokens"] == sum(map(len, prompts)) and out["usage"]["completion_tokens"] == 0
    for ids, choice in zip(prompts, out["choices"]):
        lp, ref = choice["logprobs"], score(engine, ids)
        assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        np.testing.assert_allclose(lp["token_logprobs"][1:], ref.logprob, atol=1e-5)
        assert not np.allclose(lp["token_logprobs"][2:], ref.logprob[:-1], atol=1e-5)
        for top, want in zip(lp["top_logprobs"][1:], ref.top_logprobs[:, :3]):
            assert len(top) <= 3 and max(top.values()) == pytest.approx(float(want[0]), abs=1e-5)
            # two ids of one text (byte pieces) keep the likelier: each value is one of the engine's top 3
            assert all(np.isclose(want, v, atol=1e-5).any() for v in top.values())
        assert "".join(lp["tokens"]) == choice["text"] == tok.decode(ids)
        assert lp["text_offset"] == list(np.cumsum([0] + [len(t) for t in lp["tokens"][:-1]]))


def test_generated_logprobs_are_the_models_not_the_tempered_ones(server):
    """A sampled answer (temperature 0.5) reports each token's logprob under the model (`Engine.score` of
    prompt + answer), with echo the prompt's before it; control: the temperature-scaled values (what the
    token was drawn from) differ."""
    engine, tok = server["engine"], server["tok"]
    text = "the cat sat"
    body = dict(model="tiny", prompt=text, max_tokens=5, temperature=0.5, seed=3, logprobs=2, echo=True,
                return_token_ids=True)
    status, out = post(server["url"], "/v1/completions", body)
    assert status == 200, out
    choice, prompt = out["choices"][0], out["prompt_token_ids"]
    answer = choice["token_ids"]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(prompt) + len(answer) and choice["text"].startswith(text)
    ref = score(engine, prompt + answer)
    np.testing.assert_allclose(lp["token_logprobs"][1:], ref.logprob, atol=2e-5)
    tail = np.asarray(lp["token_logprobs"][len(prompt):])
    top = ref.top_logprobs[len(prompt) - 1:]                             # (answer, K) of the model
    # control: the values at temperature 0.5, log_softmax(logprobs / 0.5) (its normaliser over the top K only)
    tempered = tail / 0.5 - np.log(np.exp(top / 0.5).sum(-1))
    assert np.abs(tempered - tail).min() > 1e-2
    assert lp["text_offset"][len(prompt)] == len(text)


def test_a_batch_of_one_prompt_is_the_prompt(server):
    """lm-evaluation-harness's local-completions sends generate_until as a batch of one ([ids] or [text]),
    with no echo or logprobs: the answer is the plain prompt's (it was a 500). Control: plain prompts."""
    tok = server["tok"]
    body = dict(model="tiny", max_tokens=5, temperature=0.0, return_token_ids=True)
    ids = [tok.bos_id] + list(tok.encode("the bird"))
    for plain, batched in (("the bird", ["the bird"]), (ids, [ids])):
        status, want = post(server["url"], "/v1/completions", {**body, "prompt": plain})
        assert status == 200, want
        for stream in (False, True):
            if stream:
                req = urllib.request.Request(server["url"] + "/v1/completions", headers={
                    "Content-Type": "application/json"}, data=json.dumps({**body, "prompt": batched,
                                                                          "stream": True}).encode())
                with urllib.request.urlopen(req, timeout=300) as r:
                    events = [json.loads(line[6:]) for line in r.read().decode().splitlines()
                              if line.startswith("data: {")]
                assert "".join(e["choices"][0]["text"] for e in events) == want["choices"][0]["text"]
                continue
            status, got = post(server["url"], "/v1/completions", {**body, "prompt": batched})
            assert status == 200, got
            assert got["choices"][0]["token_ids"] == want["choices"][0]["token_ids"]
            assert got["choices"][0]["text"] == want["choices"][0]["text"]


def test_n_choices_are_the_single_requests_of_their_seeds(server):
    """n=3 at seed 7 answers what three n=1 requests at seeds 7, 8, 9 answer; control: not all alike."""
    body = dict(model="tiny", prompt="the bird", max_tokens=6, temperature=1.0, seed=7, return_token_ids=True)
    status, out = post(server["url"], "/v1/completions", {**body, "n": 3})
    assert status == 200, out
    choices = sorted(out["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2]
    texts = [c["text"] for c in choices]
    singles = [post(server["url"], "/v1/completions", {**body, "seed": 7 + i})[1]["choices"][0]["text"]
               for i in range(3)]
    assert texts == singles
    assert len(set(texts)) > 1
    assert out["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in choices)


def test_chat_logprobs_content(server):
    """Chat `logprobs: true, top_logprobs: 3`: one entry per answer token (its text, logprob, UTF-8 bytes, three
    alternatives), equal to `Engine.score` of the chat prompt + answer; the texts make up the message."""
    engine = server["engine"]
    body = dict(model="tiny", messages=[{"role": "user", "content": "hello there"}], max_tokens=5, temperature=0,
                logprobs=True, top_logprobs=3, return_token_ids=True)
    status, out = post(server["url"], "/v1/chat/completions", body)
    assert status == 200, out
    choice = out["choices"][0]
    content = choice["logprobs"]["content"]
    answer = choice["token_ids"]
    assert len(content) == len(answer) >= 1
    ref = score(engine, out["prompt_token_ids"] + answer).logprob[-len(answer):]
    np.testing.assert_allclose([c["logprob"] for c in content], ref, atol=2e-5)
    assert "".join(c["token"] for c in content) == choice["message"]["content"]
    for c in content:
        assert c["bytes"] == list(c["token"].encode()) and len(c["top_logprobs"]) == 3
        assert c["top_logprobs"][0]["logprob"] == pytest.approx(c["logprob"], abs=1e-5)   # greedy: the top one
    status, plain = post(server["url"], "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None})
    assert status == 200 and plain["choices"][0]["logprobs"] is None          # control: only when asked


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", dict(prompt="hi", logprobs=6), "logprobs"),
    ("/v1/completions", dict(prompt="hi", max_tokens=0), "echo"),
    ("/v1/completions", dict(prompt="hi", n=17), "n"),
    ("/v1/completions", dict(prompt=["a", "b", "c"], n=3), "n"),            # 9 jobs > --max_queue 8
    ("/v1/completions", dict(prompt="hi", logprobs=1, stream=True), "stream"),
    ("/v1/completions", dict(prompt=[[1, 2], []]), "prompt"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}], top_logprobs=21, logprobs=True),
     "top_logprobs"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}], top_logprobs=2), "top_logprobs"),
])
def test_bounds_are_one_line_400s(server, path, body, param):
    status, out = post(server["url"], path, {"model": "tiny", "max_tokens": 2, **body})
    assert status == 400 and out["error"]["param"] == param, out
    assert "\n" not in out["error"]["message"]


def test_bounds_edges_are_served(server):
    """The controls of the refusals: the largest values in range are served."""
    chat = dict(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1, logprobs=True,
                top_logprobs=20)
    status, out = post(server["url"], "/v1/chat/completions", chat)
    assert status == 200 and len(out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 20, out
    status, out = post(server["url"], "/v1/completions", dict(model="tiny", prompt=["a", "b"], n=4, max_tokens=1,
                                                             logprobs=5))
    assert status == 200 and [c["index"] for c in out["choices"]] == list(range(8)), out
    assert all(len(c["logprobs"]["top_logprobs"][0]) <= 5 for c in out["choices"])


def test_tokenizer_endpoints_are_the_served_tokenizer(server):
    """/tokenize, /detokenize, /tokenizer_info (vLLM's shapes, lm-evaluation-harness's remote tokenizer):
    the ids the completions endpoint uses, '</s>' read as EOS."""
    tok = server["tok"]
    status, out = post(server["url"], "/tokenize", dict(prompt="the cat</s>", add_special_tokens=False))
    assert status == 200 and out["tokens"] == tok.encode("the cat") + [tok.eos_id]
    status, out = post(server["url"], "/detokenize", dict(tokens=tok.encode("the cat")))
    assert status == 200 and out["prompt"] == "the cat"
    with urllib.request.urlopen(server["url"] + "/tokenizer_info", timeout=30) as r:
        info = json.loads(r.read())
    assert info["eos_token"] == "</s>" and info["model_max_length"] == 256


def test_score_under_a_ring_mesh_equals_one_device(text_engine):
    """`Engine.score` with ring attention over fsdp=2 x sp=4 (rows padded to whole shards, the sequence split
    over sp) equals the one-device scores; control: another prompt's scores differ."""
    import jax

    from lwm.inference.engine import Engine
    from lwm.model.llama import LLaMAForCausalLM
    from lwm.parallel.sharding import make_mesh, match_partition_rules, named_shardings

    engine, tok = text_engine["engine"], text_engine["tok"]
    prompts = [[tok.bos_id] + tok.encode("the cat sat on the mat"), [tok.bos_id] + tok.encode("a bird")]
    ref = engine.score(prompts)
    cfg = text_engine["cfg"].replace(attention_impl="ring")
    mesh = make_mesh("1,2,1,4")
    with jax.set_mesh(mesh):
        placed = jax.device_put(text_engine["params"],
                                named_shardings(match_partition_rules(text_engine["params"], cfg), mesh))
        ring = Engine(LLaMAForCausalLM(cfg), placed, eos_id=tok.eos_id, pad_id=tok.pad_id,
                      vocab_size=tok.vocab_size)
        got = ring.score(prompts)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b.logprob, a.logprob, atol=1e-5)
        np.testing.assert_array_equal(b.top_ids[:, :3], a.top_ids[:, :3])
    n = len(ref[1].logprob)
    assert not np.allclose(got[0].logprob[:n], ref[1].logprob, atol=1e-5)
