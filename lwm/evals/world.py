"""Question answering about the synthetic video-language world (lwm.data.world) as tasks of the one runner:
held-out scenes (the `test` split: every scene shows a (shape, colour) pair that training never saw) are
rendered, encoded by the VQGAN and asked their questions in the vision chat template.

    scene -> frames (T, R, R, 3) -> VQGAN codes (T, h, w) -> vision tokens -> <vision>...</vision> + question

Tasks: `world_video_qa` (videos of WorldConfig.n_frames frames) and `world_image_qa` (one-frame scenes);
the grid length of a sample is its frame count, so report.write_results gives one row per task.

Scoring rule (`lwm.evals.scoring.choice_score`): the answer set of each question is closed (lwm.data.world:
SHAPES, COLOURS, DIRECTIONS, COUNTS, or the two events of a "what happened first" question). The response's choice is the
one of the set that occurs first in it (case-insensitive, whole words); 100 when that is the answer, else 0
(no choice in it: 0). Worked examples: choices (red, green, blue), answer "red": "Red." -> 100; "It is blue,
not red" -> 0; "I don't know" -> 0. `summary_by_kind` gives the accuracy per question kind beside the
chance of a uniform random answerer (1 / size of the answer set).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from lwm.data import world
from lwm.evals.runner import EvalTask, register
from lwm.evals.scoring import choice_score


def build_samples(n_scenes: int, seed: int, config: world.WorldConfig, image: bool = False,
                  split: str = "test", max_questions: Optional[int] = None) -> list[dict]:
    """Every question of n_scenes scenes of `split` (scene seeds seed, seed + 1, ...), at most max_questions
    per scene. A sample: task, length (frames), kind, question, answer, choices, scene seed, frames uint8."""
    task = "world_image_qa" if image else "world_video_qa"
    out = []
    for i in range(n_scenes):
        scene = world.sample_scene(seed + i, config, split, image=image)
        frames = world.render(scene, config.resolution)
        for j, qa in enumerate(world.questions(scene)[:max_questions]):
            out.append(dict(task=task, length=scene.n_frames, depth=0.0, index=j, seed=seed + i, kind=qa.kind,
                            question=qa.question, answers=[qa.answer], choices=list(qa.choices), frames=frames))
    return out


@dataclasses.dataclass(frozen=True)
class WorldQA(EvalTask):
    """World QA as a task of the runner; `vqgan` and `tokenizer` must be set (`with_models`) before a run.
    Scoring: `choice_score`, 0-100."""
    vqgan: Any = None
    tokenizer: Any = None

    def with_models(self, vqgan, tokenizer, max_new_tokens: int = 8) -> "WorldQA":
        return dataclasses.replace(self, vqgan=vqgan, tokenizer=tokenizer, max_new_tokens=max_new_tokens)

    def prompt_length(self, sample: dict) -> Optional[int]:
        return None                                    # known after the VQGAN and the question

    def prompts(self, chunk):
        from lwm.inference.vision import vision_tokens
        from lwm.text.chat_template import vision_chat_prompt
        from lwm.utils.vision_io import to_model_range

        if self.vqgan is None or self.tokenizer is None:
            raise ValueError(f"{self.name}: set the VQGAN and tokenizer first (WorldQA.with_models)")
        frames = np.stack([to_model_range(s["frames"]) for s in chunk])            # (B, T, R, R, 3)
        _, codes = self.vqgan.encode(frames)                                         # (B, T, h, w)
        prompts = [vision_chat_prompt(self.tokenizer, s["question"], vision_tokens(np.asarray(c)))
                   for s, c in zip(chunk, codes)]
        return [p.ids.tolist() for p in prompts], [p.vision for p in prompts]

    def record(self, sample, response, new_tokens, prompt) -> dict:
        out = {k: v for k, v in sample.items() if k != "frames"}
        out.update(response=response, score=choice_score(response, sample["choices"], sample["answers"][0]),
                   prompt_tokens=len(prompt), new_tokens=len(new_tokens))
        return out


def summary_by_kind(records: Sequence[dict]) -> list[dict]:
    """Per (task, question kind): n, accuracy (%) and the random answerer's expected accuracy (%)."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["task"], r["kind"]), []).append(r)
    return [dict(task=t, kind=k, n=len(rs), accuracy=float(np.mean([r["score"] for r in rs])),
                 chance=float(100 * np.mean([1 / len(r["choices"]) for r in rs])))
            for (t, k), rs in sorted(groups.items())]


WORLD_VIDEO_QA = register(WorldQA("world_video_qa", max_new_tokens=8))
WORLD_IMAGE_QA = register(WorldQA("world_image_qa", max_new_tokens=8))
