"""The server's prefix cache and chunked prefill (lwm.serve.scheduler, docs/serve.md), on the tiny text model.

Checked: a second request sharing a prefix reports usage.prompt_tokens_details.cached_tokens (whole blocks,
streamed final usage chunk too) and answers the tokens of a server without the cache; concurrent requests
sharing a prefix answer those tokens too; a long prompt prefilled in chunks while other streams decode gives
the tokens of a whole prefill and the streams get decode steps between its chunks (control: a token budget
that fits every chunk in one step leaves none between them); bad flags are one line before anything compiles.
"""
import concurrent.futures
import json
import time
import urllib.request

import numpy as np
import pytest

from support.needs import import_or_fail
from support.serving import running_server

openai = import_or_fail("openai", 'pip install -e ".[test]"')
pytestmark = pytest.mark.slow

BLOCK = 128       # the tiny preset's decode_chunk_size: the smallest prefix-cache block
NEW = 6


def _prompt(tail: int, n: int = 150):
    """A completion prompt of token ids: n shared ids (one whole block and some), then `tail` distinct ids."""
    rng = np.random.RandomState(0)
    shared = [1] + [int(x) for x in rng.randint(5, 390, n - 1)]
    return shared + [int(x) for x in np.random.RandomState(tail).randint(5, 390, 6)]


def _complete(url, prompt, stream=False):
    """(token ids, usage) of one greedy /v1/completions request sent with urllib (streamed: the final usage
    chunk's usage)."""
    body = dict(model="tiny", prompt=prompt, max_tokens=NEW, temperature=0, return_token_ids=True, stream=stream)
    if stream:
        body["stream_options"] = {"include_usage": True}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        if not stream:
            out = json.loads(r.read())
            return out["choices"][0]["token_ids"], out["usage"]
        ids, usage = [], None
        for line in r.read().decode().splitlines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                ids += c.get("token_ids") or []
        return ids, usage


@pytest.fixture(scope="module")
def servers(text_engine):
    """Two apps over the one tiny engine: 'cache' with a prefix cache of 64 blocks, 'plain' without (the batched
    whole prefill). Yields dict(cache=url, plain=url, pc=the PrefixCache)."""
    from lwm.serve import create_app

    engine, tok = text_engine["engine"], text_engine["tok"]
    pc = engine.prefix_cache(64 * engine.block_bytes(BLOCK), BLOCK)
    cached = create_app(engine, tok, model_name="tiny", max_batch_size=4, prefix_cache=pc)
    plain = create_app(engine, tok, model_name="tiny", max_batch_size=4)
    with running_server(cached) as a, running_server(plain) as b:
        yield dict(cache=a, plain=b, pc=pc)


def test_a_second_request_sharing_a_prefix_hits_and_answers_the_no_cache_tokens(servers):
    first, second = _prompt(1), _prompt(2)
    want = [_complete(servers["plain"], p)[0] for p in (first, second)]
    ids1, usage1 = _complete(servers["cache"], first)
    ids2, usage2 = _complete(servers["cache"], second)
    ids3, usage3 = _complete(servers["cache"], second, stream=True)
    assert usage1["prompt_tokens_details"]["cached_tokens"] == 0          # control: a cold cache
    assert usage2["prompt_tokens_details"]["cached_tokens"] == BLOCK      # the shared whole block
    assert usage3["prompt_tokens_details"]["cached_tokens"] == BLOCK      # the streamed usage chunk
    assert (ids1, ids2, ids3) == (want[0], want[1], want[1])
    assert len(want[0]) == NEW and want[0] != want[1]                     # the tails matter
    plain = _complete(servers["plain"], second)[1]
    assert plain["prompt_tokens_details"]["cached_tokens"] == 0           # no cache, no hits


def test_concurrent_requests_sharing_a_prefix_answer_the_no_cache_tokens(servers):
    prompts = [_prompt(10 + i, n=140 + 3 * i) for i in range(4)]
    want = [_complete(servers["plain"], p)[0] for p in prompts]
    for _ in range(2):                                  # cold (every one misses), then warm (every one hits)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda p: _complete(servers["cache"], p), prompts))
        assert [ids for ids, _ in got] == want
    assert all(u["prompt_tokens_details"]["cached_tokens"] == BLOCK for _, u in got)


