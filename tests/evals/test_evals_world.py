"""World QA (lwm/evals/world.py): the scoring rule on its worked examples, and the task through the one
runner with the real VQGAN encode and chat template: a backend that answers with the oracle scores 100%, one
that answers at random scores near chance, and a backend that always answers one choice scores what the
data says it should."""
import numpy as np
import pytest

from lwm.data import world as w
from lwm.evals import runner
from lwm.evals import world as world_eval

CFG = w.WorldConfig(resolution=32, n_frames=2, max_objects=2)


def test_choice_score_worked_examples():
    colours = ["red", "green", "blue"]
    assert world_eval.choice_score("Red.", colours, "red") == 100.0
    assert world_eval.choice_score("It is blue, not red", colours, "red") == 0.0
    assert world_eval.choice_score("I don't know", colours, "red") == 0.0
    assert world_eval.choice_score("redish", colours, "red") == 0.0             # whole words only
    events = ["the red circle appeared", "the blue square turned green"]
    assert world_eval.choice_score("The red circle appeared first.", events, events[0]) == 100.0


class _Tok:
    """Characters as ids (ids 3..), so the stub backends can read the question back from the prompt."""
    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text):
        return [3 + ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i >= 3)


class _Stub:
    """A backend (lwm.evals.backends protocol) answering each prompt's question with `answer(question)`."""
    name, data_size = "stub", 1

    def __init__(self, answer, samples):
        self.tokenizer, self.answer = _Tok(), answer
        self.seen_vision = 0

    def padded_length(self, n):
        return n

    def check_length(self, n, m):
        pass

    def generate(self, prompts, max_new_tokens, *, padded_length=None, vision=None):
        out = []
        for ids, mask in zip(prompts, vision):
            self.seen_vision += int(np.sum(mask))
            text = self.tokenizer.decode([i for i, v in zip(ids, mask) if not v])
            question = text.split("USER: ", 1)[1].split("\n", 1)[0]
            out.append(self.tokenizer.encode(self.answer(question)))
        return out


@pytest.fixture(scope="module")
def vqgan():
    from lwm.model.vqgan import VQGAN, VQGANConfig

    return VQGAN.load(None, VQGANConfig.load("tiny"), seed=0)


def test_world_qa_through_the_runner(vqgan):
    samples = (world_eval.build_samples(12, 0, CFG) + world_eval.build_samples(6, 0, CFG, image=True))
    by_question = {}
    for s in samples:
        by_question.setdefault(s["question"], set()).add(s["answers"][0])
    scenes = {(s["task"], s["seed"]): w.sample_scene(s["seed"], CFG, "test", image=s["task"] == "world_image_qa")
              for s in samples}
    tasks = {t.name: t.with_models(vqgan, _Tok()) for t in (world_eval.WORLD_VIDEO_QA, world_eval.WORLD_IMAGE_QA)}
    # The oracle backend: reads the scene of the sample being asked (the stub answers in sample order).
    order = iter(samples)

    def oracle(question):
        s = next(order)
        assert s["question"] == question
        return w.oracle(scenes[(s["task"], s["seed"])], question) + "."

    stub = _Stub(oracle, samples)
    records = runner.run(samples, stub, tasks, max_rows=1, progress=False)
    per_frame = (CFG.resolution // 4) ** 2 + 1                       # tiny VQGAN: 8 x 8 codes + end of frame
    assert stub.seen_vision == sum(s["length"] * per_frame for s in samples)
    assert [r["score"] for r in records] == [100.0] * len(samples)
    rows = world_eval.summary_by_kind(records)
    assert {r["task"] for r in rows} == {"world_video_qa", "world_image_qa"}
    assert all(r["accuracy"] == 100.0 and 0 < r["chance"] <= 50 for r in rows)
    # Control: a random answerer scores near chance, and "one" to every question only the counts it gets.
    rng = np.random.default_rng(0)
    choices = {s["question"]: s["choices"] for s in samples}
    records = runner.run(samples, _Stub(lambda q: str(rng.choice(choices[q])), samples), tasks, max_rows=1,
                         progress=False)
    acc = np.mean([r["score"] for r in records])
    chance = np.mean([100 / len(s["choices"]) for s in samples])
    assert abs(acc - chance) < 15, (acc, chance)
    records = runner.run(samples, _Stub(lambda q: "one", samples), tasks, max_rows=1, progress=False)
    assert np.mean([r["score"] for r in records]) == pytest.approx(
        100 * np.mean([s["answers"][0] == "one" for s in samples]))
