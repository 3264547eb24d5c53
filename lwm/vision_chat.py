"""`python -m lwm.vision_chat`: answer a question about an image or a video with the vision-language LWM.

    python -m lwm.vision_chat --prompt='What is the video about?' --input_file=clip.mp4 --max_n_frames=8 \
        --load_llama_config=7b --update_llama_config="dict(theta=50000000, max_sequence_length=131072)" \
        --load_checkpoint=params::/ckpt/params --vqgan_checkpoint=/ckpt/vqgan --tokenizer=/ckpt/tokenizer.model

Tiny and random, on a CPU: --load_llama_config=tiny --vqgan_config=tiny (no --load_checkpoint: random weights).

Steps (the original's, docs/vision_chat.md):
  1. Frames: the image, or at most max_n_frames of the video spread evenly from first to last, read as a
     viewer shows them (orientation applied, any mode or bit depth as 8-bit RGB); each one's shorter side
     scaled to the VQGAN resolution (256) and the centre square cut out (lwm.utils.vision_io).
  2. VQGAN codes -> vision tokens: each frame's h*w codes and END_OF_FRAME, END_OF_VISION after the last.
  3. The prompt, one BOS then the original's template (lwm.text.chat_template.vision_chat_prompt):
         <s>You are a helpful assistant. USER: {question}\\n<vision>{vision tokens}</vision> ASSISTANT:
     (`<vision>`, `</vision>` and the text are tokenized text; only the vision tokens use the vision vocabulary).
  4. Prefill with the vision masks, decode text over the KV cache until EOS or max_new_tokens; print it.
The prompt + max_new_tokens budget is checked before anything is compiled. Bad flags or files: one line,
exit status 2. The answer itself is lwm.inference.vision.answer.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np
from ml_collections import ConfigDict

from lwm.cli.command import cli, parse
from lwm.inference import runtime
from lwm.inference.runtime import check_budget
from lwm.inference.vision import answer, vision_tokens
from lwm.text.chat_template import vision_chat_prompt as chat_prompt


def get_default_config() -> ConfigDict:
    c = runtime.vision_flags(ConfigDict())
    c.prompt = ""                              # the question about --input_file
    c.input_file = ""                          # an image (.png/.jpg/...) or a video (anything FFmpeg reads)
    c.max_n_frames = 8                         # longer videos are sampled uniformly down to this many frames
    c.temperature = 0.2                        # 0 = greedy
    c.max_new_tokens = 512
    c.lock()
    return c


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the entry point; returns the answer text, its token ids, the prompt and timings."""
    from lwm.inference.loader import load_model
    from lwm.utils.vision_io import load_frames
    from lwm.model.vqgan import VQGAN, VQGANConfig

    start = time.perf_counter()
    config = parse(sys.argv[1:] if argv is None else argv, get_default_config())
    if not config.prompt:
        raise ValueError("--prompt is required: the question to ask about --input_file")
    if not config.input_file:
        raise ValueError("--input_file is required: an image (.png/.jpg) or a video file")
    if config.max_n_frames < 1:
        raise ValueError(f"--max_n_frames={config.max_n_frames} must be >= 1")
    vq_config = VQGANConfig.load(config.vqgan_config)
    rt = runtime.setup(config, modality="vision,text", sample_mode="text")
    tokenizer, dtype, mesh, llama_config = rt.tokenizer, rt.dtype, rt.mesh, rt.model_config

    stats: dict = {}
    t0 = time.perf_counter()
    frames = load_frames(config.input_file, vq_config.resolution, config.max_n_frames)   # (T, S, S, 3)
    side = vq_config.codes_per_side
    placeholder = vision_tokens(np.zeros((len(frames), side, side), np.int32))           # same length, no compile
    check_budget(len(chat_prompt(tokenizer, config.prompt, placeholder)), config.max_new_tokens,
                 llama_config.max_sequence_length,
                 f"--input_file with {len(frames)} frame(s) and --max_new_tokens={config.max_new_tokens}")
    vqgan = VQGAN.load(config.vqgan_checkpoint or None, vq_config, seed=config.seed)
    _, codes = vqgan.encode(frames)                                                      # (T, h, w)
    prompt = chat_prompt(tokenizer, config.prompt, vision_tokens(np.asarray(codes)))
    stats.update(frames=len(frames), encode_s=time.perf_counter() - t0)

    with jax.set_mesh(mesh):
        model, params = load_model(llama_config, config.load_checkpoint, dtype, mesh, random_if_empty=True,
                                   seed=config.seed)
        ids = answer(model, params, prompt, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                     rng=jax.random.PRNGKey(config.seed), eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                     num_text=tokenizer.vocab_size, stats=stats, cache_dtype=config.cache_dtype)
    text = tokenizer.decode(ids)
    stats["total_s"] = time.perf_counter() - start
    print(f"Question: {config.prompt}\nAnswer: {text}", flush=True)
    print(f"({stats['frames']} frame(s), {stats['prompt_tokens']} prompt tokens, {stats['new_tokens']} new tokens in "
          f"{stats['run_s']:.2f} s ({stats['tokens_per_s']:.1f} tokens/s) after {stats['compile_s']:.2f} s compiling "
          f"(the first token after {stats['first_token_s']:.2f} s, compiling included); {stats['total_s']:.1f} s in all)",
          file=sys.stderr, flush=True)
    return dict(answer=text, tokens=ids, prompt=prompt, stats=stats)


if __name__ == "__main__":
    sys.exit(cli("lwm.vision_chat", main, get_default_config, __doc__))
