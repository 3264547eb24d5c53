"""`lwm.serve` over HTTP with the official `openai` client: a tiny text model (random weights, a 400-piece
sentencepiece tokenizer) served on a free loopback port, one server for the module.

Checked: chat (plain and streamed) and completions give the engine's own greedy tokens; 16 concurrent requests
give what the same requests give one by one (token for token; a flip is accepted only as a near-tie of the two
tokens' logits, to 1e-5, computed by one full forward); bad requests get OpenAI 4xx errors and the next request
is served; the API key is enforced; a full queue answers 429; stop strings cut the answer; a client that leaves
mid-stream frees its row."""
import concurrent.futures
import json
import threading
import time
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support import WORDS, free_port
from support.needs import import_or_fail
from support.serving import running_server

openai = import_or_fail("openai", 'pip install -e ".[test]"')
pytestmark = pytest.mark.slow

KEY = "test-key"
NEW = 8
# ~40 tokens: the same prompt bucket (64) as the chat prompts, so no test compiles a new prefill shape.
PROMPT = "world models read long videos and text in one million token context with ring attention " * 3


@pytest.fixture(scope="module")
def text_server(text_engine):
    """The tiny text engine (tests/serve/conftest.py) served with an API key, 16 decode slots and a queue of 32:
    text_engine's entries plus url, client (openai) and scheduler."""
    from lwm.serve import create_app

    app = create_app(text_engine["engine"], text_engine["tok"], model_name="tiny", api_key=KEY, max_batch_size=16,
                     max_queue=32)
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        yield dict(text_engine, url=url, client=client, scheduler=app.state.scheduler)


