"""The one runner (lwm/evals/runner.py): the batch-size formula on its worked example, one padded shape per
group with filler rows dropped, records in sample order, the registry ("write a task; register it": a new
task runs through the runner into the report with no other change), and the structural rule that nothing
else in lwm/evals or the eval entry points batches, times, generates or writes reports (with a negative
control that a second loop is caught)."""
import ast
import dataclasses
import glob
import os

import pytest

from lwm.evals import report, runner

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_batch_rows_worked_example():
    assert runner.batch_rows(3000, 416, 16, data=2, n=9) == 6                  # the module docstring's example
    assert runner.batch_rows(3000, 416, 16, data=2, n=3) == 4                  # no more than the samples need
    assert runner.batch_rows(100, 416, 16, data=2, n=9) == 2                   # at least one per data shard
    assert runner.batch_rows(None, 5, 16, data=1, n=9, max_rows=4) == 4        # no token limit, a row cap
    assert runner.batch_rows(None, 5, 16, data=8, n=2, max_rows=4) == 8        # the cap never goes below data


class Recorder:
    """A stand-in backend: answers each prompt with its own last token; records every call's shape."""
    name, data_size = "recorder", 2

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def padded_length(self, n):
        return n + (-n % 8)

    def check_length(self, n, budget):
        if n + budget > 1000:
            raise ValueError(f"prompt of {n} tokens + {budget} > 1000")

    def generate(self, prompts, max_new_tokens, *, padded_length=None, vision=None):
        self.calls.append((len(prompts), padded_length, max_new_tokens))
        return [[p[-1]] * min(2, max_new_tokens) for p in prompts]


class Digits:
    def decode(self, ids):
        return " ".join(str(i) for i in ids)


@dataclasses.dataclass(frozen=True)
class EchoTask(runner.EvalTask):
    """A new eval written the documented way: a task (length, record) and nothing else."""

    def record(self, sample, response, new_tokens, prompt):
        out = {k: v for k, v in sample.items() if k != "prompt"}
        out.update(response=response, score=100.0 * (str(sample["want"]) in response))
        return out


def _samples():
    out = []
    for length in (10, 20):
        for i in range(5):
            n = length - i                                       # prompts of a group differ in length
            out.append(dict(task="echo", length=length, depth=float(25 * (i % 3)), index=i,
                            prompt=list(range(1, n + 1)), want=n if i != 4 else -1))
    return out


def test_one_shape_per_group_and_records_in_sample_order():
    task, backend = EchoTask("echo", max_new_tokens=4), Recorder(Digits())
    samples = _samples()
    records = runner.run(samples, backend, task, max_tokens_per_batch=100, progress=False)
    # 100 // (16 + 4) = 5 -> 4 rows (a multiple of data=2) for length 10; 100 // (24 + 4) = 3 -> 2 rows at 20.
    assert backend.calls == [(4, 16, 4), (4, 16, 4), (2, 24, 4), (2, 24, 4), (2, 24, 4)]
    assert [(r["length"], r["index"]) for r in records] == [(s["length"], s["index"]) for s in samples]
    assert [r["score"] for r in records] == [100.0] * 4 + [0.0] + [100.0] * 4 + [0.0]
    assert all("prompt" not in r and r["seconds"] >= 0 for r in records)
    summary = report.summarize(records)
    assert summary["tasks"]["echo"]["scores"] == {"10": 80.0, "20": 80.0}
    with pytest.raises(ValueError, match="prompt of 20 tokens"):                # checked before any call
        runner.run(samples, Recorder(Digits()), EchoTask("echo", max_new_tokens=990), progress=False)


class PrefixRecorder(Recorder):
    """A Recorder that says it caches prefixes, and records the prompts of each call in order."""
    prefix_cache = object()

    def generate(self, prompts, max_new_tokens, *, padded_length=None, vision=None):
        self.prompts = getattr(self, "prompts", []) + [list(p) for p in prompts]
        return super().generate(prompts, max_new_tokens, padded_length=padded_length, vision=vision)