def _jobs(tok, long_len=200):
    """Three short greedy streams of 60 tokens, then one long prompt of long_len ids."""
    from lwm.serve.jobs import Job, Sampling

    short = [Job([tok.bos_id] + list(range(10 + i, 20 + i)), Sampling(max_tokens=60, temperature=0.0), tok, None)
             for i in range(3)]
    ids = [tok.bos_id] + [int(x) for x in np.random.RandomState(7).randint(5, 390, long_len - 1)]
    return short + [Job(ids, Sampling(max_tokens=8, temperature=0.0), tok, None)]


def _serve_long_last(served, jobs, holder=None, check=True, **kwargs):
    """The short jobs start decoding; once each has a token, the long one arrives. Returns the scheduler.
    holder: a dict that gets it under "sched" first; check: assert that no job ended with an error."""
    from lwm.serve.scheduler import Scheduler

    sched = Scheduler(served, max_batch_size=4, batch_wait_s=0, steps_per_call=1, **kwargs)
    if holder is not None:
        holder["sched"] = sched
    for job in jobs[:-1]:
        sched.submit(job)
    sched.start()
    try:
        deadline = time.time() + 300
        while not all(j.tokens for j in jobs[:-1]):
            assert time.time() < deadline
            time.sleep(0.001)
        sched.submit(jobs[-1])
        assert all(job.done.wait(300) for job in jobs)
    finally:
        sched.stop()
    assert not check or all(j.error is None for j in jobs), [j.error for j in jobs]
    return sched


def test_a_chunked_long_prompt_interleaves_with_decoding_streams_and_keeps_the_tokens(text_engine):
    """200-token prompt in chunks of 16 (13 chunks) under the default budget (16 + 4 tokens per step: one chunk
    per step) while 3 streams decode: every job's tokens equal the whole-prefill scheduler's, and decode calls
    ran between the long prompt's chunks while the streams were still short of their budget. Control: a budget
    of 10,000 tokens runs all 13 chunks in one step, with no decode call between them."""
    from lwm.serve.model import ServedModel

    tok = text_engine["tok"]
    served = ServedModel(text_engine["engine"], tok, "tiny")
    whole = _jobs(tok)
    _serve_long_last(served, whole)
    chunked = _jobs(tok)
    sched = _serve_long_last(served, chunked, prefill_chunk=16)
    assert [j.tokens for j in chunked] == [j.tokens for j in whole]
    assert sched.max_step_tokens == 16 + 4 and sched.prefill_chunks == 3 + 13
    assert sched.decodes_amid_prefill >= 12, sched.decodes_amid_prefill       # one between every two chunks
    assert all(len(j.tokens) == 60 for j in chunked[:3])
    control = _jobs(tok)
    sched = _serve_long_last(served, control, prefill_chunk=16, max_step_tokens=10_000)
    assert [j.tokens for j in control] == [j.tokens for j in whole]
    assert sched.decodes_amid_prefill == 0