def raw(url, path, body=None, key=KEY, method=None, content_type="application/json"):
    """(status, parsed JSON body) of one request sent with urllib (bytes bodies are sent as they are)."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": content_type,
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def greedy(server, ids, n=NEW):
    return server["engine"].generate([ids], n).tokens[0]


def chat_ids(server, text):
    from lwm.text.chat_template import conversation_ids

    return conversation_ids(server["tok"], [{"role": "user", "content": text}])


def test_models_health_and_page(text_server):
    models = text_server["client"].models.list()
    assert [m.id for m in models.data] == ["tiny"]
    status, health = raw(text_server["url"], "/health", key=None)
    assert status == 200 and health["status"] == "ok" and health["model"] == "tiny"
    with urllib.request.urlopen(text_server["url"] + "/", timeout=30) as r:
        page = r.read().decode()
    assert "/v1/chat/completions" in page and "<textarea" in page


def test_chat_plain_and_streamed_give_the_engines_greedy_tokens(text_server):
    client, tok = text_server["client"], text_server["tok"]
    messages = [{"role": "user", "content": "the quick brown fox"}]
    ref = greedy(text_server, chat_ids(text_server, "the quick brown fox"))
    assert ref, "the reference decode produced nothing; pick another prompt"

    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=NEW, temperature=0,
                                       extra_body={"return_token_ids": True})
    choice = r.choices[0]
    assert choice.model_extra["token_ids"] == ref
    assert choice.message.content == tok.decode(ref)
    assert r.model_extra["prompt_token_ids"] == chat_ids(text_server, "the quick brown fox")
    assert r.usage.completion_tokens == len(ref) and r.usage.prompt_tokens == len(r.model_extra["prompt_token_ids"])
    assert choice.finish_reason == ("length" if len(ref) == NEW else "stop")

    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=NEW, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"return_token_ids": True})
    text, ids, reasons, usage = "", [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            ids += (c.model_extra or {}).get("token_ids") or []
            reasons.append(c.finish_reason)
    assert ids == ref and text == tok.decode(ref)
    assert reasons[-1] == choice.finish_reason and all(r is None for r in reasons[:-1])
    assert usage.completion_tokens == len(ref)


def test_stream_ends_with_done(text_server):
    req = urllib.request.Request(
        text_server["url"] + "/v1/chat/completions", method="POST",
        data=json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "a lazy dog"}],
                         "max_tokens": 4, "temperature": 0, "stream": True}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_completions_give_the_engines_greedy_tokens(text_server):
    tok = text_server["tok"]
    prompt = PROMPT
    ids = [tok.bos_id] + tok.encode(prompt)
    assert 32 < len(ids) <= 64                                   # the chat tests' prompt bucket: no new compile
    ref = greedy(text_server, ids)
    r = text_server["client"].completions.create(model="tiny", prompt=prompt, max_tokens=NEW, temperature=0,
                                            extra_body={"return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == ref and r.choices[0].text == tok.decode(ref)
    r2 = text_server["client"].completions.create(model="tiny", prompt=ids, max_tokens=NEW, temperature=0)
    assert r2.choices[0].text == r.choices[0].text


def near_tie(server, ids, a, b, tol=1e-5):
    """|logit a - logit b| at the next position after `ids`, by one full forward of the model."""
    logits = server["model"].apply({"params": server["params"]}, jnp.asarray([ids], jnp.int32))[0, -1]
    return abs(float(logits[a]) - float(logits[b])) <= tol


def hold_engine(server):
    """Occupy the engine thread until the returned event is set (requests queue up meanwhile)."""
    import asyncio

    release, started = threading.Event(), threading.Event()

    def block():
        started.set()
        release.wait(60)

    threading.Thread(target=lambda: asyncio.run(server["scheduler"].call(block)), daemon=True).start()
    assert started.wait(30)
    return release


def wait_for(predicate, timeout=60):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_16_concurrent_requests_equal_one_by_one(text_server):
    client, sched = text_server["client"], text_server["scheduler"]
    texts = [" ".join(WORDS[i:i + 1 + i % 5]) for i in range(16)]          # 16 prompts of different lengths

    def ask(text):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                           max_tokens=NEW, temperature=0, extra_body={"return_token_ids": True})
        return r.choices[0].model_extra["token_ids"]

    one_by_one = [ask(t) for t in texts]
    release = hold_engine(text_server)
    sched.max_rows = 0
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(ask, t) for t in texts]
        wait_for(lambda: sched.stats()["waiting"] == 16)
        release.set()
        together = [f.result() for f in futures]
    assert sched.max_rows == 16, "the 16 requests were never decoded in one step"
    flips = []
    for text, a, b in zip(texts, one_by_one, together):
        if a == b:
            continue
        k = next(i for i in range(min(len(a), len(b)) + 1) if i == min(len(a), len(b)) or a[i] != b[i])
        prefix = chat_ids(text_server, text) + a[:k]
        eos = text_server["tok"].eos_id
        ta, tb = (a + [eos])[k], (b + [eos])[k]
        assert near_tie(text_server, prefix, ta, tb), f"{text!r}: batched tokens {b} differ from {a} at {k} (no tie)"
        flips.append((text, k))
    print(f"16 concurrent == one by one: {16 - len(flips)} identical, near-tie flips: {flips}")
    assert len(flips) <= 1, f"more than one near-tie flip: {flips}"


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(text_server):
    url, client = text_server["url"], text_server["client"]
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    limit = text_server["cfg"].max_sequence_length
    png_header_only = "data:image/png;base64,aGVsbG8gd29ybGQ="                        # "hello world"
    cases = [
        ("malformed JSON", b'{"model": "tiny", "messages": [', 400, "JSON"),
        ("unknown field", {**ok, "max_token": 3}, 400, "max_token"),
        ("unknown model", {**ok, "model": "gpt-4"}, 404, "gpt-4"),
        ("too long", {**ok, "messages": [{"role": "user", "content": "the fox " * 400}]}, 400, str(limit)),
        ("bad role order", {**ok, "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
        ("bad temperature", {**ok, "temperature": -1}, 400, "temperature"),
        ("image to a text model", {**ok, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_header_only}}]}]}, 400, "text model"),
        ("missing field", {"model": "tiny"}, 400, "'messages'"),
        ("empty body", b"", 400, "got an empty body"),
        ("JSON array", b"[1]", 400, "got a JSON array"),
        ("JSON string", b'"hi"', 400, "got a JSON string"),
        ("form body", json.dumps(ok).encode(), 400, "application/x-www-form-urlencoded, not application/json",
         "application/x-www-form-urlencoded"),
    ]
    for name, body, status, needle, *content_type in cases:
        got, err = raw(url, "/v1/chat/completions", body, content_type=(content_type or ["application/json"])[0])
        assert got == status, (name, got, err)
        assert set(err) == {"error"} and needle in err["error"]["message"], (name, err)
        assert err["error"]["type"] and "\n" not in err["error"]["message"]
        r = client.chat.completions.create(**ok)                          # the next request is served
        assert r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{**ok, "messages": [{"role": "user", "content": "the fox " * 400}]})
    assert e.value.code == "context_length_exceeded" and f"{limit}" in e.value.message
    got, err = raw(url, "/v1/completions", {"model": "tiny", "prompt": "the fox " * 400, "max_tokens": 2})
    assert got == 400 and err["error"]["param"] == "prompt", err                  # the field of that endpoint
    assert "max_sequence_length" in err["error"]["message"] and str(limit) in err["error"]["message"], err
    assert raw(url, "/v1/nothing", ok)[0] == 404


def test_api_key_is_enforced(text_server):
    url = text_server["url"]
    for key in (None, "wrong"):
        status, err = raw(url, "/v1/models", key=key)
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert raw(url, "/v1/models")[0] == 200


def test_full_queue_answers_429_and_then_serves(text_server):
    client, sched = text_server["client"], text_server["scheduler"]
    ask = lambda: client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
    release = hold_engine(text_server)
    old, sched.max_queue = sched.max_queue, 2
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(ask) for _ in range(2)]
            wait_for(lambda: sched.stats()["waiting"] == 2)
            with pytest.raises(openai.RateLimitError):
                ask()
            release.set()
            assert all(f.result().choices[0].finish_reason for f in futures)
    finally:
        sched.max_queue = old
        release.set()
    tok = text_server["tok"]
    want = tok.decode(greedy(text_server, [tok.bos_id] + tok.encode(PROMPT), 2))
    assert want and ask().choices[0].text == want                          # served, and the right answer


def test_stop_string_cuts_the_answer(text_server):
    tok, client = text_server["tok"], text_server["client"]
    ref = greedy(text_server, [tok.bos_id] + tok.encode(PROMPT))
    full = tok.decode(ref)
    stop = next((full[i:i + 2] for i in range(2, len(full) - 1) if full[i:i + 2].isprintable()
                 and full[i:i + 2].strip()), None)
    assert stop, f"the greedy answer {full!r} has no printable pair of characters to stop at"
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=NEW, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=NEW, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == r.choices[0].text


def test_a_client_that_leaves_mid_stream_frees_its_row(text_server):
    client, sched = text_server["client"], text_server["scheduler"]
    budget = text_server["cfg"].max_sequence_length - len(chat_ids(text_server, "the quick brown fox"))
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the quick brown fox"}],
                                            max_tokens=budget, temperature=0, stream=True,
                                            extra_body={"return_token_ids": True})
    got, t0 = 0, time.time()
    for chunk in stream:
        got += sum(len((c.model_extra or {}).get("token_ids") or []) for c in chunk.choices)
        if got:
            break
    t1 = time.time()
    stream.close()                                                      # the client leaves
    wait_for(lambda: sched.stats()["running"] == 0 and sched.finished and sched.finished[-1][0] == "cancelled")
    reason, produced, *_ = sched.finished[-1]
    assert produced < budget, f"the row kept decoding to its budget ({produced} of {budget} tokens)"
    print(f"left after {got} token(s); the row stopped after {produced} of {budget}; {t1-t0:.2f} s, {time.time()-t1:.2f} s")
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")                 # and the server serves on


def test_entry_point_serves_a_checkpoint_and_refuses_bad_flags(text_server, tmp_path):
    """`python -m lwm.serve` as a user runs it: bad flags are one line (exit 2); with a saved checkpoint it
    binds to loopback and answers the openai client."""
    import os
    import subprocess
    import sys

    from lwm.checkpoint.formats import save_streaming

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    bad = subprocess.run([sys.executable, "-m", "lwm.serve", "--modality=audio"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--modality='audio'" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "lwm.serve", "--decode_steps_per_call=0"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip() == "lwm.serve: error: --decode_steps_per_call=0: must be >= 1"
    save_streaming(str(tmp_path / "params"), text_server["params"])
    tok_file = text_server["tok_file"]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lwm.serve", "--load_llama_config=tiny",
                             "--update_llama_config=dict(max_sequence_length=256)",
                             f"--load_checkpoint=params::{tmp_path / 'params'}", f"--tokenizer={tok_file}",
                             f"--port={port}", "--model_name=tiny", "--max_batch_size=2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
        deadline = time.time() + 300
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, "the server did not come up"
                time.sleep(0.5)
        ids = chat_ids(text_server, "the quick brown fox")
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the quick brown fox"}],
                                           max_tokens=NEW, temperature=0, extra_body={"return_token_ids": True})
        assert r.choices[0].model_extra["token_ids"] == greedy(text_server, ids)    # the same weights, the same answer
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_state_ladder_and_prefill_chunks():
    """The scheduler's decode states are a ladder (1, 4, 16 rows for max_batch_size 16): jobs go to the smallest
    state that holds the recent demand, so a lone request's step costs one row and 4 steady requests four; the
    jobs admitted together are prefilled in batches of ladder sizes."""
    from lwm.serve.scheduler import Pool, Scheduler

    assert Scheduler._chunks(1, [1, 4, 16]) == [1]
    assert Scheduler._chunks(3, [1, 4, 16]) == [4]
    assert Scheduler._chunks(5, [1, 4, 16]) == [4, 1]
    assert Scheduler._chunks(9, [1, 4, 16]) == [16]
    assert Scheduler._chunks(16, [1, 4, 16]) == [16]
    assert Scheduler._chunks(20, [1, 4, 16]) == [16, 4]
    sched = Scheduler(None, max_batch_size=16)
    pools = [Pool(0, 1), Pool(1, 4), Pool(5, 16)]
    sched.running = [None] * 21
    assert sched._targets(pools, 1, 1) == [0]                       # alone: the one-row state
    assert sched._targets(pools, 3, 4) == [1, 2, 3]                 # demand 4: the 4-row state
    assert sched._targets(pools, 2, 16) == [5, 6]                   # demand 16: the big state
    sched.running[1:5] = ["busy"] * 4
    assert sched._targets(pools, 2, 4) == [5, 6]                    # the 4-row state is full: the next one up
    assert sched._targets(pools, 1, 1) == [0]


def test_lone_jobs_move_into_the_state_others_decode_in():
    """A round of decoding costs one step call per state with jobs, so jobs in smaller states move into the
    largest busy state when it has free rows for all of them (and stay when it has not)."""
    from types import SimpleNamespace

    from lwm.serve.scheduler import Pool, Scheduler

    moves = []

    class Engine:                                  # records Engine.move(src, src_slot, dst, dst_slot)
        @staticmethod
        def move(src, src_slot, dst, dst_slot):
            moves.append((src, src_slot, dst, dst_slot))
            return src, dst

    sched = Scheduler(SimpleNamespace(engine=Engine()), max_batch_size=16)
    pools = [Pool(0, 1, "1"), Pool(1, 4, "4"), Pool(5, 16, "16")]
    sched.running = [None] * 21
    sched.running[0] = "lone"
    sched._consolidate(pools)
    assert moves == [] and sched.running[0] == "lone"               # one busy state: nothing to merge
    sched.running[5:20] = [f"j{i}" for i in range(15)]              # 15 of 16 rows busy
    sched._consolidate(pools)
    assert moves == [("1", 0, "16", 15)] and sched.running[0] is None and sched.running[20] == "lone"
    moves.clear()
    sched.running[1:3] = ["a", "b"]                                 # no room for two more: they stay
    sched._consolidate(pools)
    assert moves == [] and sched.running[1:3] == ["a", "b"]
    with pytest.raises(ValueError, match="steps_per_call=0"):
        Scheduler(None, steps_per_call=0)



def test_gather_waits_for_the_rest_of_a_burst_only_when_idle():
    """An idle engine with fewer waiting jobs than the recent demand waits (up to batch_wait_s) for the rest of
    the burst, so they share one prefill and decode in step; a lone client (demand 1) and a busy engine never
    wait."""
    from lwm.serve.scheduler import Scheduler

    sched = Scheduler(None, max_batch_size=16, batch_wait_s=5.0)
    sched.running = [None] * 21
    now = time.perf_counter()

    def gather_time():
        t0 = time.perf_counter()
        with sched.cond:
            sched._gather()
        return time.perf_counter() - t0

    sched._demand(now, 1)
    sched.waiting.append("a")
    assert gather_time() < 0.5                                     # demand 1: no wait
    sched._demand(now, 4)
    late = threading.Timer(0.2, lambda: [sched.submit(j) for j in ("b", "c", "d")])
    late.start()
    waited = gather_time()
    assert 0.15 < waited < 4.0 and list(sched.waiting) == ["a", "b", "c", "d"]   # ended when the 4th arrived
    sched.waiting.clear()
    sched.waiting.append("e")
    sched.running[3] = "busy"
    assert gather_time() < 0.5                                     # the engine is decoding: no wait
    sched.running[3] = None
    sched.batch_wait_s = 0.3
    waited = gather_time()
    assert 0.25 < waited < 2.0                                     # the rest never came: waited batch_wait_s
    with pytest.raises(ValueError, match="batch_wait_s=-1"):
        Scheduler(None, batch_wait_s=-1)


def test_hold_keeps_a_request_for_the_next_round_only_when_the_running_round_ends_within_a_call():
    """A request that comes back while its round still decodes (its answer ended early) waits for the next
    round when every decoding job ends within the next call and fewer jobs are there than the recent demand;
    it is admitted at once when a job has more than a call to go, when the demand is met, or when batch
    waits are off."""
    import collections
    from types import SimpleNamespace

    from lwm.serve.scheduler import Scheduler

    def job(max_tokens, produced):
        return SimpleNamespace(sampling=SimpleNamespace(max_tokens=max_tokens), tokens=[5] * produced,
                               finished=False)

    sched = Scheduler(None, max_batch_size=16, steps_per_call=16)
    now = time.perf_counter()
    sched._demand(now, 16)
    sched.running = [job(32, 16) for _ in range(15)] + [None] * 5     # 16 tokens to go: one call
    sched.waiting.append("next")
    assert sched._hold(now)
    sched.running[0] = job(32, 15)                                    # 17 to go: more than one call
    assert not sched._hold(now)
    sched.running[0] = job(32, 16)
    sched.waiting.extend(f"w{i}" for i in range(15))                  # 16 wait: the next round is here
    assert not sched._hold(now)
    sched.waiting = collections.deque(["next"])
    sched.running[0].finished = True                                  # an ended job does not count
    assert sched._hold(now)
    sched.waiting.clear()
    sched.waiting.append((print, None))                               # a call on the engine thread: never held
    assert not sched._hold(now)
    sched.waiting[0] = "next"
    sched.batch_wait_s = 0.0                                          # batch waits off: never held
    assert not sched._hold(now)
    sched.batch_wait_s = 0.02
    assert sched._hold(now)
    running, sched.running = sched.running, [None] * 20
    assert not sched._hold(now)                                       # nothing decodes: `_gather`'s case
    sched.running = running
    assert not sched._hold(now + 2 * sched.demand_window_s)           # the demand is forgotten: admitted


def test_warmup_compiles_the_serving_shapes_before_the_first_request(text_server):
    """--warmup_prompt_lengths: after start(), requests of that length (alone, several at once, greedy and
    top-p) compile nothing more; a prompt of another bucket does (the counter sees compiles), and the tokens
    are the engine's greedy ones."""
    from lwm.serve.jobs import Job, Sampling
    from lwm.serve.model import ServedModel
    from lwm.serve.scheduler import Scheduler

    from lwm.inference.engine import Engine

    tok, src = text_server["tok"], text_server["engine"]
    engine = Engine(src.model, src.params, eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_size=tok.vocab_size)
    served = ServedModel(engine, tok, "tiny")
    with pytest.raises(ValueError, match="--warmup_prompt_lengths: 300 is not a prompt length"):
        Scheduler(served, warmup_prompt_lengths=[300])
    sched = Scheduler(served, max_batch_size=4, steps_per_call=2, warmup_prompt_lengths=[20]).start()
    try:
        assert sched.warmup_s is not None and sched.warmup_s > 0

        def compiled():
            e = sched.served.engine                  # the one engine of every decode state
            return sum(f._cache_size() for f in (e._prefill_jit, e._step_jit, e._insert_jit, e._move_jit))

        def run(prompts, sampling):
            jobs = [Job(p, sampling, tok, None) for p in prompts]
            for job in jobs:
                sched.submit(job)
            for job in jobs:
                assert job.done.wait(120) and job.error is None
            return jobs

        rng = np.random.default_rng(0)
        prompts = [[tok.bos_id] + rng.integers(3, tok.vocab_size, 19).tolist() for _ in range(4)]
        before = compiled()
        alone = run(prompts[:1], Sampling(max_tokens=NEW, temperature=0.0))
        run(prompts[:3], Sampling(max_tokens=NEW, temperature=1.0, top_p=0.9, seed=3))
        run(prompts, Sampling(max_tokens=NEW, temperature=0.0))
        assert compiled() == before
        assert alone[0].tokens == src.generate(prompts[:1], NEW).tokens[0]
        run([[tok.bos_id] * 90], Sampling(max_tokens=NEW, temperature=0.0))   # another bucket: compiles
        assert compiled() > before
    finally:
        sched.stop()


