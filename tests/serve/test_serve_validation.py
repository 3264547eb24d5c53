"""Validation at the server's edge and faults that stay per request (issue 27), on the tiny text and vision
engines of tests/serve/conftest.py served on a loopback port.

Checked: a seed anywhere in int64 is served (folded to the engine's uint32 by `fold_seed`: -1 answers as 0,
2**32 as 1) and one outside int64 is a 400 naming `seed`; lone surrogates in any text field, NaN and infinity
in float fields, and OpenAI's neutral fields at a non-neutral value are each refused in one line naming the
field, while the neutral values are accepted, and well-formed neighbours sent at the same time still answer;
a job that fails inside a batched prefill, or while its tokens are read, fails alone and its batch neighbours
answer what they answer alone; /health answers within 0.4 s while a 3 MB completions prompt is tokenized
(and does not when tokenizing runs on the event loop: the control); a 20 MB completions prompt and an 8 MB
image prompt are refused by their length without being tokenized; an image prompt is never tokenized on the
engine thread."""
import asyncio
import concurrent.futures
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from support.serving import running_server

pytestmark = pytest.mark.slow

NEW = 4


def post(url, path, body, timeout=120):
    """(status, parsed JSON) of one POST; body: a dict, or a str sent as it is (raw JSON with NaN, surrogates)."""
    data = (body if isinstance(body, str) else json.dumps(body)).encode("utf-8", "surrogatepass")
    req = urllib.request.Request(url + path, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(text_engine):
    """The tiny text engine behind create_app (4 decode slots): text_engine's entries plus url and app."""
    from lwm.serve import create_app

    app = create_app(text_engine["engine"], text_engine["tok"], model_name="tiny", max_batch_size=4)
    with running_server(app) as url:
        yield dict(text_engine, url=url, app=app)


def completion(server, **kw):
    return post(server["url"], "/v1/completions", {"model": "tiny", "prompt": "hello world", "max_tokens": NEW, **kw})


def test_fold_seed_covers_int64_and_refuses_outside():
    from lwm.serve.schemas import fold_seed

    assert [fold_seed(s) for s in (0, 7, 2 ** 32 - 1)] == [0, 7, 2 ** 32 - 1]      # the engine's range: as is
    assert fold_seed(-1) == 0 and fold_seed(2 ** 32) == 1 and fold_seed(-2 ** 63) == 2 ** 31
    assert all(0 <= fold_seed(s) < 2 ** 32 for s in (2 ** 63 - 1, -2 ** 63, -12345, 2 ** 40 + 3))
    for bad in (2 ** 63, -2 ** 63 - 1):
        with pytest.raises(ValueError, match="int64"):
            fold_seed(bad)


CHAT = '{"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": %s}] %s}'
REFUSED = [   # (path, raw JSON body, param, words the message must hold)
    ("/v1/completions", '{"model": "tiny", "prompt": "hi", "seed": 9223372036854775808}', "seed", "int64"),
    ("/v1/completions", '{"model": "tiny", "prompt": "hi", "seed": -9223372036854775809}', "seed", "int64"),
    ("/v1/chat/completions", CHAT % ('"a\\ud800b"', ""), "messages[0].content", "lone surrogate"),
    ("/v1/chat/completions", CHAT % ('[{"type": "text", "text": "\\udfff"}]', ""), "messages[0].content[0].text",
     "lone surrogate"),
    ("/v1/chat/completions", CHAT % ('"hi"', ', "stop": ["ok", "\\ud800"]'), "stop[1]", "lone surrogate"),
    ("/v1/chat/completions", CHAT % ('"hi"', ', "user": "\\ud800"'), "user", "lone surrogate"),
    ("/v1/completions", '{"model": "tiny", "prompt": "x\\ud800"}', "prompt", "lone surrogate"),
    ("/v1/chat/completions", CHAT % ('"hi"', ', "temperature": NaN'), "temperature", "NaN and infinity"),
    ("/v1/chat/completions", CHAT % ('"hi"', ', "top_p": Infinity'), "top_p", "NaN and infinity"),
    ("/v1/completions", '{"model": "tiny", "prompt": "hi", "temperature": -Infinity}', "temperature",
     "NaN and infinity"),
    ("/v1/chat/completions", CHAT % ('"hi"', ', "frequency_penalty": 0.5'), "frequency_penalty", "not supported"),
    ("/v1/chat/completions", CHAT % ('"hi"', ', "presence_penalty": -1'), "presence_penalty", "not supported"),
    ("/v1/chat/completions", CHAT % ('"hi"', ', "logit_bias": {"5": 10}'), "logit_bias", "not supported"),
    ("/v1/chat/completions", CHAT % ('"hi"', ', "n": 0'), "n", "greater than or equal to 1"),
    ("/v1/chat/completions", CHAT % ('"hi"', ', "top_logprobs": 2'), "top_logprobs", "needs logprobs=true"),
    ("/v1/chat/completions", CHAT % ('"hi"', ', "response_format": {"type": "json_object"}'), "response_format",
     "not supported"),
    ("/v1/completions", '{"model": "tiny", "prompt": "hi", "best_of": 3}', "best_of", "not supported"),
    ("/v1/chat/completions", CHAT % ('"hi"', ', "tool_choice": {"type": "function", "function": {"name": "f"}}'),
     "tool_choice", "not supported"),
    ("/v1/chat/completions", (CHAT % ('"hi"', ', "model": "\\ud800"')).replace('"model": "tiny", ', ''), "model",
     "lone surrogate"),
]
ACCEPTED = [  # the controls: the neutral values and the int64 seeds beside the refused ones are served
    ("/v1/completions", '{"model": "tiny", "prompt": "hi", "max_tokens": 4, "seed": 9223372036854775807}'),
    ("/v1/completions", '{"model": "tiny", "prompt": "hi", "max_tokens": 4, "seed": -9223372036854775808}'),
    ("/v1/chat/completions", CHAT % ('"a\\ud83d\\ude00b"', ', "stop": ["ok"], "user": "u"')),   # a valid pair
    ("/v1/chat/completions", CHAT % ('"hi"', ', "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {},'
                                             ' "n": 1, "logprobs": false, "response_format": {"type": "text"},'
                                             ' "tools": [], "tool_choice": "none", "top_logprobs": 0')),
    ("/v1/chat/completions", CHAT % ('"hi"', ', "logit_bias": null, "frequency_penalty": null, "temperature": 2')),
    ("/v1/completions", '{"model": "tiny", "prompt": "hi", "max_tokens": 4, "best_of": 1, "suffix": "",'
                        ' "logprobs": null, "seed": -1}'),
]


def test_bad_values_are_one_line_400s_naming_the_field_and_neighbours_still_answer(server):
    """Every refused body and every accepted one sent at the same time (so the accepted ones are prefilled
    and decoded together while the refused ones arrive)."""
    bodies = REFUSED + [(p, b, None, None) for p, b in ACCEPTED]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda c: post(server["url"], c[0], c[1]), bodies))
    for (path, body, param, words), (status, out) in zip(bodies, answers):
        if param is None:
            assert status == 200, (body, out)
            choice = out["choices"][0]
            assert choice["finish_reason"] in ("stop", "length")
            continue
        err = out["error"]
        assert status == 400 and err["param"] == param and words in err["message"], (body, out)
        assert "\n" not in err["message"] and "Traceback" not in err["message"]


