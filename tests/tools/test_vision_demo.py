"""The vision main job (`lwm.vision_demo`) end to end at a toy size, and the pieces a toy run cannot show: the
training records' text is the evaluation prompt token for token; the pixel rules read ground-truth frames
right and a blank frame as nothing."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lwm.data import world
from lwm.tools import vision_demo as vd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The job runs on one CPU device, as from a shell: not with the 8 simulated devices tests/conftest.py sets.
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from lwm.text.tokenizer import train_sentencepiece

    path = tmp_path_factory.mktemp("vd") / "tok.model"
    return train_sentencepiece(vd.tokenizer_texts(vd.train_scenes(6, 3, 0)), str(path), 400)


def test_chat_records_are_the_eval_prompts_token_for_token(tokenizer):
    from lwm.inference.vision import vision_tokens
    from lwm.text.chat_template import vision_chat_prompt
    from lwm.training.dataset import VisionTextProcessor

    proc = VisionTextProcessor(dict(fields_from_example="fields", n_tokens_per_frame=4), tokenizer)
    scene = world.sample_scene(3, vd.world_config(), "train")
    codes = np.arange(scene.n_frames * 4).reshape(scene.n_frames, 2, 2)
    recs = world.records(scene, codes.reshape(-1))
    qa = [r for r in recs if r["fields"] == "[head],[vision],[tail],answer"]
    assert len(qa) >= 3
    for rec in qa:
        ex = proc(rec)
        question = rec["head"].split("USER: ")[1][:-1]
        prompt = vision_chat_prompt(tokenizer, question, vision_tokens(codes))
        n = len(prompt.ids)
        assert ex.tokens[:n].tolist() == prompt.ids.tolist()            # what the QA eval prompts with
        assert ex.vision_masks[:n].tolist() == prompt.vision.tolist()
        assert ex.tokens[n:-1].tolist() == tokenizer.encode(rec["answer"]) and ex.loss_masks[:n].sum() == 0
    gen = next(r for r in recs if r["fields"] == "[prompt],vision")
    ex, prompt = proc(gen), vd.generation_prompt(tokenizer, world.caption(scene), image=False)
    assert ex.tokens[:len(prompt.ids)].tolist() == prompt.ids.tolist()   # what generation continues
    assert ex.tokens[len(prompt.ids):len(prompt.ids) + 4].tolist() == [0, 1, 2, 3]
    # Control: the prompt of the other medium ("an image") is not the video record's.
    other = vd.generation_prompt(tokenizer, world.caption(scene), image=True)
    assert ex.tokens[:len(other.ids)].tolist() != other.ids.tolist()


def test_pixel_rules_score_truth_and_not_a_blank_frame():
    for image in (True, False):
        for scene in vd.generation_cases(6, 0, image, "test"):
            frames = world.render(scene, vd.RESOLUTION)
            assert set(vd.score_frames(frames, scene.objects[0]).values()) == {1.0}
            blank = np.zeros_like(frames) + np.asarray(world.BACKGROUND, np.uint8)
            assert set(vd.score_frames(blank, scene.objects[0]).values()) == {0.0}


@pytest.mark.slow
def test_bad_size_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "lwm.vision_demo", "--size=huge"], cwd=ROOT, capture_output=True,
                          text=True, env=ENV)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--size='huge'" in proc.stderr


@pytest.mark.slow
def test_vision_demo_end_to_end(tmp_path):
    """The whole job at a toy size (world -> VQGAN -> JSON -> tokenizer -> lwm.train -> evals -> files)."""
    out = tmp_path / "vd"
    argv = ["--size=small", f"--workdir={out}", "--train_videos=16", "--train_images=8", "--vqgan_steps=4",
            "--lm_steps=2", "--test_scenes=2", "--qa_per_scene=1", "--gen_prompts=1", "--needle_samples=1"]
    proc = subprocess.run([sys.executable, "-m", "lwm.vision_demo", *argv], cwd=ROOT, capture_output=True,
                          text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("results", "summary", "grid", "video", "checkpoint"):
        assert f"{name:>10}: " in proc.stdout
    summary = json.load(open(out / "results.json"))["summary"]
    assert {(r["task"], r["kind"]) for r in summary["qa"]} >= {("world_video_qa", "count"),
                                                                ("world_image_qa", "count")}
    assert all(r["chance"] == pytest.approx(100 / 3) for r in summary["qa"] if r["kind"] == "count")
    gen = summary["generation"]
    assert {(r["task"], r["rule"]) for r in gen} == {("text_to_image", "colour"), ("text_to_image", "shape"),
                                                     ("text_to_video", "colour"), ("text_to_video", "shape"),
                                                     ("text_to_video", "direction")}
    assert all(r["truth"] == 100.0 for r in gen)                 # the rules read ground-truth frames right
    assert {r["task"] for r in summary["needles"]} == {"visual_needle", "visual_order", "visual_count"}
    assert summary["lm_last_log"]["step"] >= 1 and summary["vqgan"]["codes_used"] > 1
    grid = Image.open(out / "generated.png")
    assert grid.size[0] >= 4 * vd.RESOLUTION and grid.size[1] >= 4 * 2 * vd.RESOLUTION
    assert os.path.getsize(out / "generated.mp4") > 0
    assert json.loads(open(out / "vision_text.jsonl").readline())["fields"] in ("[prompt],vision",
                                                                              "[head],[vision],[tail],answer")