def test_bad_prefill_flags_are_one_line_before_anything_compiles(text_engine, monkeypatch):
    """`python -m lwm.serve`'s main with the model loaded (load_served stubbed with the tiny model on a fresh
    engine, sp = 2): a budget too small for one block, a block that is not a multiple of decode_chunk_size, a
    chunk that sp does not divide, a negative --max_step_tokens: each one line naming the flag, and nothing of
    the engine compiled. Control: good flags reach the server (stubbed uvicorn) with the cache and chunk."""
    from types import SimpleNamespace

    import uvicorn

    from lwm.inference.engine import Engine
    from lwm.parallel.sharding import make_mesh
    from lwm.serve import __main__ as serve_main
    from lwm.serve import loading

    tok = text_engine["tok"]
    engine = Engine(text_engine["model"], text_engine["params"], eos_id=tok.eos_id, pad_id=tok.pad_id,
                    vocab_size=tok.vocab_size)
    mesh = make_mesh("1,-1,1,2")
    monkeypatch.setattr(loading, "load_served", lambda config: (engine, tok, None, mesh))
    apps = []
    monkeypatch.setattr(uvicorn, "Server", lambda config: SimpleNamespace(run=lambda: apps.append(config.app)))
    cases = {("--prefix_cache_mb=1", "--prefix_cache_block=2560"):     # 1.25 MiB a block
             r"^--prefix_cache_mb=1 holds no block: one block of 2560 tokens takes 1\.25 MiB",
             ("--prefix_cache_block=100",): r"^--prefix_cache_block=100: must be a positive multiple of the model's "
                                            r"decode_chunk_size=128$",
             ("--prefill_chunk=33",): r"^--prefill_chunk=33: must be a positive multiple of the mesh's sp=2$",
             ("--max_step_tokens=-1",): r"^--max_step_tokens=-1: must be >= "}
    for flags, message in cases.items():
        with pytest.raises(ValueError, match=message) as info:
            serve_main.main(list(flags))
        assert "\n" not in str(info.value)
    assert not apps
    config = serve_main.get_default_config()
    config.max_step_tokens = -1                     # the real load_served checks it before loading anything
    with pytest.raises(ValueError, match=r"^--max_step_tokens=-1: must be >= 0$"):
        loading.check_flags(config)
    jits = (engine._prefill_jit, engine._chunk_jit, engine._step_jit, engine._insert_jit, engine._empty_jit)
    assert all(f._cache_size() == 0 for f in jits)
    serve_main.main(["--prefix_cache_mb=1", "--prefill_chunk=32", "--max_step_tokens=40"])
    app = apps.pop()
    while not hasattr(app, "state"):                # the Edge middleware wraps the FastAPI app
        app = app.app
    sched = app.state.scheduler
    assert sched.prefix_cache.budget_bytes == 2 ** 20 and sched.prefill_chunk == 32 and sched.max_step_tokens == 40


def test_a_short_prompt_is_not_held_behind_a_long_prompts_chunks(text_engine):
    """A 200-token prompt (13 chunks of 16) and a 11-token prompt admitted in the same step, the long one first
    in the queue: the short one's one chunk runs first (fewest tokens left first), so its first token comes
    before the long prompt's, and both answer the whole-prefill tokens. (In arrival order, the default budget
    of 20 tokens a step would hold the short chunk back until the long prompt's 13 chunks were done.)"""
    from lwm.serve.model import ServedModel
    from lwm.serve.scheduler import Scheduler

    tok = text_engine["tok"]
    served = ServedModel(text_engine["engine"], tok, "tiny")
    jobs = _jobs(tok)
    pair = [jobs[3], jobs[0]]                           # long first, then short
    sched = Scheduler(served, max_batch_size=4, batch_wait_s=0, steps_per_call=1, prefill_chunk=16)
    for job in pair:
        sched.submit(job)
    sched.start()
    try:
        assert all(job.done.wait(300) for job in pair)
    finally:
        sched.stop()
    assert pair[1].t_first < pair[0].t_first
    whole = _jobs(tok)
    _serve_long_last(served, whole)
    assert [j.tokens for j in pair] == [whole[3].tokens, whole[0].tokens]


def test_a_decode_fault_amid_a_chunked_prefill_resumes_every_job(text_engine, monkeypatch):
    """A decode step fails (after consuming its donated state) while the long prompt is part-way through its
    chunks: the streams are resumed from their tokens, the long prompt (in no decode call) is prefilled again
    from the queue, and every job ends with the fault-free tokens. Control: with fault_retries=0 the streams
    fail with a 500 and the long prompt, not part of the fault, is still answered."""
    from lwm.inference.engine import Engine
    from lwm.serve.model import ServedModel

    tok = text_engine["tok"]
    served = ServedModel(text_engine["engine"], tok, "tiny")
    want = _jobs(tok)
    _serve_long_last(served, want)
    real_step, holder, calls = Engine.step, {}, {"failed": 0}

    def step_fails_amid_prefill(self, state, *a, **kw):
        out = real_step(self, state, *a, **kw)
        sched = holder["sched"]
        if not calls["failed"] and sched.prefilling and sched.prefill_chunks >= 3 + 3:
            calls["failed"] += 1
            raise RuntimeError("XLA runtime fault (internal detail)")
        return out

    monkeypatch.setattr(Engine, "step", step_fails_amid_prefill)
    got = _jobs(tok)
    sched = _serve_long_last(served, got, holder=holder, prefill_chunk=16)
    assert calls["failed"] == 1 and sched.prefill_chunks > 3 + 13          # the long prompt started over
    assert [j.tokens for j in got] == [j.tokens for j in want]
    calls["failed"] = 0
    control = _jobs(tok)
    _serve_long_last(served, control, holder=holder, check=False, prefill_chunk=16, fault_retries=0)
    assert calls["failed"] == 1
    assert all(j.finish_reason == "error" and j.error.status == 500 for j in control[:3])
    assert control[3].error is None and control[3].tokens == want[3].tokens


