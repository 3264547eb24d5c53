"""A visual needle for the vision-language LWM: one frame showing a number (rendered with PIL on a plain
background) replaces the frame at a depth of a video of N frames (a synthetic video, or a local file read
with lwm.utils.vision_io); the frames go through the VQGAN and the question asks for the number.

    frames (N, S, S, 3) in [-1, 1]  ->  VQGAN codes (N, h, w)  ->  vision tokens (lwm.vision_chat)
    prompt: <s>You are a helpful assistant. USER: {question}\\n<vision>...</vision> ASSISTANT:

Depth d% puts the needle at frame index round((N - 1) * d / 100) (0% the first frame, 100% the last).
Scoring: match_all over [the number] (lwm.evals.scoring): 100 when the answer contains it, else 0.
Worked example: needle "4721", answer "The number is 4721." -> 100.0; "4712" -> 0.0.
The task (`VisualNeedle`, registered as "visual_needle") builds each batch's prompts inside the runner's timed
section: the VQGAN encodes the batch's videos (B, N, S, S, 3) -> codes (B, N, h, w) -> vision prompts (ids and
vision masks) for the engine. Records are like the text suite's, with `length` = the frame count, so
report.write_results gives the JSON, the heatmap (accuracy by frame count and depth) and the summary.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Optional, Sequence

import numpy as np

from lwm.evals.runner import EvalTask, register
from lwm.evals.scoring import choice_score, match_all
from lwm.evals.tasks import sub_seed

QUESTION = "One frame of this video shows a number. What is the number? Answer with the number only."
TASK = "visual_needle"


def needle_frame(text: str, size: int, seed: int) -> np.ndarray:
    """(size, size, 3) float32 in [-1, 1]: `text` in large dark digits on a light background of a seeded tint."""
    from PIL import Image, ImageDraw, ImageFont

    from lwm.utils.vision_io import to_model_range

    rng = random.Random(seed)
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(8, int(size * 1.6 / max(1, len(text)))))
    box = draw.textbbox((0, 0), text, font=font)
    xy = ((size - (box[2] - box[0])) / 2 - box[0], (size - (box[3] - box[1])) / 2 - box[1])
    draw.text(xy, text, fill=(10, 10, 10), font=font, stroke_width=max(1, size // 64), stroke_fill=(10, 10, 10))
    return to_model_range(np.asarray(image))


def synthetic_video(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size, 3) float32 in [-1, 1]: colour gradients drifting from frame to frame (no digits)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / max(1, size - 1)
    phase, speed = rng.uniform(0, 2 * np.pi, 3), rng.uniform(0.2, 0.6, 3)
    frames = [np.stack([np.sin(2 * np.pi * (x * (c + 1) + y * (2 - c) / 2) + phase[c] + speed[c] * t)
                        for c in range(3)], axis=-1) * 0.8 for t in range(n)]
    return np.asarray(frames, np.float32)


def video_frames(n: int, size: int, seed: int, video_file: str = "") -> np.ndarray:
    """n haystack frames: from `video_file` (spread evenly over it; a shorter video is cycled) or synthetic."""
    if not video_file:
        return synthetic_video(n, size, seed)
    from lwm.utils.vision_io import load_frames

    frames = load_frames(video_file, size, n)
    return frames[np.arange(n) % len(frames)]


def needle_index(n_frames: int, depth: float) -> int:
    return int(round((n_frames - 1) * depth / 100))


def build_samples(frame_counts: Sequence[int], depths: Sequence[float], n_samples: int, seed: int, size: int,
                  video_file: str = "") -> list[dict]:
    """One sample per (frame count, depth, index): frames (N, S, S, 3) with the needle frame, the answer."""
    out = []
    for n in frame_counts:
        if n < 1:
            raise ValueError(f"--frame_counts: {n} frames; need >= 1")
        for depth in depths:
            for i in range(n_samples):
                s_seed = sub_seed(seed, TASK, int(n), float(depth), i)
                number = str(random.Random(s_seed).randint(1000, 9999))
                frames = video_frames(n, size, s_seed, video_file).copy()
                frames[needle_index(n, depth)] = needle_frame(number, size, s_seed)
                out.append(dict(task=TASK, length=int(n), depth=float(depth), index=i, seed=s_seed,
                                frames=frames, answers=[number], needle_frame=needle_index(n, depth)))
    return out


@dataclasses.dataclass(frozen=True)
class VisualNeedle(EvalTask):
    """The visual needle as a task of the runner: `vqgan` and `tokenizer` must be set (`with_models`) before
    a run. Grid length: the frame count. Scoring: match_all over [the number], 0-100."""
    vqgan: Any = None
    tokenizer: Any = None

    def with_models(self, vqgan, tokenizer, max_new_tokens: int) -> "VisualNeedle":
        return dataclasses.replace(self, vqgan=vqgan, tokenizer=tokenizer, max_new_tokens=max_new_tokens)

    def prompt_length(self, sample: dict) -> Optional[int]:
        return None                            # known after the VQGAN; one frame count gives one length

    def question(self, sample: dict) -> str:
        return QUESTION

    def prompts(self, chunk):
        from lwm.inference.vision import vision_tokens
        from lwm.text.chat_template import vision_chat_prompt

        if self.vqgan is None or self.tokenizer is None:
            raise ValueError("visual_needle: set the VQGAN and tokenizer first (VisualNeedle.with_models)")
        _, codes = self.vqgan.encode(np.stack([s["frames"] for s in chunk]))              # (B, N, h, w)
        prompts = [vision_chat_prompt(self.tokenizer, self.question(s), vision_tokens(np.asarray(c)))
                   for s, c in zip(chunk, codes)]
        return [p.ids.tolist() for p in prompts], [p.vision for p in prompts]

    def record(self, sample, response, new_tokens, prompt) -> dict:
        out = {k: v for k, v in sample.items() if k != "frames"}
        out.update(response=response, score=match_all(response, sample["answers"]), prompt_tokens=len(prompt),
                   new_tokens=len(new_tokens))
        return out


VISUAL_NEEDLE = register(VisualNeedle(TASK, max_new_tokens=16))


# ------------------------------------------------------------------------ ordering and counting needles
# Two needles the long-video literature uses beside retrieval: which of two inserted frames came first
# (ordering), and how many inserted frames show a given object (counting). The inserted frames are one-object
# images of the synthetic world (lwm.data.world: a shape of a colour on a dark ground), so a model trained on
# that world can name them; the haystack is `video_frames`' (synthetic or a local video).
ORDER_TASK, COUNT_TASK = "visual_order", "visual_count"
COUNT_WORDS = ("one", "two", "three", "four")


def object_frame(shape: str, colour: str, size: int) -> np.ndarray:
    """(size, size, 3) float32 in [-1, 1]: one large centred `colour` `shape` of the world on its ground."""
    from lwm.data import world
    from lwm.utils.vision_io import to_model_range

    scene = world.Scene((world.Obj(shape, colour, "large", 0.5, 0.5),), 1, 0, "test")
    return to_model_range(world.render(scene, size)[0])


def _two_objects(rng: random.Random) -> list[tuple[str, str]]:
    from lwm.data import world

    shapes, colours = rng.sample(world.SHAPES, 2), rng.sample(world.COLOURS, 2)
    return list(zip(shapes, colours))


def build_order_samples(frame_counts: Sequence[int], depths: Sequence[float], n_samples: int, seed: int,
                        size: int, video_file: str = "") -> list[dict]:
    """Ordering: two object frames, the first at depth d of an N-frame video (needle_index) and the second
    at a seeded later index (N >= 2); the question names both objects in a seeded order; the answer is the
    one inserted first. A sample's `choices` are the two object names ("red circle", ...)."""
    out = []
    for n in frame_counts:
        if n < 2:
            raise ValueError(f"--frame_counts: the ordering needle needs >= 2 frames, got {n}")
        for depth in depths:
            for i in range(n_samples):
                s_seed = sub_seed(seed, ORDER_TASK, int(n), float(depth), i)
                rng = random.Random(s_seed)
                (sa, ca), (sb, cb) = _two_objects(rng)
                first = min(needle_index(n, depth), n - 2)
                second = rng.randint(first + 1, n - 1)
                frames = video_frames(n, size, s_seed, video_file).copy()
                frames[first], frames[second] = object_frame(sa, ca, size), object_frame(sb, cb, size)
                names = [f"{ca} {sa}", f"{cb} {sb}"]
                asked = names if rng.random() < 0.5 else names[::-1]
                question = (f"Two frames of this video show an object: the {asked[0]} and the {asked[1]}. "
                            "Which one appears first?")
                out.append(dict(task=ORDER_TASK, length=int(n), depth=float(depth), index=i, seed=s_seed,
                                frames=frames, question=question, answers=[names[0]], choices=asked,
                                needle_frames=[first, second]))
    return out


