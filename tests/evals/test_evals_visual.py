"""The visual needle (lwm/evals/visual.py, python -m lwm.eval_visual_needle): the needle frame shows its
digits, sits at the requested depth, survives VQGAN encoding as different codes, and the entry point runs
end to end with tiny random models (VQGAN, vision-language LWM), writing the JSON and the heatmap."""
import json

import numpy as np
import pytest

from lwm.evals import visual
from lwm.text.tokenizer import train_sentencepiece


def test_needle_frame_shows_its_number():
    a, b = visual.needle_frame("4721", 32, 0), visual.needle_frame("9380", 32, 0)
    assert a.shape == (32, 32, 3) and a.dtype == np.float32 and a.min() >= -1 and a.max() <= 1
    assert (a < -0.5).mean() > 0.05                      # dark digit pixels on the light background
    assert np.abs(a - b).mean() > 0.05                   # other digits, another image
    assert np.array_equal(visual.needle_frame("4721", 32, 0), a)


def test_samples_are_deterministic_and_put_the_needle_at_its_depth():
    s1 = visual.build_samples([1, 5], [0, 50, 100], 2, seed=3, size=32)
    s2 = visual.build_samples([1, 5], [0, 50, 100], 2, seed=3, size=32)
    assert len(s1) == 2 * 3 * 2
    for x, y in zip(s1, s2):
        assert x["answers"] == y["answers"] and np.array_equal(x["frames"], y["frames"])
        n, depth = x["length"], x["depth"]
        assert x["frames"].shape == (n, 32, 32, 3)
        k = x["needle_frame"]
        assert k == {0.0: 0, 50.0: (n - 1) // 2, 100.0: n - 1}[depth] or (n, depth) == (5, 50.0) and k == 2
        np.testing.assert_array_equal(x["frames"][k], visual.needle_frame(x["answers"][0], 32, x["seed"]))
        others = [i for i in range(n) if i != k]
        plain = visual.synthetic_video(n, 32, x["seed"])
        np.testing.assert_array_equal(x["frames"][others], plain[others])
    assert visual.match_all("The number is 4721.", ["4721"]) == 100.0 and visual.match_all("4712", ["4721"]) == 0.0


def test_needle_changes_the_vqgan_codes():
    from lwm.model.vqgan import VQGAN, VQGANConfig

    vqgan = VQGAN.load(None, VQGANConfig.load("tiny"), seed=0)
    s = visual.build_samples([3], [50], 1, seed=0, size=32)[0]
    _, codes = vqgan.encode(s["frames"])
    _, plain = vqgan.encode(visual.synthetic_video(3, 32, s["seed"]))
    codes, plain = np.asarray(codes), np.asarray(plain)
    assert np.array_equal(codes[[0, 2]], plain[[0, 2]]) and (codes[1] != plain[1]).mean() > 0.2


@pytest.mark.slow
def test_entry_point_end_to_end_with_tiny_random_models(tmp_path):
    from lwm import eval_visual_needle

    tok = tmp_path / "tokenizer.model"
    train_sentencepiece([visual.QUESTION + " You are a helpful assistant. USER: <vision></vision> ASSISTANT: 0123456789"
                         " How many frames show the red circle? Which one appears first? Two objects."] * 4,
                        str(tok), 360)
    out = tmp_path / "out"
    summary = eval_visual_needle.main([
        "--load_llama_config=tiny", "--vqgan_config=tiny", f"--tokenizer={tok}", "--frame_counts=1,3",
        "--tasks=visual_needle,visual_order,visual_count", "--depths=0,100", "--n_samples=1", "--max_new_tokens=4", f"--output_dir={out}", "--progress=False",
        "--mesh_dim=1,-1,1,1"])
    saved = json.loads((out / "results.json").read_text())
    # needle: 2 counts x 2 depths; order: 3 frames only (1 is left out, said once) x 2 depths; count: 2 counts
    assert [r["task"] for r in saved["records"]].count("visual_needle") == 4 and len(saved["records"]) == 8
    assert saved["summary"] == json.loads(json.dumps(summary))
    for r in saved["records"]:
        assert r["score"] in (0.0, 100.0) and isinstance(r["response"], str)
        assert r["prompt_tokens"] > r["length"] * 64                   # 8x8 codes per frame are in the prompt
    assert summary["lengths"] == [1, 3]
    assert (out / "plots" / "visual_needle.png").read_bytes()[:4] == b"\x89PNG"


def test_order_and_count_needles_are_right_by_construction():
    from lwm.data import world

    for s in visual.build_order_samples([2, 6], [0, 50, 100], 3, seed=1, size=32):
        first, second = s["needle_frames"]
        assert first < second and sorted(s["choices"]) == sorted({s["answers"][0], *s["choices"]})
        colour, shape = s["answers"][0].split()                    # the object of the earlier frame
        frame = np.round((s["frames"][first] + 1) * 127.5).astype(np.uint8)
        assert (world.read_colour(frame), world.read_shape(frame)) == (colour, shape)
        other = np.round((s["frames"][second] + 1) * 127.5).astype(np.uint8)
        assert f"{world.read_colour(other)} {world.read_shape(other)}" != s["answers"][0]
    for s in visual.build_count_samples([1, 4, 9], 4, seed=2, size=32):
        colour, shape = s["question"].split("show the ")[1].split("?")[0].split()
        shown = [np.round((f + 1) * 127.5).astype(np.uint8) for f in s["frames"]]
        k = sum(world.read_colour(f) == colour and world.read_shape(f) == shape for f in shown)
        assert visual.COUNT_WORDS[k - 1] == s["answers"][0] and s["answers"][0] in s["choices"]
    # The scoring: the first choice named decides (lwm.evals.scoring.choice_score).
    s = visual.build_count_samples([4], 1, seed=0, size=32)[0]
    right = visual.VISUAL_COUNT.record(s, f"{s['answers'][0]} frames", [1], [1])["score"]
    wrong = [c for c in s["choices"] if c != s["answers"][0]][0]
    assert right == 100.0 and visual.VISUAL_COUNT.record(s, wrong, [1], [1])["score"] == 0.0
    with pytest.raises(ValueError, match="needs >= 2 frames"):
        visual.build_order_samples([1], [0], 1, seed=0, size=32)


def test_haystack_frames_from_a_local_video(tmp_path):
    from lwm.utils import vision_io

    frames = np.stack([np.full((40, 48, 3), 60 * i + 20, np.uint8) for i in range(3)])   # brightness = index
    vision_io.write_video(str(tmp_path / "clip.mp4"), frames, fps=4)
    got = visual.video_frames(5, 32, 0, str(tmp_path / "clip.mp4"))
    assert got.shape == (5, 32, 32, 3)
    brightness = (got.mean(axis=(1, 2, 3)) + 1) * 127.5
    np.testing.assert_allclose(brightness, [20, 80, 140, 20, 80], atol=4)       # 3 frames, cycled to 5
    s = visual.build_samples([5], [100], 1, seed=0, size=32, video_file=str(tmp_path / "clip.mp4"))[0]
    np.testing.assert_allclose(s["frames"][:4], got[:4])
    assert s["needle_frame"] == 4