def test_an_int64_seed_answers_as_its_folded_seed(server):
    """Seeds -1, 2**32 and 2**63 - 1 sent together answer what their folds 0, 1 and 2**31 answer (sent
    together again); control: the three answers differ (so equal answers are not all the same answer)."""
    from lwm.serve.schemas import fold_seed

    seeds = [-1, 2 ** 32, 2 ** 63 - 1]

    def batch(seeds):
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            outs = list(pool.map(lambda s: completion(server, seed=s, temperature=1.0, return_token_ids=True), seeds))
        assert all(status == 200 for status, _ in outs), outs
        return [out["choices"][0]["token_ids"] for _, out in outs]

    wide = batch(seeds)
    folded = batch([fold_seed(s) for s in seeds])
    assert [fold_seed(s) for s in seeds] == [0, 1, 2 ** 31]
    assert wide == folded
    assert len({tuple(t) for t in wide}) > 1, wide


def _serve_together(served, jobs, wait_s: float = 180, holder=None, **kwargs):
    """Submit every job before the engine thread starts (so they are admitted together), run the scheduler
    until all are done (asserted within wait_s each) and stop it. holder: a dict that gets the scheduler under
    "sched" before it starts (for fault injectors that look at its running jobs)."""
    from lwm.serve.scheduler import Scheduler

    sched = Scheduler(served, max_batch_size=4, batch_wait_s=0, **kwargs)
    if holder is not None:
        holder["sched"] = sched
    for job in jobs:
        sched.submit(job)
    sched.start()
    try:
        assert all(job.done.wait(wait_s) for job in jobs)
    finally:
        sched.stop()