def build_count_samples(frame_counts: Sequence[int], n_samples: int, seed: int, size: int,
                        video_file: str = "") -> list[dict]:
    """Counting: k in 1..min(4, N) frames of one object (the target) and up to two frames of another (a
    distractor) at seeded distinct indices of an N-frame video; the question asks how many frames show the
    target; the answer is k as a word (COUNT_WORDS). Depth is not an axis (recorded as 0)."""
    out = []
    for n in frame_counts:
        for i in range(n_samples):
            s_seed = sub_seed(seed, COUNT_TASK, int(n), i)
            rng = random.Random(s_seed)
            (st, ct), (sd, cd) = _two_objects(rng)
            k = rng.randint(1, min(len(COUNT_WORDS), n))
            distract = rng.randint(0, min(2, n - k))
            where = rng.sample(range(n), k + distract)
            frames = video_frames(n, size, s_seed, video_file).copy()
            for j, idx in enumerate(where):
                frames[idx] = object_frame(st, ct, size) if j < k else object_frame(sd, cd, size)
            question = f"How many frames of this video show the {ct} {st}? Answer with a number word."
            out.append(dict(task=COUNT_TASK, length=int(n), depth=0.0, index=i, seed=s_seed, frames=frames,
                            question=question, answers=[COUNT_WORDS[k - 1]],
                            choices=list(COUNT_WORDS[:min(len(COUNT_WORDS), n)]), needle_frames=sorted(where[:k])))
    return out


@dataclasses.dataclass(frozen=True)
class VisualChoice(VisualNeedle):
    """The ordering and counting needles: the sample's own question, scored by
    `lwm.evals.scoring.choice_score` over the sample's choices (the first choice named in the answer must be the right one; 0-100)."""

    def question(self, sample: dict) -> str:
        return sample["question"]

    def record(self, sample, response, new_tokens, prompt) -> dict:
        out = {k: v for k, v in sample.items() if k != "frames"}
        out.update(response=response, score=choice_score(response, sample["choices"], sample["answers"][0]),
                   prompt_tokens=len(prompt), new_tokens=len(new_tokens))
        return out


VISUAL_ORDER = register(VisualChoice(ORDER_TASK, max_new_tokens=8))
VISUAL_COUNT = register(VisualChoice(COUNT_TASK, max_new_tokens=4))