def test_a_prefix_caching_backend_gets_each_group_in_prefix_order_and_records_stay_in_sample_order():
    """Prompts of one haystack with the needle (9) at three depths, two haystacks (1.. and 2..), in sample order
    depth-major: a prefix-caching backend gets each group sorted by prompt ids (the prompts sharing a haystack
    one after another), the records come back in sample order with the answers the plain backend gives."""
    task = EchoTask("echo", max_new_tokens=2)
    samples = []
    for depth in (0, 1, 2):
        for hay in (1, 2):
            ids = [hay * 10 + k for k in range(4)]
            samples.append(dict(task="echo", length=10, depth=depth, hay=hay, want=0,
                                prompt=[5] + ids[:depth] + [9] + ids[depth:]))
    plain, cached = Recorder(Digits()), PrefixRecorder(Digits())
    want = runner.run(samples, plain, task, max_tokens_per_batch=None, progress=False)
    got = runner.run(samples, cached, task, max_tokens_per_batch=None, max_rows=2, progress=False)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in got] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in want]
    assert cached.prompts == sorted(s["prompt"] for s in samples)
    assert [p[1] // 10 for p in cached.prompts if p[1] != 9] == [1, 1, 2, 2]       # a haystack's prompts together
    assert [s["prompt"] for s in samples] != cached.prompts                          # control: the order changed


def test_a_registered_task_runs_through_the_runner_into_the_report(tmp_path):
    from lwm.evals import needle, suite, visual  # noqa: F401  (importing a task module registers its tasks)

    builtin = dict(runner.TASKS)
    assert {"needle", "needle_multi", "visual_needle", "niah_single_noise", "vt", "cwe", "fwe", "coref"} <= set(builtin)
    with pytest.raises(ValueError, match="registered twice"):
        runner.register(EchoTask("needle"))
    task = runner.register(EchoTask("echo_test_only"))
    try:
        samples = [dict(s, task="echo_test_only") for s in _samples()]
        records = runner.run(samples, Recorder(Digits()), runner.TASKS, max_tokens_per_batch=100, progress=False)
        summary = report.write_results(str(tmp_path), records, dict(model="recorder"))
        assert summary["tasks"]["echo_test_only"]["effective_length"] is None          # 80 < 85.6
        assert (tmp_path / "plots" / "echo_test_only.png").read_bytes()[:4] == b"\x89PNG"
        assert runner.TASKS["echo_test_only"] is task
    finally:
        del runner.TASKS["echo_test_only"]


# ------------------------------------------------------------------------------- the one runner, structurally

FORBIDDEN = {                          # call -> the one module allowed to make it
    "generate": {"lwm/evals/runner.py", "lwm/evals/backends.py"},
    "perf_counter": {"lwm/evals/runner.py", "lwm/eval_long.py"},     # eval_long times building its prompts
    "savefig": {"lwm/evals/report.py"},
    "dump": {"lwm/evals/report.py"},
    "tqdm": {"lwm/evals/runner.py"},
}


def second_loops(path: str, source: str) -> list[str]:
    """'path: call' for each call of FORBIDDEN made outside the module allowed to make it."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name in FORBIDDEN and path not in FORBIDDEN[name]:
                found.append(f"{path}: {name}")
    return found


def test_one_runner_is_the_only_batching_loop():
    """No module of lwm/evals, no eval entry point and no needle script generates, times, shows progress or
    writes a report but the runner, the backends and the report."""
    paths = sorted(glob.glob(os.path.join(ROOT, "lwm", "evals", "*.py")) +
                   glob.glob(os.path.join(ROOT, "lwm", "eval_*.py")) +
                   glob.glob(os.path.join(ROOT, "scripts", "eval_needle*.py")))
    assert len(paths) >= 15
    found = []
    for p in paths:
        with open(p) as f:
            found += second_loops(os.path.relpath(p, ROOT), f.read())
    assert found == []
    # Negative control: the loop that lwm/evals/visual.py had before it became a task is caught.
    old_visual = ("def run(samples, engine):\n    t0 = time.perf_counter()\n"
                  "    out = engine.generate(prompts, 16)\n")
    assert second_loops("lwm/evals/visual.py", old_visual) == ["lwm/evals/visual.py: perf_counter",
                                                               "lwm/evals/visual.py: generate"]


def test_prefix_cache_settings_follow_the_flags_and_say_once_what_does_not_apply():
    from ml_collections import ConfigDict

    from lwm.evals.backends import prefix_cache_settings
    from lwm.inference import runtime

    class Engine:                                     # stands in for lwm.inference.engine.Engine
        def __init__(self, data):
            self.mesh_sizes = lambda: (data, 1)

        def check_chunking(self, chunk, prefix_cache=False):
            pass

        def prefix_cache(self, budget_bytes=None, block_size=None):
            return ("cache", budget_bytes, block_size)

    def flags(**kw):
        c = runtime.runtime_flags(ConfigDict(), tokenizer="")
        c.update(kw)
        return c

    said = []
    assert prefix_cache_settings(Engine(1), flags(), said.append) == (("cache", None, None), None) and not said
    assert prefix_cache_settings(Engine(8), flags(), said.append) == (None, None)
    assert len(said) == 1 and "dp x fsdp = 8" in said[0] and "--prefix_cache_mb" in said[0]
    assert prefix_cache_settings(Engine(8), flags(prefix_cache_mb=16, prefill_chunk=64), said.append) == \
        (("cache", 16 << 20, None), 64) and len(said) == 1
    assert prefix_cache_settings(Engine(8), flags(prefix_cache_mb=0), said.append) == (None, None)
    runtime.unused_cache_flags(flags(), "the PyTorch path", said.append)
    assert len(said) == 1                                        # the defaults: nothing to say
    runtime.unused_cache_flags(flags(prefill_chunk=64, prefix_cache_mb=0), "the PyTorch path", said.append)
    assert said[1] == "--prefix_cache_mb=0, --prefill_chunk=64: not used by the PyTorch path"