def _lone(served, jobs_of):
    """Token lists of each job of jobs_of() served on its own scheduler run."""
    out = []
    for job in jobs_of():
        _serve_together(served, [job], wait_s=120)
        assert job.error is None, job.error
        out.append(list(job.tokens))
    return out


def test_a_job_that_fails_in_a_batched_prefill_or_in_its_tokens_fails_alone(text_engine, monkeypatch):
    """Four jobs admitted together (submitted before the engine thread starts: one batched prefill of 4 rows):
    one whose prompt holds a 'poison' id that the engine's prefill refuses, one whose tokenizer fails when its
    first token is read, two good ones. The good ones answer what they answer alone; the two bad ones end with
    a 500 that names no internals. Controls: the poison shared a batched prefill call with good rows, and the
    failing tokenizer was called (so both faults happened inside a batch)."""
    from lwm.serve.errors import APIError
    from lwm.serve.jobs import Job, Sampling
    from lwm.serve.model import ServedModel

    tok, engine = text_engine["tok"], text_engine["engine"]
    poison = tok.vocab_size - 1
    served = ServedModel(engine, tok, "tiny")
    good = [[tok.bos_id] + list(range(10, 17)), [tok.bos_id] + list(range(30, 37))]
    sampling = Sampling(max_tokens=NEW, temperature=0.0)

    class FailingDecode:
        """The tokenizer, but decode fails (as a fault while one job's tokens are read)."""
        calls = 0

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def decode(self, ids):
            FailingDecode.calls += 1
            raise RuntimeError("decode broke (internal detail)")

    def good_jobs():
        return [Job(p, sampling, tok, None) for p in good]

    alone = _lone(served, good_jobs)

    batches = []
    real = engine.prefill_batch

    def prefill_batch(rows, *a, **kw):
        batches.append([list(r) for r in rows])
        if any(poison in r for r in rows):
            raise RuntimeError("prefill broke (internal detail)")
        return real(rows, *a, **kw)

    monkeypatch.setattr(engine, "prefill_batch", prefill_batch)
    jobs = good_jobs()
    bad_prefill = Job([tok.bos_id] + [poison] * 7, sampling, tok, None)
    bad_tokens = Job([tok.bos_id] + list(range(50, 57)), sampling, FailingDecode(tok), None)
    jobs = [jobs[0], bad_prefill, jobs[1], bad_tokens]
    _serve_together(served, jobs, wait_s=120)

    shared = [b for b in batches if any(poison in r for r in b) and any(r == good[0] for r in b)]
    assert shared, batches                              # control: the poison was batched with a good row
    assert FailingDecode.calls >= 1                     # control: the failing tokenizer ran
    for job in (bad_prefill, bad_tokens):
        assert job.finish_reason == "error" and isinstance(job.error, APIError) and job.error.status == 500
        assert "internal detail" not in job.error.message and "RuntimeError" not in job.error.message
    assert [jobs[0].error, jobs[2].error] == [None, None]
    assert [list(jobs[0].tokens), list(jobs[2].tokens)] == alone


STALL = 0.4    # s: /health slower than this counts as stalled (here: 0.05 s beside tokenizing, 1.7 s on the loop)


def _health_gaps(url, busy: threading.Event):
    """Latencies (s) of GET /health, one after another, while `busy` is set."""
    gaps = []
    while busy.is_set():
        t0 = time.perf_counter()
        with urllib.request.urlopen(url + "/health", timeout=60) as r:
            r.read()
        gaps.append(time.perf_counter() - t0)
        time.sleep(0.01)
    return gaps


