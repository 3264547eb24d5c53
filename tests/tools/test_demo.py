"""The main job (`lwm.demo`) end to end at a toy size: curriculum -> lwm.train (ring, 4 simulated devices)
-> checkpoint -> scripts/eval_needle.py -> JSON + heatmap; plus the curriculum's content and held-out split."""
import json
import os
import random
import re

import pytest

from lwm import demo
from lwm.evals import needle

WORDS = ("time market people idea startup money work company reason question problem answer river house "
         "thing world school friend night letter garden window paper").split()


def documents(n_docs, sentences, seed):
    rng = random.Random(seed)
    out = []
    for d in range(n_docs):
        text = " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                        for _ in range(sentences))
        out.append(f"Document {d}. " + text + "\n")
    return out


@pytest.fixture(scope="module")
def haystack(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "haystack.jsonl"
    with open(path, "w") as f:
        for doc in documents(10, 60, 0):
            f.write(json.dumps({"text": doc}) + "\n")
    return path


def test_curriculum_examples_and_split(haystack, tmp_path):
    train, val, eval_path = demo.split_haystack(str(haystack), 2, 1, str(tmp_path))
    assert len(train) == 7 and len(val) == 1 and val[0].startswith("Document 2.")
    assert [json.loads(line)["text"][:11] for line in open(eval_path)] == ["Document 0.", "Document 1."]
    tok = demo.make_tokenizer(train, str(tmp_path / "tok.model"), 400)
    pieces = [tok.decode([i]).strip() for i in tok.encode("0123456789")]
    assert [p for p in pieces if p] == list("0123456789")                          # digits are single tokens
    stream = [t for doc in train for t in tok.encode(doc)]
    path = demo.write_curriculum(str(tmp_path / "c.jsonl"), stream, tok, 200, (10, 120), 0.5, seed=0,
                                 digits=(7, 9), progress=False)
    rows = [json.loads(line) for line in open(path)]
    needles = [r for r in rows if r["fields"] == "[prompt],answer"]
    passages = [r for r in rows if r["fields"] == "text"]
    assert 60 < len(needles) < 140 and len(needles) + len(passages) == 200
    for r in needles:
        assert r["answer"].isdigit() and 7 <= len(r["answer"]) <= 9
        city = r["prompt"].split("What is the special magic ")[1].split(" number?")[0]
        assert f"The special magic {city} number is: {r['answer']}\n" in r["prompt"]
        assert r["prompt"].startswith("You are a helpful assistant. USER: ") and r["prompt"].endswith("ASSISTANT: ")
    text = " ".join(r.get("prompt", r.get("text")) for r in rows)
    assert "Document 0." not in text and "Document 2." not in text     # eval and validation text held out
    # Decoys: other numbers scattered in the haystack; the needle's number stays the answer.
    decoyed = demo.needle_example(random.Random(0), stream, 100, tok, needle.period_token_ids(tok), decoys=1.0)
    context = decoyed["prompt"].split("USER: ")[1].split(" What is the special")[0]
    assert len(re.findall(r"\d+", context)) >= 2 and decoyed["answer"] in context
    # The haystack grows along the file: late needle prompts are longer than early ones.
    lengths = [len(tok.encode(r["prompt"])) for r in needles]
    assert sum(lengths[-20:]) - sum(lengths[:20]) > 20 * 20    # 20+ more haystack tokens each, on average


def test_stage_flags():
    assert demo.parse_stages("256:4:3:0:50:3e-3") == ((256, 4, 3, (0, 50), 3e-3),)
    assert demo.parse_stages("") == demo.STAGES
    with pytest.raises(ValueError, match="seq:batch:steps:min:max:lr"):
        demo.parse_stages("256:4:3")


@pytest.mark.slow
def test_demo_end_to_end(haystack, tmp_path):
    work = tmp_path / "out"
    summary = demo.main([f"--haystack_file={haystack}", f"--workdir={work}", "--stages=256:4:3:0:40:3e-3",
                         "--eval_documents=2", "--val_documents=1", "--vocab_size=400", "--eval_examples=8",
                         "--context_lengths=300:300:1", "--depths=2", "--n_rounds=1", "--max_digits=8"])
    results = json.loads(open(summary["results"]).read())
    assert len(results) == 2 and {r["depth_percent"] for r in results} == {0.0, 100.0}
    assert all(r["context_length"] == 300 and len(r["answer"]) == 7 for r in results)
    assert open(summary["heatmap"], "rb").read(4) == b"\x89PNG"
    assert summary["checkpoint"].startswith("params::") and os.path.exists(summary["checkpoint"][8:])
    metrics = [json.loads(line) for line in open(work / "train" / "stage0" / "metrics.jsonl")]
    assert metrics[0]["step"] == 0 and "eval_loss" in metrics[0]
    assert json.loads(open(work / "summary.json").read())["trials"] == 2
    # Scored here independently of lwm.evals.needle: a trial is right when the response contains the number.
    assert all(r["correct"] == (r["answer"] in r["response"]) for r in results)
    assert summary["accuracy"] == sum(r["answer"] in r["response"] for r in results) / len(results)
    # Three training steps cannot retrieve a 7-digit number from 300 tokens: a right answer here would mean the
    # number leaks into what is scored (the prompt echoed into the response, say).
    assert summary["accuracy"] == 0.0
