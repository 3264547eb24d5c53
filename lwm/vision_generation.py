"""`python -m lwm.vision_generation`: text -> image (PNG/JPEG) or video (MP4) with the vision-language LWM.

    python -m lwm.vision_generation --prompt='Fireworks over the city' --output_file=fireworks.mp4 \
        --n_frames=8 --cfg_scale_image=5 --load_llama_config=7b \
        --update_llama_config="dict(theta=50000000, max_sequence_length=32768)" \
        --load_checkpoint=params::/ckpt/params --vqgan_checkpoint=/ckpt/vqgan --tokenizer=/ckpt/tokenizer.model

Tiny and random, on a CPU: --load_llama_config=tiny --vqgan_config=tiny (no --load_checkpoint: random weights).

The recipe is the original's (docs/vision_generation.md):
  1. First frame. The conditional prompt "<s>You are a helpful assistant. USER: Generate an image of {prompt}
     ASSISTANT: <vision>" and the unconditional "<s><vision>" are one batch. Each step mixes their vision logits,
     l = l_uncond + s * (l_cond - l_uncond) with s = cfg_scale_image, draws one code and feeds it to both
     rows. A frame is h*w codes (drawn among the codebook ids only) and an end-of-frame token, forced.
  2. Frames 2..n_frames. "... Generate a video of {prompt} ASSISTANT: <vision>" + frame 1, against
     "<s><vision>" + frame 1, decoded in one pass over the KV cache: frame i sees frames 1..i-1.
  3. VQGAN decode; write the image or the MP4.
The whole sequence budget (prompt + n_frames * tokens per frame) is checked before anything is compiled.

Library functions: `generation_prompts`, `generate_frames` (over lwm.inference.engine with a `FrameRule`),
`FrameSampling`, `FrameRule` live in lwm.inference.vision. The model comes from lwm.inference.loader, the
set-up from lwm.inference.runtime, the flags from lwm.cli, the prompt template from lwm.text.chat_template. Bad flags or files: one line, exit status 2. Letters: B prompts, R rows (2B with guidance),
T padded prompt length, W vision vocabulary, F tokens per frame (h*w + 1).
"""
from __future__ import annotations

import json
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np
from ml_collections import ConfigDict

from lwm.cli.command import cli, parse
from lwm.inference import runtime
from lwm.inference.runtime import check_budget
from lwm.inference.engine import Engine
from lwm.inference.vision import FrameSampling, generate_frames, generation_prompts, speed_stats
from lwm.model.vision_llama import NUM_VISION_CODES


# ------------------------------------------------------------------------------------------------- flags

def get_default_config() -> ConfigDict:
    c = runtime.vision_flags(ConfigDict())
    c.prompt = "Fireworks over the city"
    c.output_file = ""                         # .png / .jpg (n_frames = 1) or .mp4 (n_frames > 1)
    c.n_frames = 1
    c.fps = 4                                  # MP4 frame rate
    c.temperature_image = 1.0
    c.temperature_video = 1.0
    c.top_k_image = 8192
    c.top_k_video = 100
    c.cfg_scale_image = 1.0
    c.cfg_scale_video = 1.0
    c.lock()
    return c


def _check_output(config: ConfigDict) -> None:
    from lwm.utils.vision_io import IMAGE_EXTENSIONS

    out, n = config.output_file, config.n_frames
    if not out:
        raise ValueError("--output_file is required: a .png/.jpg path (n_frames=1) or an .mp4 path (n_frames>1)")
    if n < 1:
        raise ValueError(f"--n_frames={n} must be >= 1")
    if out.lower().endswith(".mp4"):
        if n == 1:
            raise ValueError(f"--output_file={out} is a video but --n_frames=1; use .png/.jpg or raise --n_frames")
    elif out.lower().endswith(IMAGE_EXTENSIONS):
        if n != 1:
            raise ValueError(f"--output_file={out} is an image but --n_frames={n}; use an .mp4 path")
    else:
        raise ValueError(f"--output_file={out}: unsupported extension; use .png, .jpg or .mp4")