def _big_prompt_with_probe(server, prompt):
    """(status, body, seconds of the request, worst /health latency while it ran)."""
    busy = threading.Event()
    busy.set()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        probe = pool.submit(_health_gaps, server["url"], busy)
        time.sleep(0.05)
        t0 = time.perf_counter()
        status, out = post(server["url"], "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 1})
        took = time.perf_counter() - t0
        busy.clear()
        gaps = probe.result()
    return status, out, took, max(gaps)


def test_health_answers_while_a_big_completions_prompt_is_tokenized(server, monkeypatch):
    """A 3 MB prompt (the length bound lifted so it is tokenized: about a second here) is refused for its
    tokens; /health answers within STALL (0.4 s) meanwhile. Control: with tokenizing on the event loop
    (asyncio.to_thread run inline), the same probe sees /health stall."""
    served = server["app"].state.served
    monkeypatch.setattr(served, "max_chars_per_token", 10 ** 6)
    prompt = "world models read long videos " * 100_000
    status, out, took, worst = _big_prompt_with_probe(server, prompt)
    assert status == 400 and out["error"]["code"] == "context_length_exceeded", out
    assert "tokens" in out["error"]["message"]
    assert took > STALL, took                              # long enough for a stalled loop to show
    assert worst < STALL, (worst, took)

    async def inline(fn, *args, **kw):
        return fn(*args, **kw)

    monkeypatch.setattr(asyncio, "to_thread", inline)
    status, out, took, worst = _big_prompt_with_probe(server, prompt)
    assert status == 400
    assert worst > STALL, (worst, took)                    # the control: the probe sees a blocked loop


def test_a_prompt_too_long_by_its_characters_is_refused_without_tokenizing(server, monkeypatch):
    """20 MB of prompt: 400 context_length_exceeded naming the characters, the tokenizer never called.
    Control: a prompt just under the bound is tokenized (and refused for its tokens)."""
    served = server["app"].state.served
    calls = []
    real = served.tokenizer.encode
    monkeypatch.setattr(served.tokenizer, "encode", lambda text: calls.append(len(text)) or real(text))
    status, out = post(server["url"], "/v1/completions", {"model": "tiny", "prompt": "x" * 20_000_000})
    assert status == 400 and out["error"]["code"] == "context_length_exceeded", out
    assert "characters" in out["error"]["message"] and out["error"]["param"] == "prompt"
    assert calls == []
    under = served.max_chars_per_token * served.max_sequence_length
    status, out = post(server["url"], "/v1/completions", {"model": "tiny", "prompt": "ab " * (under // 3)})
    assert status == 400 and "tokens" in out["error"]["message"] and calls, out


def test_image_prompts_are_tokenized_off_the_engine_thread(vision_engine, monkeypatch):
    """/v1/images/generations: an 8 MB prompt is refused by its length untokenized; a prompt within the
    character bound but over the context is tokenized, refused for its tokens, and never on the engine
    thread. Control: the same prompt handed to generate_images as text (the old path) tokenizes on the
    engine thread, which the recorder sees."""
    from lwm.serve import create_app
    from lwm.serve.errors import APIError

    tok = vision_engine["tok"]
    threads = []
    real = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text: threads.append(threading.current_thread().name) or real(text))
    app = create_app(vision_engine["engine"], tok, model_name="tiny-vision", vqgan=vision_engine["vqgan"])
    with running_server(app) as url:
        status, out = post(url, "/v1/images/generations", {"prompt": "a" * 8_000_000})
        assert status == 400 and "characters" in out["error"]["message"] and threads == [], out
        status, out = post(url, "/v1/images/generations", {"prompt": "red fox " * 1000})
        assert status == 400 and out["error"]["code"] == "context_length_exceeded", out
        assert threads and "lwm-serve-engine" not in threads, threads

        served, sched = app.state.served, app.state.scheduler
        threads.clear()
        with pytest.raises(APIError, match="context length"):
            asyncio.run(sched.call(lambda: served.generate_images("red fox " * 1000, 1, seed=0, temperature=1.0,
                                                                  top_k=0, cfg_scale=1.0)))
        assert "lwm-serve-engine" in threads                # control: the recorder sees the engine thread


def test_max_chars_per_token_flag_reaches_the_served_model(monkeypatch, tmp_path):
    """`python -m lwm.serve --max_chars_per_token=2` (main, with the loading and the listening stubbed) builds
    a ServedModel that refuses 300 characters on a 100-token context untokenized; the default 32 (control)
    lets the same text through to the tokenizer. --max_chars_per_token=0 is one line naming the flag."""
    from types import SimpleNamespace

    import uvicorn

    from lwm.serve import __main__ as serve_main
    from lwm.serve import loading
    from lwm.serve.errors import APIError
    from lwm.serve.loading import check_flags
    from support import small_tokenizer

    engine = SimpleNamespace(config=SimpleNamespace(max_sequence_length=100))
    tok = small_tokenizer(tmp_path)
    monkeypatch.setattr(loading, "load_served", lambda config: (engine, tok, None, None))
    apps = []
    monkeypatch.setattr(uvicorn, "Server", lambda config: SimpleNamespace(run=lambda: apps.append(config.app)))

    def served(argv):
        serve_main.main(argv)
        app = apps.pop()
        while not hasattr(app, "state"):            # the Edge middleware wraps the FastAPI app
            app = app.app
        return app.state.served

    small, default = served(["--max_chars_per_token=2", "--prefix_cache_mb=0"]), served(["--prefix_cache_mb=0"])
    assert (small.max_chars_per_token, default.max_chars_per_token) == (2, 32)
    with pytest.raises(APIError, match=r"the prompt has 300 characters, more than 200 \(2 per token\)") as info:
        small.completion_prompt("abc" * 100)
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"
    assert len(default.completion_prompt("abc" * 100)) > 1          # control: tokenized under the default

    config = serve_main.get_default_config()
    config.max_chars_per_token = 0
    with pytest.raises(ValueError, match=r"^--max_chars_per_token=0: must be >= 1$"):
        check_flags(config)


def test_a_decode_step_fault_resumes_the_jobs_and_one_that_it_follows_fails_alone(text_engine, monkeypatch):
    """Three jobs decoding together (greedy, and two sampled with seeds). (1) One decode step fails after
    consuming its donated state: every job is resumed from its tokens and ends with exactly the tokens of a run
    without the fault. (2) Steps fail whenever one 'poison' job is active in them: it ends alone with a 500 that
    names no internals, and the other two end with their fault-free tokens. Control: with fault_retries=0 (no
    resumption, the old behaviour) the same single fault fails every job."""
    from lwm.serve.errors import APIError
    from lwm.serve.jobs import Job, Sampling
    from lwm.serve.model import ServedModel

    tok, engine = text_engine["tok"], text_engine["engine"]
    served = ServedModel(engine, tok, "tiny")
    prompts = [[tok.bos_id] + list(range(10, 17)), [tok.bos_id] + list(range(30, 37)),
               [tok.bos_id] + list(range(50, 57))]
    samplings = [Sampling(max_tokens=12, temperature=0.0), Sampling(max_tokens=12, temperature=1.0, seed=5),
                 Sampling(max_tokens=12, temperature=0.8, top_p=0.9, seed=7)]

    def jobs():
        return [Job(p, s, tok, None) for p, s in zip(prompts, samplings)]

    clean = jobs()
    _serve_together(served, clean, steps_per_call=2)
    want = [list(j.tokens) for j in clean]
    assert all(j.error is None and len(j.tokens) >= 3 for j in clean), [j.error for j in clean]

    from lwm.inference.engine import Engine

    real_step = Engine.step
    calls = {"n": 0}

    def step_fails_once(self, state, *a, **kw):
        calls["n"] += 1
        out = real_step(self, state, *a, **kw)          # the state is consumed (donated) ...
        if calls["n"] == 2:
            raise RuntimeError("XLA runtime fault (internal detail)")      # ... and then the call fails
        return out

    monkeypatch.setattr(Engine, "step", step_fails_once)
    once = jobs()
    _serve_together(served, once, steps_per_call=2)
    assert calls["n"] > 2
    assert [j.error for j in once] == [None] * 3 and [list(j.tokens) for j in once] == want

    calls["n"] = 0
    control = jobs()
    _serve_together(served, control, steps_per_call=2, fault_retries=0)
    assert all(j.finish_reason == "error" and j.error.status == 500 for j in control)

    poison_prompt = [tok.bos_id] + list(range(70, 77))
    state_jobs = {}

    def step_fails_with_poison(self, state, *a, **kw):
        out = real_step(self, state, *a, **kw)
        if any(j is not None and j.prompt == poison_prompt and not j.finished for j in state_jobs["sched"].running):
            raise RuntimeError("poisoned row (internal detail)")
        return out

    monkeypatch.setattr(Engine, "step", step_fails_with_poison)
    mixed = jobs()
    poison = Job(poison_prompt, Sampling(max_tokens=12, temperature=0.0), tok, None)
    mixed.insert(1, poison)
    _serve_together(served, mixed, holder=state_jobs, steps_per_call=2)
    assert poison.finish_reason == "error" and isinstance(poison.error, APIError) and poison.error.status == 500
    assert "internal detail" not in poison.error.message
    others = [j for j in mixed if j is not poison]
    assert [j.error for j in others] == [None] * 3 and [list(j.tokens) for j in others] == want