def test_feeding_a_call_at_once_ends_answers_where_token_by_token_does():
    """Job.feed_many (one decode and one post per engine call) gives the tokens, text and finish reason of
    feeding the same tokens one by one: EOS before, at and after the budget, a plain run, and stop strings; the
    stop-string answers are also checked against their expected tokens, text and finish reason."""
    from lwm.serve.jobs import Job, Sampling

    class Tok:
        eos_id = 2

        @staticmethod
        def decode(ids):
            return "".join(chr(97 + i % 26) for i in ids)

    cases = [([5, 6, 2, 7], 10, ()), ([5, 6, 7, 2], 3, ()), ([5, 6, 7, 8], 3, ()), ([5, 2], 1, ()),
             ([5, 6, 7, 8, 9], 10, ()), ([5, 6, 7, 8, 9], 10, ("hi",)), ([5, 6, 7, 8, 9], 10, ("zz",))]
    for tokens, budget, stop in cases:
        one, many = (Job([1], Sampling(max_tokens=budget, stop=stop), Tok, None) for _ in range(2))
        for t in tokens[:2]:
            one.feed(t)
        for t in tokens[2:]:
            one.feed(t)
        many.feed_many(tokens[:2])
        many.feed_many(tokens[2:])
        assert (many.tokens, many.text, many.finish_reason) == (one.tokens, one.text, one.finish_reason), tokens
    # With stop strings feed_many goes token by token through feed, so parity above compares feed with itself
    # there: the stop cases are checked against their answers written out. Tok decodes 5..9 to 'fghij'.
    for stop, tokens, text, reason in ((("hi",), [5, 6, 7, 8], "fg", "stop"), (("zz",), [5, 6, 7, 8, 9], "fghij", None),
                                       (("gh", "f"), [5], "", "stop")):
        job = Job([1], Sampling(max_tokens=10, stop=stop), Tok, None)
        job.feed_many([5, 6])
        job.feed_many([7, 8, 9])
        assert (job.tokens, job.text, job.finish_reason) == (tokens, text, reason), stop
    assert Job([1], Sampling(max_tokens=10, stop=("hi",)), Tok, None).feed_many([7, 8, 9]) is True  # 'hi' stops