def test_a_vision_prompt_hits_blocks_that_hold_its_image_codes(vision_engine):
    """A chat with a system prompt, a question and three images (3 x 65 vision ids from the tiny VQGAN) asked
    twice of a server with a prefix cache: the second time its first two blocks (256 tokens, the images' codes
    among them) come from the cache, and both answers are a server without the cache's."""
    from lwm.serve import create_app

    import base64
    import io

    from PIL import Image

    def png_url(seed):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), np.uint8)).save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    engine, tok, vqgan = vision_engine["engine"], vision_engine["tok"], vision_engine["vqgan"]
    pc = engine.prefix_cache(16 * engine.block_bytes(BLOCK), BLOCK)
    content = [{"type": "text", "text": "what is in the pictures"}] + [
        {"type": "image_url", "image_url": {"url": png_url(seed)}} for seed in range(3)]
    messages = [{"role": "system", "content": "you describe pictures for a world model " * 3},
                {"role": "user", "content": content}]
    apps = [create_app(engine, tok, model_name="v", vqgan=vqgan, max_n_frames=4, max_batch_size=1, prefix_cache=c)
            for c in (pc, None)]
    with running_server(apps[0]) as cached, running_server(apps[1]) as plain:
        out = []
        for url in (plain, cached, cached):
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
            r = client.chat.completions.create(model="v", messages=messages, max_tokens=NEW, temperature=0,
                                               extra_body={"return_token_ids": True})
            out.append((r.choices[0].model_extra["token_ids"], r.usage.prompt_tokens_details.cached_tokens,
                        len(r.model_extra["prompt_token_ids"])))
    (want, plain_hits, n), (first, hits1, _), (second, hits2, _) = out
    assert n > 2 * BLOCK and n - 3 * 65 < 2 * BLOCK      # fewer text ids than 256: the second block holds codes
    assert (plain_hits, hits1, hits2) == (0, 0, 2 * BLOCK)
    assert first == want and second == want and len(want) > 0


def test_warmup_compiles_the_chunked_serving_shapes(text_engine):
    """--warmup_prompt_lengths with chunked prefills: after start(), 20-token prompts (alone and four at once,
    greedy and top-p) compile nothing more (the chunk, insert, step and move counters of a fresh engine stay);
    a prompt of another bucket does (control); the tokens are the engine's greedy ones."""
    from lwm.inference.engine import Engine
    from lwm.serve.jobs import Job, Sampling
    from lwm.serve.model import ServedModel
    from lwm.serve.scheduler import Scheduler

    tok, src = text_engine["tok"], text_engine["engine"]
    engine = Engine(src.model, src.params, eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_size=tok.vocab_size)
    sched = Scheduler(ServedModel(engine, tok, "tiny"), max_batch_size=4, steps_per_call=2, prefill_chunk=16,
                      warmup_prompt_lengths=[20]).start()
    try:
        def compiled():
            return sum(f._cache_size() for f in (engine._chunk_jit, engine._empty_jit, engine._step_jit,
                                                 engine._insert_jit, engine._move_jit, engine._prefill_jit))

        def run(prompts, sampling):
            jobs = [Job(p, sampling, tok, None) for p in prompts]
            for job in jobs:
                sched.submit(job)
            assert all(job.done.wait(120) and job.error is None for job in jobs)
            return jobs

        rng = np.random.default_rng(0)
        prompts = [[tok.bos_id] + rng.integers(3, tok.vocab_size, 19).tolist() for _ in range(4)]
        before = compiled()
        assert before > 0
        alone = run(prompts[:1], Sampling(max_tokens=NEW, temperature=0.0))
        run(prompts, Sampling(max_tokens=NEW, temperature=1.0, top_p=0.9, seed=3))
        assert compiled() == before
        assert alone[0].tokens == src.generate(prompts[:1], NEW).tokens[0]
        run([[tok.bos_id] * 90], Sampling(max_tokens=NEW, temperature=0.0))   # another bucket: compiles
        assert compiled() > before
    finally:
        sched.stop()
