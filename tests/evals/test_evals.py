"""The long-context suite (lwm/evals): deterministic generators, the scoring rules on their worked examples, an
oracle that reads each answer from the prompt by rule (100 on every task) and a random answerer (about 0),
prompts that fit their lengths, and the effective length."""
import json
import random
import re

import pytest

from lwm.evals import report, runner, suite, vocab
from lwm.evals.haystack import Haystack, essay_haystack, split_sentences
from lwm.evals.scoring import match_all
from lwm.evals.tasks import insert_at_depths
from lwm.text.tokenizer import train_sentencepiece

ESSAY = ("Startups grow fast. Most of them die young! Why do founders keep going? They like the work. "
         "A good idea looks bad at first. Money matters less than people think.\n\n")


@pytest.fixture(scope="module")
def evals_tok(tmp_path_factory):
    """500 pieces trained on the essay, the eval vocabulary and one prompt of four tasks (not the shared `tok`:
    the tasks' words, digits and uuids must be pieces of it)."""
    d = tmp_path_factory.mktemp("evals_tok")
    texts = [ESSAY * 5, " ".join(vocab.WORDS), "The grass is green. The sky is blue. VAR ABCDE = 12345."]
    texts += [suite.text_tasks()[n].make(0, 20, 50.0, Haystack(split_sentences(ESSAY), "e"))["message"]
              for n in ("niah_multikey_uuid", "cwe", "coref", "vt")]
    return train_sentencepiece(texts, str(d / "tokenizer.model"), 500)


@pytest.fixture(scope="module")
def essays(tmp_path_factory):
    path = tmp_path_factory.mktemp("evals_hay") / "essays.jsonl"
    path.write_text("".join(json.dumps({"text": ESSAY * 20}) + "\n" for _ in range(3)))
    return essay_haystack(str(path))


def test_generators_are_deterministic(evals_tok, essays):
    tasks = list(suite.text_tasks().values())
    a = suite.build_samples(tasks, evals_tok, [800, 1200], [0, 100], 1, seed=3, haystack=essays)
    b = suite.build_samples(tasks, evals_tok, [800, 1200], [0, 100], 1, seed=3, haystack=essays)
    assert a == b and len(a) == len(tasks) * 2 * 2
    c = suite.build_samples(tasks, evals_tok, [800, 1200], [0, 100], 1, seed=4, haystack=essays)
    assert sum(x["prompt"] != y["prompt"] for x, y in zip(a, c)) == len(a)      # another seed, other samples
    for s in a:
        assert s["length"] * 0.6 < s["prompt_tokens"] <= s["length"], (s["task"], s["prompt_tokens"])
        assert s["prompt"][0] == evals_tok.bos_id
        assert evals_tok.decode(s["prompt"][1:]).startswith("You are a helpful assistant. USER: ")
        assert evals_tok.decode(s["prompt"]).endswith(" ASSISTANT:")


def test_scoring_rules_on_their_worked_examples():
    assert match_all("The numbers are 8848 and 4321.", ["8848", "1234"]) == 50.0
    assert match_all("MEADOW, lamp", ["meadow", "lamp"]) == 100.0
    assert match_all("anything", []) == 0.0
    assert match_all("The numbers are 8848, 1234 and 7070.", ["8848", "1234", "5555", "7070"]) == 75.0   # multivalue
    assert round(match_all("QXZRT, HBEWA", ["QXZRT", "HBEWA", "LMNOP"]), 1) == 66.7                       # vt
    common = ["dakumo", "sheli", "trovi", "pala", "mipe", "zoru", "kale", "bira", "nefo", "tusa"]
    assert match_all(" ".join(common[:7]) + " gorp", common) == 70.0                                       # cwe
    assert round(match_all("dakumo trovi", ["dakumo", "sheli", "trovi"]), 1) == 66.7                        # fwe
    assert match_all("trovi-pala-1093", ["trovi-pala-1093"]) == 100.0                                      # coref
    assert match_all("dakumo-sheli-4821", ["trovi-pala-1093"]) == 0.0
    assert report.effective_length({1024: 92.0, 2048: 86.0, 4096: 70.0, 8192: 88.0}) == 2048
    assert report.effective_length({1024: 80.0, 2048: 90.0}) is None
    assert insert_at_depths(["a", "b", "c", "d"], [("N", 50)]) == ["a", "b", "N", "c", "d"]
    assert split_sentences("A b. C d? 你好。再见。") == ["A b.", "C d?", "你好。", "再见。"]


