"""The synthetic video-language world (lwm.data.world): deterministic, answers right by construction (an
oracle reading the scene's state scores 100%, a random answerer near chance), held-out combinations kept out
of training, the pixel rules on worked examples and on ground-truth frames, and records the vision-text
processor reads."""
import numpy as np
import pytest

from lwm.data import world as w

CFG = w.WorldConfig(resolution=32, n_frames=4, max_objects=3)


@pytest.fixture(scope="module")
def scenes():
    return ([w.sample_scene(i, CFG, "train") for i in range(600)] + [w.sample_scene(i, CFG, "test") for i in range(200)]
            + [w.sample_scene(i, CFG, "train", image=True) for i in range(200)])


def test_deterministic_from_the_seed():
    a, b = w.sample_scene(7, CFG), w.sample_scene(7, CFG)
    assert a == b and np.array_equal(w.render(a, 32), w.render(b, 32))
    assert w.sample_scene(8, CFG) != a                              # control: another seed, another scene
    assert w.sample_scene(7, CFG, "test") != a


def test_oracle_scores_100_and_random_answerer_near_chance(scenes):
    qas = [(s, q) for s in scenes for q in w.questions(s)]
    assert len(qas) > 3000 and {q.kind for _, q in qas} == {"count", "shape", "colour", "final_colour",
                                                             "direction", "first"}
    assert all(w.oracle(s, q.question) == q.answer for s, q in qas)
    rng = np.random.default_rng(0)
    random_acc = np.mean([q.choices[rng.integers(len(q.choices))] == q.answer for _, q in qas])
    assert abs(random_acc - w.chance([q for _, q in qas])) < 0.03, random_acc
    # Control: the oracle asked about another scene's questions is far from 100% (it reads the state).
    shifted = [(scenes[(i + 1) % len(scenes)], q) for i, s in enumerate(scenes) for q in w.questions(s)]
    right = 0
    for s, q in shifted:
        try:
            right += w.oracle(s, q.question) == q.answer
        except ValueError:                                          # names an object the scene lacks
            pass
    assert right / len(shifted) < 0.6


def test_held_out_pairs_only_in_test(scenes):
    held = set(CFG.held_out)
    for s in scenes:
        shown = {(o.shape, o.colour_at(t)) for o in s.objects for t in range(s.n_frames) if o.visible(t)}
        assert bool(shown & held) == (s.split == "test"), s


def test_render_worked_example():
    scene = w.Scene((w.Obj("square", "red", "large", 0.5, 0.5, "right", 0.1),), 3, 0, "train")
    frames = w.render(scene, 20)
    assert frames.shape == (3, 20, 20, 3) and frames.dtype == np.uint8
    # half-size 0.24 of 20 px: pixel centres 5.5/20 .. 14.5/20 at frame 0 -> columns 5..14, rows 5..14
    mask = (frames[0] == w.PALETTE["red"]).all(-1)
    assert mask.sum() == 100 and mask[5:15, 5:15].all()
    assert (frames[2] == w.PALETTE["red"]).all(-1)[5:15, 9:19].all()       # moved 0.2 * 20 = 4 px right
    assert tuple(frames[0, 0, 0]) == w.BACKGROUND


def test_pixel_rules_on_worked_examples_and_ground_truth(scenes):
    for shape in w.SHAPES:
        for colour in w.COLOURS:
            frame = w.render(w.Scene((w.Obj(shape, colour, "large", 0.5, 0.5),), 1, 0, "train"), 32)[0]
            assert (w.read_shape(frame), w.read_colour(frame)) == (shape, colour)
    still = w.render(w.Scene((w.Obj("circle", "red", "small", 0.5, 0.5),), 4, 0, "train"), 32)
    assert w.read_direction(still) is None
    blank = np.zeros((32, 32, 3), np.uint8) + np.asarray(w.BACKGROUND, np.uint8)
    assert w.read_colour(blank) is None and w.read_shape(blank) is None
    # On ground-truth frames of one-object scenes, each rule's own accuracy (what evaluations report).
    single = [s for s in scenes if len(s.objects) == 1]
    first = [(s, w.render(s, 32)[s.objects[0].first_seen(s.n_frames)]) for s in single]
    assert np.mean([w.read_colour(f) == s.objects[0].colour for s, f in first]) == 1.0
    assert np.mean([w.read_shape(f) == s.objects[0].shape for s, f in first]) == 1.0
    moving = [s for s in single if s.objects[0].direction and not s.objects[0].event]
    assert len(moving) > 20
    assert np.mean([w.read_direction(w.render(s, 32)) == s.objects[0].direction for s in moving]) == 1.0
    # Control: the rules read a wrong answer off a mislabelled frame (a square is not read as a circle).
    sq = w.render(w.Scene((w.Obj("square", "blue", "large", 0.5, 0.5),), 1, 0, "train"), 32)[0]
    assert w.read_shape(sq) != "circle" and w.read_colour(sq) != "red"


class _Tok:
    bos_id, eos_id = 1, 2

    def encode(self, text):
        return [3 + (ord(c) % 50) for c in text]


def test_records_read_by_the_vision_text_processor():
    from lwm.training.dataset import VisionTextProcessor

    scene = w.sample_scene(3, CFG)
    per = 4
    codes = list(range(scene.n_frames * per))
    recs = w.records(scene, codes)
    assert {r["fields"] for r in recs} == {"[prompt],vision", "[head],[vision],[tail],answer"}
    assert sum(r["fields"] == "[head],[vision],[tail],answer" for r in recs) == 1 + len(w.questions(scene))
    p = VisionTextProcessor({"fields_from_example": "fields", "n_tokens_per_frame": per}, _Tok())
    for r in recs:
        ex = p(r)
        tokens, loss, vision = (np.asarray(x) for x in (ex[0], ex[1], ex[2])) if isinstance(ex, tuple) else \
            (np.asarray(ex.tokens), np.asarray(ex.loss), np.asarray(ex.vision))
        assert vision.sum() == scene.n_frames * (per + 1)         # codes + one eof/eov per frame
        on_vision = loss[vision]
        assert (on_vision == 1).all() if r["fields"].endswith("vision") else (on_vision == 0).all()


def test_bad_settings_one_line():
    with pytest.raises(ValueError, match="max_objects=4"):
        w.WorldConfig(max_objects=4)
    with pytest.raises(ValueError, match="held_out"):
        w.WorldConfig(held_out=(("hexagon", "red"),))
    with pytest.raises(ValueError, match="split='dev'"):
        w.sample_scene(0, CFG, "dev")