# -------------------------------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the entry point; returns tokens (n_frames, F), frames (n_frames, H, W, 3) uint8 and timings."""
    from lwm.inference.loader import load_model
    from lwm.utils.vision_io import to_uint8, write_image, write_video
    from lwm.model.vqgan import VQGAN, VQGANConfig

    start = time.perf_counter()
    config = parse(sys.argv[1:] if argv is None else argv, get_default_config())
    _check_output(config)
    vq_config = VQGANConfig.load(config.vqgan_config)
    if vq_config.num_embeddings > NUM_VISION_CODES:
        raise ValueError(f"--vqgan_config: num_embeddings={vq_config.num_embeddings} exceeds the {NUM_VISION_CODES} "
                         "vision codes the language model has")
    side = vq_config.codes_per_side
    per_frame = side * side + 1                                  # 257 for the released VQGAN
    rt = runtime.setup(config, modality="vision,text", sample_mode="vision")
    runtime.unused_cache_flags(config, "lwm.vision_generation (its frame rule draws from every row's logits at "
                               "once, so its prompts are prefilled together, whole)")
    tokenizer, dtype, mesh, llama_config = rt.tokenizer, rt.dtype, rt.mesh, rt.model_config
    image = FrameSampling(config.temperature_image, config.top_k_image, config.cfg_scale_image)
    video = FrameSampling(config.temperature_video, config.top_k_video, config.cfg_scale_video)
    image_cond, uncond = generation_prompts(tokenizer, config.prompt, "image")
    video_cond, _ = generation_prompts(tokenizer, config.prompt, "video")
    limit, n = llama_config.max_sequence_length, config.n_frames
    check_budget(len(image_cond), per_frame, limit, "--n_frames: the first frame")      # before any compile
    if n > 1:
        check_budget(len(video_cond) + per_frame, (n - 1) * per_frame, limit, f"--n_frames={n}")

    rng_image, rng_video = jax.random.split(jax.random.PRNGKey(config.seed))
    stats: dict = {"tokens_per_frame": per_frame}
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        model, params = load_model(llama_config, config.load_checkpoint, dtype, mesh, random_if_empty=True,
                                   seed=config.seed)
        stats["load_model_s"] = time.perf_counter() - t0
        stats["params_m"] = sum(x.size for x in jax.tree.leaves(params)) / 1e6
        engine = Engine(model, params, eos_id=-1, pad_id=tokenizer.pad_id, cache_dtype=config.cache_dtype,
                        head="vision")                       # one engine: both calls share its compiled calls
        kw = dict(tokens_per_frame=per_frame, pad_id=tokenizer.pad_id, num_codes=vq_config.num_embeddings,
                  engine=engine)
        first_stats, rest_stats = {}, {}
        tokens = generate_frames(model, params, [image_cond], [uncond] if image.cfg_scale != 1 else None,
                                 n_frames=1, sampling=image, rng=rng_image, stats=first_stats, **kw)[0]  # (1, F)
        if n > 1:
            context = tokens[0]
            rest = generate_frames(model, params, [video_cond.extend(context, True)],
                                   [uncond.extend(context, True)] if video.cfg_scale != 1 else None,
                                   n_frames=n - 1, sampling=video, rng=rng_video, stats=rest_stats, **kw)[0]
            tokens = np.concatenate([tokens, rest])                                          # (n, F)
    for key in ("generate_s", "new_tokens", "compile_s"):
        stats[key] = first_stats[key] + rest_stats.get(key, 0)
    stats["first_token_s"] = first_stats["first_token_s"]
    stats.update(speed_stats(stats["new_tokens"], stats["generate_s"], stats["compile_s"]))

    t0 = time.perf_counter()
    vqgan = VQGAN.load(config.vqgan_checkpoint or None, vq_config, seed=config.seed)
    stats["load_vqgan_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    frames = to_uint8(vqgan.decode(tokens[:, :-1].reshape(n, side, side)))
    stats["vqgan_decode_s"] = time.perf_counter() - t0
    if jax.process_index() == 0:
        if n == 1:
            write_image(config.output_file, frames[0])
        else:
            write_video(config.output_file, frames, fps=config.fps)
    stats["total_s"] = time.perf_counter() - start
    print(f"wrote {config.output_file}: {n} frame(s) of {frames.shape[1]}x{frames.shape[2]}, {stats['new_tokens']} "
          f"tokens in {stats['run_s']:.2f} s ({stats['tokens_per_s']:.1f} tokens/s) after {stats['compile_s']:.2f} s "
          f"compiling (the first token after {stats['first_token_s']:.2f} s, compiling included); "
          f"{stats['total_s']:.1f} s in all", flush=True)
    print("vision_generation stats: " + json.dumps({k: round(v, 4) for k, v in stats.items()}), flush=True)
    return dict(tokens=tokens, frames=frames, stats=stats)


if __name__ == "__main__":
    sys.exit(cli("lwm.vision_generation", main, get_default_config, __doc__))