class Answerer:
    """A stand-in model: reads the message back from the prompt and answers by rule (oracle) or at random."""

    data_size = 1

    def __init__(self, tok, mode):
        self.tokenizer, self.mode, self.name, self.rng = tok, mode, mode, random.Random(0)

    def padded_length(self, n):
        return n

    def check_length(self, n, budget):
        pass

    def generate(self, prompts, max_new_tokens, padded_length=None, vision=None):
        outs = []
        for p in prompts:
            text = self.tokenizer.decode(p)
            message = re.search(r"USER: (.*) ASSISTANT:$", text, re.S).group(1)
            task = next(t for t in suite.text_tasks().values() if t.name == self.current(message))
            answer = task.oracle(message) if self.mode == "oracle" else task.random_answer(self.rng)
            outs.append(self.tokenizer.encode(answer))
        return outs

    def current(self, message):
        return self.by_message[message]


@pytest.fixture(scope="module")
def samples(evals_tok, essays):
    return suite.build_samples(list(suite.text_tasks().values()), evals_tok, [800, 1600], [0, 100], 1, seed=1,
                               haystack=essays)


def _run(tok, samples, mode):
    backend = Answerer(tok, mode)
    backend.by_message = {s["message"]: s["task"] for s in samples}
    return runner.run(samples, backend, suite.text_tasks(), max_tokens_per_batch=4000, progress=False)


def test_oracle_scores_100_on_every_task_and_random_about_0(evals_tok, samples, tmp_path):
    records = _run(evals_tok, samples, "oracle")
    summary = report.summarize(records)
    assert set(summary["tasks"]) == set(suite.text_tasks())
    for name, v in summary["tasks"].items():
        assert v["scores"] == {"800": 100.0, "1600": 100.0}, name
        assert v["effective_length"] == 1600
    assert summary["effective_length"] == 1600
    random_records = _run(evals_tok, samples, "random")
    rsum = report.summarize(random_records)
    assert all(s < 5.0 for s in rsum["average"].values()), rsum["average"]
    assert rsum["effective_length"] is None
    # JSON, table and plots (a heatmap for a depth task, a line for another)
    out = report.write_results(str(tmp_path / "out"), records, dict(model="oracle"), plots=False)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(out)) and len(saved["records"]) == len(records)
    assert "**average**" in (tmp_path / "out" / "summary.md").read_text()
    for name in ("niah_multivalue", "cwe"):
        path = report.plot_task(records, name, str(tmp_path / "out" / "plots" / f"{name}.png"))
        assert open(path, "rb").read()[:4] == b"\x89PNG"


def test_needles_sit_at_their_depth_and_distractors_differ(evals_tok, essays):
    task = suite.text_tasks()["niah_multikey_essay"]
    for depth in (0.0, 50.0, 100.0):
        s = suite.fit_sample(task, evals_tok, 900, 7, depth, essays)
        context = s["message"].split("\n", 1)[1].rsplit("\n", 1)[0]
        key = s["meta"]["keys"][0]
        where = context.index(f"for {key} is:") / len(context)
        assert abs(where - depth / 100) < 0.15, (depth, where)
        assert len(s["meta"]["distractor_keys"]) == 3 and key not in s["meta"]["distractor_keys"]
        assert context.count("special magic numbers for") == 4


def test_bad_flags_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown task"):
        suite.select_tasks("vt,nope")
    with pytest.raises(ValueError, match="too short"):
        suite.fit_sample(suite.text_tasks()["cwe"], _CharTok(), 20, 0, None, None)
    with pytest.raises(ValueError, match="needs an essay haystack"):
        suite.build_samples([suite.text_tasks()["niah_single_essay"]], _CharTok(), [500], [0], 1, 0)


class _CharTok:
    bos_id, eos_id = 1, 2

    def encode(self, text):
        return [ord(c) % 250 + 3 for c in text]
