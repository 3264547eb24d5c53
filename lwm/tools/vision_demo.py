"""The second offline main job (`python -m lwm.vision_demo`, `bash scripts/run_vision_demo.sh`): the vision
half of LWM trained end to end on a 2-core CPU from a seed, then evaluated.

Hardware: 2 CPU cores; the default size took 5.7 minutes on a quiet 2-core CPU, 16 on one shared with other jobs
(docs/vision_demo.md), `--size=small` 7 minutes on the shared one, and
tests/tools/test_vision_demo.py runs a smaller one still. Steps, each printing where its output is:
  1. the synthetic world (lwm.data.world) at 32 x 32: train videos (4 frames) and images (1 frame), and
     held-out test scenes (every one shows a (shape, colour) pair training never saw);
  2. a VQGAN (the tiny preset, 32 x 32 -> 8 x 8 codes, `codes` codewords) trained by lwm.training.vqgan on the
     train frames; PSNR on held-out test frames and codebook usage over the train codes are printed;
  3. every train scene encoded and written as the original's vision-text JSON (lwm.data.world.records), its
     text in the chat template the evaluations prompt with (world.records writes it so): text-to-video,
     video-to-text, image and video QA, shuffled together;
  4. a sentencepiece tokenizer on the text side;
  5. `lwm.train --modality=vision,text` (a subprocess) with masked sequence packing (`mode=pack`) and per-example
     loss weighting, text and vision losses weighted `text_loss_weight` / `vision_loss_weight`;
  6. evaluations: world QA on held-out scenes (lwm.evals.world; accuracy per question kind beside chance);
     text-to-image and text-to-video from the captions of one-object scenes, scored by the pixel rules
     (read_colour, read_shape, read_direction) on the decoded frames, beside the rules' own accuracy on the
     ground-truth frames and on the VQGAN's reconstructions; the visual needles (needle, order, count) by
     frame count (lwm.evals.visual). Results: results.json, summary.md, generated.png (a grid: each prompt's
     ground-truth frames above its generated ones) and generated.mp4 (the first generated video).
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from typing import Iterator, Optional, Sequence

import numpy as np
from ml_collections import ConfigDict

from lwm.cli.command import parse
from lwm.cli.values import FlagError
from lwm.data import world
from lwm.tools.jobs import PYTHON, cpu_env, run_step

# Per size: world scenes, VQGAN steps, the language model's training and the evaluation sizes.
SIZES = {
    "full": dict(train_videos=500, train_images=500, test_scenes=24, codes=256, vqgan_steps=240, vqgan_batch=16,
                 lm_steps=320, lm_batch=2, lm_seq=1024, lm_lr=3e-3, hidden=64, layers=2,
                 gen_prompts=8, needle_samples=2, frame_counts="4,8", qa_per_scene=4),
    "small": dict(train_videos=48, train_images=24, test_scenes=4, codes=64, vqgan_steps=20, vqgan_batch=16,
                  lm_steps=6, lm_batch=2, lm_seq=512, lm_lr=3e-3, hidden=64, layers=2,
                  gen_prompts=2, needle_samples=1, frame_counts="4", qa_per_scene=2),
}
RESOLUTION, N_FRAMES = 32, 4
TEXT_LOSS_WEIGHT, VISION_LOSS_WEIGHT = 1.0, 0.5
# The demo's recipe: fields of the json_vision dataset (lwm.training.dataset) that `train_lm` sets.
RECIPE = dict(mode="pack", loss_weighting="example", text_loss_weight=TEXT_LOSS_WEIGHT,
              vision_loss_weight=VISION_LOSS_WEIGHT)


def get_default_config() -> ConfigDict:
    """Every flag and its default; a size field left at 0 takes the value of --size (SIZES)."""
    c = ConfigDict()
    c.workdir = "outputs/vision_demo"
    c.size = "full"                  # full | small (SIZES)
    c.seed = 0
    for key, value in SIZES["full"].items():
        c[key] = type(value)(0) if not isinstance(value, str) else ""
    c.temperature = 1.0              # sampling of generated frames (0 = greedy)
    c.top_k = 16
    c.vocab_size = 512
    c.lock()
    return c


def resolve(config: ConfigDict) -> dict:
    """The size's values with every non-zero flag over them; FlagError on an unknown size or a bad value."""
    if config.size not in SIZES:
        raise FlagError(f"--size={config.size!r}: choose one of {', '.join(SIZES)}")
    out = dict(SIZES[config.size])
    for key in out:
        if config[key]:
            out[key] = config[key]
    for key, value in out.items():
        if not isinstance(value, str) and value <= 0:
            raise FlagError(f"--{key}={value} must be > 0")
    if not 16 <= out["codes"] <= 8192:
        raise FlagError(f"--codes={out['codes']} must be in [16, 8192]")
    try:
        counts = [int(x) for x in out["frame_counts"].split(",")]
    except ValueError:
        raise FlagError(f"--frame_counts={out['frame_counts']!r}: comma-separated integers expected") from None
    if not counts or min(counts) < 2:
        raise FlagError(f"--frame_counts={out['frame_counts']!r}: every count must be >= 2 (the order needle)")
    tokens_per_frame = (RESOLUTION // 4) ** 2 + 1
    need = max(counts) * tokens_per_frame + 64
    if need > out["lm_seq"]:
        raise FlagError(f"--frame_counts={out['frame_counts']!r}: {max(counts)} frames need {need} positions; "
                        f"--lm_seq={out['lm_seq']} is the model's length")
    return out


# ------------------------------------------------------------------------------------------------ world

def world_config() -> world.WorldConfig:
    return world.WorldConfig(resolution=RESOLUTION, n_frames=N_FRAMES)


def train_scenes(n_videos: int, n_images: int, seed: int) -> list:
    """The train split: videos of seeds seed*10**6 + 0..n_videos-1, images likewise (world.sample_scene)."""
    cfg, base = world_config(), seed * 10 ** 6
    return ([world.sample_scene(base + i, cfg, "train") for i in range(n_videos)]
            + [world.sample_scene(base + i, cfg, "train", image=True) for i in range(n_images)])


def frame_batches(frames: np.ndarray, batch: int, seed: int):
    """A callable start -> iterator of (batch, R, R, 3) float32 batches in [-1, 1]: batch k holds frames drawn
    by np.random.default_rng([seed, k]) from `frames` (F, R, R, 3) uint8, so a resume replays batch k exactly
    (lwm.training.vqgan's frames_source)."""
    from lwm.utils.vision_io import to_model_range

    def source(start: int = 0) -> Iterator[np.ndarray]:
        k = start
        while True:
            idx = np.random.default_rng([seed, k]).integers(0, len(frames), batch)
            yield to_model_range(frames[idx])
            k += 1
    return source


def train_vqgan(frames: np.ndarray, out_dir: str, codes: int, steps: int, batch: int, seed: int) -> dict:
    """The tiny VQGAN preset with `codes` codewords on `frames` (F, R, R, 3) uint8; returns its last log row."""
    from lwm.training import vqgan as vqt

    config = vqt.get_default_config()
    config.output_dir, config.vqgan_config = out_dir, "tiny"
    config.update_vqgan_config = f"dict(num_embeddings={codes}, resolution={RESOLUTION})"
    config.total_steps, config.batch_size, config.lr, config.seed = steps, batch, 1e-3, seed
    config.log_every, config.save_every = max(1, steps // 8), steps
    config.dead_code_steps = max(1, min(50, steps // 4))
    if os.path.exists(os.path.join(out_dir, vqt.STATE_FILE)):
        os.remove(os.path.join(out_dir, vqt.STATE_FILE))        # a fresh run, not a resume of an older one
    result = vqt.train_vqgan(config, frame_batches(frames, batch, seed))
    return dict(result["history"][-1], weights=result["weights"])


def encode(vqgan, frames: Sequence[np.ndarray], batch: int = 64) -> list:
    """Codes (T, h, w) int32 of each uint8 video (T, R, R, 3), batched by frame count."""
    from lwm.utils.vision_io import to_model_range

    out: list = [None] * len(frames)
    by_t: dict = {}
    for i, f in enumerate(frames):
        by_t.setdefault(len(f), []).append(i)
    for idx in by_t.values():
        for j in range(0, len(idx), batch):
            chunk = idx[j:j + batch]
            _, codes = vqgan.encode(np.stack([to_model_range(frames[i]) for i in chunk]))
            for i, c in zip(chunk, np.asarray(codes)):
                out[i] = c
    return out


def write_json_data(path: str, scenes: Sequence, codes: Sequence[np.ndarray], qa_per_scene: int, seed: int) -> dict:
    """Every scene's records (world.records: in the eval prompts' chat template), shuffled, one JSON per line;
    counts by kind."""
    rows, kinds = [], {}
    for scene, c in zip(scenes, codes):
        for row in world.records(scene, np.asarray(c).reshape(-1), qa_limit=qa_per_scene):
            kind = ("image" if scene.is_image else "video") + "_" + (
                "generation" if row["fields"] == "[prompt],vision" else
                "caption" if row["head"].endswith("Describe the image.\n") or row["head"].endswith(
                    "Describe the video.\n") else "qa")
            kinds[kind] = kinds.get(kind, 0) + 1
            rows.append(row)
    random.Random(seed).shuffle(rows)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return kinds


def tokenizer_texts(scenes: Sequence) -> list[str]:
    """The text side of the world and of the prompts (captions, questions, answers, the chat template)."""
    from lwm.evals import visual
    from lwm.text.chat_template import SYSTEM_PROMPT, VISION_CLOSE, VISION_OPEN, user_turn_text, vision_chat_text

    texts = [SYSTEM_PROMPT, vision_chat_text("")[1], VISION_OPEN, VISION_CLOSE, visual.QUESTION, "0123456789"]
    texts += [user_turn_text("Generate a video of x", first=True), "Describe the video.", "Describe the image."]
    for scene in scenes:
        texts.append(world.caption(scene))
        texts += [f"{q.question} {q.answer}" for q in world.questions(scene)]
    texts += [f"Which one appears first? How many frames of this video show the {c} {s}? Answer with a number "
              f"word. one two three four" for s in world.SHAPES for c in world.COLOURS]
    return texts


# ------------------------------------------------------------------------------------------------ training

def model_updates(sz: dict) -> str:
    heads = max(2, sz["hidden"] // 32)
    return (f"dict(hidden_size={sz['hidden']}, intermediate_size={3 * sz['hidden']}, "
            f"num_hidden_layers={sz['layers']}, num_attention_heads={heads}, num_key_value_heads={heads}, "
            f"max_sequence_length={sz['lm_seq']}, vision_vocab_size=8200, theta=10000, "
            f"scan_query_chunk_size=256, scan_key_chunk_size=256)")


def train_lm(data: str, tokenizer_path: str, workdir: str, sz: dict, seed: int, recipe: Optional[dict] = None) -> str:
    """`lwm.train --modality=vision,text` on the JSON with `recipe` (json_vision dataset fields; default RECIPE:
    masked sequence packing, example loss weighting, the text/vision loss weights); returns the params checkpoint
    spec it saved."""
    steps, lr = sz["lm_steps"], sz["lm_lr"]
    warmup = min(30, max(1, steps // 10))
    d = "--train_dataset.json_vision_dataset"
    cmd = [PYTHON, "-m", "lwm.train", "--modality=vision,text", "--mesh_dim=1,1,1,1", "--dtype=fp32",
           "--load_llama_config=tiny", f"--update_llama_config={model_updates(sz)}", f"--tokenizer={tokenizer_path}",
           "--train_dataset.type=json_vision", "--train_dataset.vision_text_processor.fields_from_example=fields",
           f"--train_dataset.vision_text_processor.n_tokens_per_frame={(RESOLUTION // 4) ** 2}",
           f"{d}.path={data}", f"{d}.seq_length={sz['lm_seq']}", f"{d}.batch_size={sz['lm_batch']}",
           *(f"{d}.{k}={v}" for k, v in (RECIPE if recipe is None else recipe).items()), f"--total_steps={steps}",
           f"--log_freq={max(1, min(50, steps // 10))}", f"--optimizer.adamw_optimizer.lr={lr}",
           f"--optimizer.adamw_optimizer.lr_warmup_steps={warmup}",
           f"--optimizer.adamw_optimizer.lr_decay_steps={max(steps, warmup + 1)}",
           f"--optimizer.adamw_optimizer.end_lr={lr / 10}", "--optimizer.adamw_optimizer.weight_decay=0.0",
           f"--save_model_freq={steps}", "--checkpointer.float_dtype=fp32", f"--logger.output_dir={workdir}/train",
           "--logger.experiment_id=lm", "--logger.append_uuid=False", "--peak_flops=1e11", f"--seed={seed}",
           "--noautoresume"]
    run_step(cmd, cpu_env(1), f"training the vision-language model: {steps} steps of {sz['lm_batch']} x "
             f"{sz['lm_seq']} tokens", job="vision_demo")
    from lwm.checkpoint.manager import checkpoint_spec, latest

    ckpt = latest(os.path.join(workdir, "train", "lm"))
    if ckpt is None:
        raise SystemExit(f"vision_demo: lwm.train wrote no checkpoint under {workdir}/train/lm")
    return checkpoint_spec(ckpt)


# ------------------------------------------------------------------------------------------------ evaluation

def backend_flags(checkpoint: str, tokenizer_path: str, vqgan_weights: str, sz: dict, seed: int) -> ConfigDict:
    from lwm.inference import runtime

    return parse([f"--load_checkpoint={checkpoint}", f"--tokenizer={tokenizer_path}", "--load_llama_config=tiny",
                  f"--update_llama_config={model_updates(sz)}", "--mesh_dim=1,1,1,1", "--dtype=fp32",
                  f"--vqgan_checkpoint={vqgan_weights}", f"--seed={seed}"], runtime.vision_flags(ConfigDict()))


def generation_cases(n: int, seed: int, image: bool, split: str) -> list:
    """n one-object scenes of `split` (videos: the object moves, no event), scene seeds from seed upwards."""
    cfg, out, s = world_config(), [], seed
    while len(out) < n:
        scene = world.sample_scene(s, cfg, split, image=image)
        s += 1
        if len(scene.objects) == 1 and (image or (scene.objects[0].direction and not scene.objects[0].event)):
            out.append(scene)
    return out


def score_frames(frames: np.ndarray, obj) -> dict:
    """Pixel rules on uint8 frames (T, R, R, 3) against a one-object scene's object: colour and shape of the
    first frame; direction of the whole clip (videos)."""
    out = dict(colour=float(world.read_colour(frames[0]) == obj.colour),
               shape=float(world.read_shape(frames[0]) == obj.shape))
    if len(frames) > 1:
        out["direction"] = float(world.read_direction(frames) == obj.direction)
    return out


def generation_prompt(tokenizer, caption: str, image: bool):
    """The text-to-video record's prompt (lwm.data.world.records) + "<vision>", tokenized piece by piece as
    training saw it."""
    from lwm.text.chat_template import VISION_OPEN, text_prompt, user_turn_text

    what = "an image" if image else "a video"
    prompt = text_prompt(tokenizer, user_turn_text(f"Generate {what} of {caption}", first=True))
    return prompt.extend(tokenizer.encode(VISION_OPEN), False)


def evaluate_generation(flags: ConfigDict, vqgan, tokenizer, sz: dict, seed: int, temperature: float,
                        top_k: int) -> tuple[list, dict]:
    """Text-to-image and text-to-video on one-object scenes of both splits; returns (rows, frames by case)."""
    import jax

    from lwm.inference import runtime
    from lwm.inference.loader import load_model
    from lwm.inference.vision import FrameSampling, generate_frames
    from lwm.utils.vision_io import to_uint8

    from lwm.inference.engine import Engine

    rt = runtime.setup(flags, modality="vision,text", sample_mode="vision")
    side = vqgan.config.codes_per_side
    per_frame = side * side + 1
    rows, shown = [], {}
    with jax.set_mesh(rt.mesh):
        model, params = load_model(rt.model_config, flags.load_checkpoint, rt.dtype, rt.mesh)
        engine = Engine(model, params, eos_id=-1, pad_id=tokenizer.pad_id)      # its compiled steps serve both calls
        for image in (True, False):
            cases = [(split, s) for split in ("train", "test")
                     for s in generation_cases(sz["gen_prompts"], seed + 5_000_000, image, split)]
            conds = [generation_prompt(tokenizer, world.caption(s), image) for _, s in cases]
            n = 1 if image else N_FRAMES
            tokens = generate_frames(model, params, conds, None, n_frames=n, tokens_per_frame=per_frame,
                                     sampling=FrameSampling(temperature, top_k), rng=seed, pad_id=tokenizer.pad_id,
                                     num_codes=vqgan.config.num_embeddings, engine=engine)      # (B, n, F)
            codes = tokens[:, :, :-1].reshape(len(cases), n, side, side)
            generated = to_uint8(vqgan.decode(codes))                                       # (B, n, R, R, 3)
            truth = np.stack([world.render(s, RESOLUTION) for _, s in cases])
            recon = to_uint8(vqgan.decode(np.stack(encode(vqgan, list(truth)))))
            for (split, s), g, t, r in zip(cases, generated, truth, recon):
                rows.append(dict(task="text_to_image" if image else "text_to_video", split=split,
                                 caption=world.caption(s), generated=score_frames(g, s.objects[0]),
                                 truth=score_frames(t, s.objects[0]), reconstructed=score_frames(r, s.objects[0])))
            for split in ("train", "test"):
                pick = [i for i, (sp, _) in enumerate(cases) if sp == split]
                shown[(image, split)] = (truth[pick], generated[pick], [world.caption(cases[i][1]) for i in pick])
    return rows, shown


def generation_summary(rows: Sequence[dict]) -> list[dict]:
    """Per (task, split, rule): accuracy (%) of the rule on generated, ground-truth and reconstructed frames,
    and chance (a uniform draw from the rule's answer set)."""
    chance = dict(colour=100 / len(world.COLOURS), shape=100 / len(world.SHAPES), direction=100 / len(world.DIRECTIONS))
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["task"], r["split"]), []).append(r)
    out = []
    for (task, split), rs in sorted(groups.items()):
        for rule in rs[0]["generated"]:
            out.append(dict(task=task, split=split, rule=rule, n=len(rs), chance=chance[rule],
                            **{w: 100 * float(np.mean([r[w][rule] for r in rs]))
                               for w in ("generated", "truth", "reconstructed")}))
    return out


def evaluate_qa_and_needles(flags: ConfigDict, vqgan, sz: dict, seed: int,
                            needles: bool = True) -> tuple[list, list, list]:
    """World QA on held-out scenes and (when `needles`) the three visual needles, through the one runner.
    Returns (QA records, QA summary by kind, needle records; [] without needles)."""
    import jax

    from lwm.evals import runner, visual
    from lwm.evals import world as world_eval
    from lwm.evals.backends import JaxBackend

    backend = JaxBackend.from_flags(flags, modality="vision,text", sample_mode="text")
    tok = backend.tokenizer
    cfg = world_config()
    samples = (world_eval.build_samples(sz["test_scenes"], seed, cfg, image=False, max_questions=sz["qa_per_scene"])
               + world_eval.build_samples(sz["test_scenes"], seed, cfg, image=True, max_questions=sz["qa_per_scene"]))
    tasks = {"world_video_qa": world_eval.WORLD_VIDEO_QA.with_models(vqgan, tok, 8),
             "world_image_qa": world_eval.WORLD_IMAGE_QA.with_models(vqgan, tok, 8)}
    counts = [int(x) for x in sz["frame_counts"].split(",")]
    needle_samples = (visual.build_samples(counts, [0, 50, 100], sz["needle_samples"], seed, RESOLUTION)
                      + visual.build_order_samples(counts, [0, 50], sz["needle_samples"], seed, RESOLUTION)
                      + visual.build_count_samples(counts, sz["needle_samples"] * 2, seed, RESOLUTION))
    needle_tasks = {visual.TASK: visual.VISUAL_NEEDLE.with_models(vqgan, tok, 8),
                    visual.ORDER_TASK: visual.VISUAL_ORDER.with_models(vqgan, tok, 8),
                    visual.COUNT_TASK: visual.VISUAL_COUNT.with_models(vqgan, tok, 4)}
    with jax.set_mesh(backend.mesh):
        qa = runner.run(samples, backend, tasks, max_tokens_per_batch=None, max_rows=32, progress=False,
                        desc="world QA")
        needle = [] if not needles else runner.run(needle_samples, backend, needle_tasks, max_tokens_per_batch=None,
                                                   max_rows=16, progress=False, desc="visual needles")
    return qa, world_eval.summary_by_kind(qa), needle


def needle_summary(records: Sequence[dict]) -> list[dict]:
    """Per (task, frame count): n, accuracy (%) and chance (%): 0 for the number (4 digits), 50 for the
    order, 1 / the number of count words offered for the count."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["task"], r["length"]), []).append(r)
    return [dict(task=t, frames=n, n=len(rs), accuracy=float(np.mean([r["score"] for r in rs])),
                 chance=float(100 * np.mean([1 / len(r["choices"]) if "choices" in r else 0.0 for r in rs])))
            for (t, n), rs in sorted(groups.items())]


# ------------------------------------------------------------------------------------------------ outputs

def write_grid(path: str, shown: dict, scale: int = 3, per_group: int = 4) -> str:
    """PNG: one block per prompt, its ground-truth frames (top row) above its generated frames (bottom row),
    `scale` x nearest; one line of blocks per (medium, split): images train, images test, videos train, videos
    test, at most `per_group` prompts each."""
    from PIL import Image

    r, gap = RESOLUTION * scale, 4
    lines = [list(zip(truth, generated))[:per_group] for (_, _), (truth, generated, _) in
             sorted(shown.items(), key=lambda kv: (not kv[0][0], kv[0][1] != "train"))]
    block_w = [max(len(t) for t, _ in line) * (r + gap) + 3 * gap for line in lines]
    width = max(len(line) * w for line, w in zip(lines, block_w)) + gap
    canvas = Image.new("RGB", (width, len(lines) * (2 * r + 4 * gap) + gap), (80, 80, 80))
    for i, (line, bw) in enumerate(zip(lines, block_w)):
        y = gap + i * (2 * r + 4 * gap)
        for k, (t, g) in enumerate(line):
            for row, frames in enumerate((t, g)):
                for j, f in enumerate(frames):
                    big = np.repeat(np.repeat(f, scale, axis=0), scale, axis=1)          # (r, r, 3) nearest
                    canvas.paste(Image.fromarray(big), (gap + k * bw + j * (r + gap), y + row * (r + gap)))
    canvas.save(path)
    return path


def table(rows: Sequence[dict], cols: Sequence[str]) -> str:
    def cell(v):
        return f"{v:.1f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def lm_summary(metrics: Sequence[dict], last: int = 5) -> dict:
    """The last logged step, and the means of loss / text_loss / vision_loss / accuracies over the last `last`
    log rows (a row whose batch held no vision target logs vision_loss 0: those rows are left out of the
    vision means)."""
    rows = metrics[-last:]
    out = dict(step=rows[-1].get("step"))
    for k in ("loss", "text_loss", "text_accuracy", "vision_loss", "vision_accuracy"):
        vals = [r[k] for r in rows if k in r and (not k.startswith("vision") or r.get("vision_loss", 0) > 0)]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out


def prepare(workdir: str, sz: dict, seed: int, times: dict) -> dict:
    """Steps 1-4, shared by the demo and benchmarks/vision_recipe_ablation.py: the world, the VQGAN trained on
    its train frames and its statistics, the train scenes encoded and written as vision-text JSON, the tokenizer.
    Adds each step's seconds to `times`; returns dict(scenes, codes, vqgan, vqgan_weights, vqgan_last, vq_stats,
    data, kinds, tokenizer, tokenizer_path)."""
    from lwm.model.vqgan import VQGAN, VQGANConfig
    from lwm.text.tokenizer import train_sentencepiece
    from lwm.training.vqgan import psnr
    from lwm.utils.vision_io import to_model_range

    t0 = time.time()
    scenes = train_scenes(sz["train_videos"], sz["train_images"], seed)
    videos = [world.render(s, RESOLUTION) for s in scenes]
    frames = np.concatenate(videos)
    test = [world.render(world.sample_scene(i, world_config(), "test"), RESOLUTION)
            for i in range(sz["test_scenes"])]
    times["world_s"] = time.time() - t0
    print(f"vision_demo: world: {len(scenes)} train scenes ({sz['train_videos']} videos of {N_FRAMES} frames, "
          f"{sz['train_images']} images) = {len(frames)} frames of {RESOLUTION}x{RESOLUTION}; "
          f"{sz['test_scenes']} held-out test scenes", flush=True)

    t0 = time.time()
    print(f"\n== VQGAN: {sz['vqgan_steps']} steps of {sz['vqgan_batch']} frames, {sz['codes']} codes", flush=True)
    last = train_vqgan(frames, os.path.join(workdir, "vqgan"), sz["codes"], sz["vqgan_steps"], sz["vqgan_batch"],
                       seed)
    vq_config = VQGANConfig.load("tiny").replace(num_embeddings=sz["codes"], resolution=RESOLUTION)
    vqgan = VQGAN.load(last["weights"], vq_config)
    codes = encode(vqgan, videos)
    test_frames = np.concatenate(test)
    recon = np.asarray(vqgan.decode(vqgan.encode(to_model_range(test_frames))[1]))
    test_psnr = psnr(float(np.mean((np.clip(recon, -1, 1) - to_model_range(test_frames)) ** 2)))
    used = np.unique(np.concatenate([c.reshape(-1) for c in codes]))
    vq_stats = dict(train_psnr_last_window=last["psnr"], test_psnr=test_psnr, codes=sz["codes"],
                    codes_used=int(len(used)), usage=len(used) / sz["codes"], perplexity_last_window=last["perplexity"],
                    weights=last["weights"])
    times["vqgan_s"] = time.time() - t0
    print(f"vision_demo: VQGAN {last['weights']}: PSNR {test_psnr:.2f} dB on held-out test frames "
          f"({last['psnr']:.2f} dB on the last training batch); {len(used)}/{sz['codes']} codes used by the train "
          f"scenes", flush=True)

    t0 = time.time()
    data = os.path.join(workdir, "vision_text.jsonl")
    kinds = write_json_data(data, scenes, codes, sz["qa_per_scene"], seed)
    tokenizer_path = os.path.join(workdir, "tokenizer.model")
    tokenizer = train_sentencepiece(tokenizer_texts(scenes), tokenizer_path, sz["vocab_size"])
    times["data_s"] = time.time() - t0
    print(f"vision_demo: {sum(kinds.values())} examples {kinds} -> {data}; tokenizer {tokenizer_path} "
          f"({tokenizer.vocab_size} pieces)", flush=True)
    return dict(scenes=scenes, codes=codes, vqgan=vqgan, vqgan_weights=last["weights"], vqgan_last=last,
                vq_stats=vq_stats, data=data, kinds=kinds, tokenizer=tokenizer, tokenizer_path=tokenizer_path)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from lwm.evals import report
    from lwm.utils.vision_io import write_video

    config = parse(sys.argv[1:] if argv is None else argv, get_default_config())
    sz = resolve(config)
    start, times = time.time(), {}
    workdir = os.path.abspath(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    prep = prepare(workdir, dict(sz, vocab_size=config.vocab_size), config.seed, times)
    vqgan, last, vq_stats, kinds = prep["vqgan"], prep["vqgan_last"], prep["vq_stats"], prep["kinds"]
    data, tokenizer, tokenizer_path = prep["data"], prep["tokenizer"], prep["tokenizer_path"]

    t0 = time.time()
    checkpoint = train_lm(data, tokenizer_path, workdir, sz, config.seed)
    times["train_lm_s"] = time.time() - t0

    t0 = time.time()
    print("\n== evaluations", flush=True)
    flags = backend_flags(checkpoint, tokenizer_path, last["weights"], sz, config.seed)
    qa, qa_summary, needle = evaluate_qa_and_needles(flags, vqgan, sz, config.seed)
    gen_rows, shown = evaluate_generation(flags, vqgan, tokenizer, sz, config.seed, config.temperature, config.top_k)
    gen_summary = generation_summary(gen_rows)
    times["eval_s"] = time.time() - t0

    grid = write_grid(os.path.join(workdir, "generated.png"), shown)
    truth, generated, captions = shown[(False, "train")]
    video = os.path.join(workdir, "generated.mp4")
    write_video(video, np.repeat(np.repeat(generated[0], 4, axis=1), 4, axis=2), fps=2)
    times["total_s"] = time.time() - start
    metrics = [json.loads(line) for line in open(os.path.join(workdir, "train", "lm", "metrics.jsonl"))]
    lm = lm_summary(metrics)
    lm_first = {k: metrics[0].get(k) for k in lm}
    summary = dict(size=config.size, sizes=sz, seed=config.seed, vqgan=vq_stats, examples=kinds,
                   lm_first_log=lm_first, lm_last_log=lm, checkpoint=checkpoint, tokenizer=tokenizer_path,
                   qa=qa_summary, generation=gen_summary, needles=needle_summary(needle),
                   generation_sampling=dict(temperature=config.temperature, top_k=config.top_k),
                   video_caption=captions[0], times={k: round(v, 1) for k, v in times.items()})
    results = os.path.join(workdir, "results.json")
    report.write_json(results, dict(summary=summary, qa_records=qa, generation_records=gen_rows,
                                    needle_records=needle))
    text = "\n\n".join([
        f"VQGAN: PSNR {vq_stats['test_psnr']:.2f} dB (held-out test frames), {vq_stats['codes_used']}/{sz['codes']} "
        "codes used",
        f"LM: loss {lm_first['loss']:.3f} at the first log -> {lm['loss']:.3f} (text {lm['text_loss']:.3f}, vision "
        f"{lm['vision_loss']:.3f}; means of the last logs) at step {lm['step']}",
        "World QA, held-out scenes (accuracy %, chance %):\n" + table(qa_summary, ("task", "kind", "n", "accuracy",
                                                                                   "chance")),
        "Generation, pixel rules (accuracy % on generated / ground-truth / VQGAN-reconstructed frames):\n"
        + table(gen_summary, ("task", "split", "rule", "n", "generated", "truth", "reconstructed", "chance")),
        "Visual needles (accuracy %, chance %):\n" + table(summary["needles"], ("task", "frames", "n", "accuracy",
                                                                              "chance"))])
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(text + "\n")
    print(f"\n== vision demo done in {times['total_s']:.0f} s ({', '.join(f'{k} {v:.0f}' for k, v in times.items())})")
    print(text)
    for key, path in (("results", results), ("summary", os.path.join(workdir, "summary.md")), ("grid", grid),
                      ("video", video), ("checkpoint", checkpoint), ("vqgan", last["weights"]),
                      ("tokenizer", tokenizer_path)):
        print(f"{key:>10}: {path}")
    return dict(summary, results=results, grid=grid, video=video)
