"""`python -m lwm.serve` across hosts (lwm.serve.replicated): two processes of two CPU devices each over loopback
(--jax_distributed.*; process 0 serves HTTP, process 1 follows its engine calls) answer greedy completions
with the same token ids as one process of four devices, with --mesh_dim=1,1,1,4 and ring attention: the KV
cache is sharded over sp across the two processes, and the long prompt's tokens sit in both halves of it.
Both servers run with the default prefix cache (--prefix_cache_mb=-1: every prompt is prefilled in chunks,
each process holding its own copy of the cache, process 0's budget): a prompt that shares 260 tokens with an
earlier one reports the same cached_tokens (two 128-token blocks) from both and the same tokens.
Negative controls: the follower's engine sees the last prompt's ids shifted by one (its engine's prefill entry
points wrapped in its process; the other prompts pass unchanged), and process 0 answers that prompt with other
tokens than one process does, so the comparison can fail and the follower's shards feed the answer; a follower
started with another flag is refused by both processes in one line."""
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from support import cpu_subprocess_env, free_port

# Two prompts padded to 512 slots of the 772-slot cache (max_sequence_length 512 + the bucket slack): their
# tokens sit in slots 212..511 and 232..511, across the cut at 386 between the processes' sp shards.
# "shared" repeats a's first 260 tokens (two whole blocks of the prefix cache); "control" comes last (the
# follower's shifted copy of it stores other blocks than process 0's: no later prompt may look them up).
PROMPTS = {"a": [3 + (7 * i) % 390 for i in range(300)], "b": [3 + (11 * i) % 390 for i in range(280)],
           "shared": [3 + (7 * i) % 390 for i in range(260)] + [3 + (17 * i) % 390 for i in range(30)],
           "control": [2] + [3 + (13 * i) % 390 for i in range(290)]}     # id 2 first: the follower shifts it
BLOCK = 128                   # the tiny preset's decode_chunk_size: the default prefix-cache block
MAX_TOKENS = 8
# The follower: lwm.serve with the same flags, its engine's prefills wrapped so that a prompt that starts with
# id 2 is prefilled with every id shifted by one (only "control" does; the others pass as they are).
TAMPER = """
import sys
from lwm.inference.engine import Engine
from lwm.serve.__main__ import get_default_config, main, __doc__ as doc
from lwm.cli.command import cli
shift = lambda ids: [(i + 1) % 390 + 3 for i in ids]
_batch, _start = Engine.prefill_batch, Engine.start_prefill
def prefill_batch(self, prompts, *a, **k):                      # the whole, batched prefill
    return _batch(self, [shift(p) if p and p[0] == 2 else p for p in prompts], *a, **k)
def start_prefill(self, prompt, *a, **k):                       # the chunked prefill (with the prefix cache)
    return _start(self, shift(prompt) if prompt and prompt[0] == 2 else prompt, *a, **k)
Engine.prefill_batch, Engine.start_prefill = prefill_batch, start_prefill
sys.exit(cli("lwm.serve", main, get_default_config, doc))
"""


def flags(d, port):
    return ["--load_llama_config=tiny", "--mesh_dim=1,1,1,4",
            "--update_llama_config=dict(attention_impl='ring', max_sequence_length=512)",
            f"--load_checkpoint=params::{d}/params", f"--tokenizer={d}/tokenizer.model", f"--port={port}",
            "--max_batch_size=1", f"--decode_steps_per_call={MAX_TOKENS}"]   # few shapes: few compiles


def dist(port, pid):
    return ["--jax_distributed.initialize_jax_distributed=True",
            f"--jax_distributed.coordinator_address=127.0.0.1:{port}",
            "--jax_distributed.num_processes=2", f"--jax_distributed.process_id={pid}"]


def start(cmd, d, devices):
    return subprocess.Popen(cmd, env=cpu_subprocess_env(d, devices), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_healthy(port, procs, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a server exited with {p.returncode}: {p.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("the server did not come up")


def complete(port, prompt):
    body = json.dumps({"model": "lwm-text", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
                       "return_token_ids": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=240) as r:
            out = json.loads(r.read())
            return out["choices"][0]["token_ids"], out["usage"]["prompt_tokens_details"]["cached_tokens"]
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{e}: {e.read()[:2000]}") from None


def answers(port):
    """{prompt name: (the token ids of its greedy completion, its cached prompt tokens)}, one request after the
    other."""
    return {k: complete(port, p) for k, p in PROMPTS.items()}


def stop(procs):
    """SIGTERM to process 0: it stops as on Ctrl-C (exit status 130) and its followers return (0) by themselves."""
    procs[0].send_signal(signal.SIGTERM)
    errs = []
    for p, status in zip(procs, (130, 0)):
        _, err = p.communicate(timeout=120)
        errs.append(err)
        assert p.returncode == status, err[-3000:]
    return errs


def kill(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def pair(d):
    """Process 0 (`python -m lwm.serve`) and its follower (TAMPER), each with two CPU devices."""
    http, coord = free_port(), free_port()
    procs = [start([sys.executable, "-m", "lwm.serve", *flags(d, http), *dist(coord, 0)], d, 2),
             start([sys.executable, "-c", TAMPER, *flags(d, free_port()), *dist(coord, 1)], d, 2)]
    return http, procs


@pytest.mark.slow
def test_two_processes_answer_what_one_process_answers(golden_workdir):
    d = golden_workdir
    t0 = time.time()
    one_port, procs = free_port(), []
    try:                                                # every server is killed if anything fails
        one = start([sys.executable, "-m", "lwm.serve", *flags(d, one_port)], d, 4)
        procs.append(one)
        http, two = pair(d)
        procs += two
        wait_healthy(one_port, [one])
        wait_healthy(http, two)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:         # both compile at once
            single, multi = pool.map(answers, (one_port, http))
        one.kill()
        one.wait()
        errs = stop(two)
    finally:
        kill(procs)
    assert [len(v[0]) for v in single.values()] == [MAX_TOKENS] * len(PROMPTS), single
    for k in ("a", "b", "shared"):
        assert multi[k] == single[k], (k, multi, single)             # tokens and cached tokens alike
    assert single["a"][0] != single["b"][0] and single["a"][1] == 0   # control: a cold cache
    assert single["shared"][1] == 2 * BLOCK, single                   # the prefix cache is on and hits
    assert multi["control"][0] != single["control"][0], (multi, single)   # the follower's shards matter
    assert "process 0 stopped after" in errs[1] and "after 0 engine calls" not in errs[1], errs[1][-2000:]
    print(f"one server and a pair: {time.time() - t0:.1f} s")


def test_a_follower_with_other_flags_is_refused_in_one_line(golden_workdir):
    d = golden_workdir
    http, coord = free_port(), free_port()
    cmd = [sys.executable, "-m", "lwm.serve", *flags(d, http)]
    procs = [start(cmd + dist(coord, 0), d, 2), start(cmd + ["--seed=5"] + dist(coord, 1), d, 2)]
    try:
        for p in procs:
            _, err = p.communicate(timeout=240)
            assert p.returncode == 2, err[-3000:]
            lines = [x for x in err.strip().splitlines() if not x.startswith(("[Gloo]", "WARNING", "I0000", "E0000"))]
            assert len(lines) == 1 and "process 1: --seed" in lines[0] and "Traceback" not in err, err[-3000:]
    finally:
        kill(procs)
