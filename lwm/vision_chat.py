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

Several questions about one image or video: --interactive=True answers --prompt (or, without it, the first line
typed), then reads follow-up questions from standard input ('exit', 'quit' or end of input leaves). They are one
conversation (lwm.inference.vision.VisionChat: each question a turn appended after the previous answer), so the
frames are encoded once and, with the prefix cache (--prefix_cache_mb, default -1: a quarter of the free memory;
0: off), prefilled once: each follow-up copies the earlier turns' KV blocks and prefills only its new tokens
(--prefill_chunk at a time). The stats line on standard error says how many prompt tokens came from the cache.
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
from lwm.inference.vision import VisionChat, vision_tokens
from lwm.text.chat_template import vision_chat_prompt as chat_prompt


def get_default_config() -> ConfigDict:
    c = runtime.vision_flags(ConfigDict())
    c.prompt = ""                              # the question about --input_file
    c.input_file = ""                          # an image (.png/.jpg/...) or a video (anything FFmpeg reads)
    c.max_n_frames = 8                         # longer videos are sampled uniformly down to this many frames
    c.temperature = 0.2                        # 0 = greedy
    c.max_new_tokens = 512
    c.interactive = False                      # after --prompt, follow-up questions from standard input
    c.lock()
    return c


EXIT_WORDS = ("exit", "quit")


def _stats_line(stats: dict) -> str:
    return (f"({stats['frames']} frame(s), {stats['prompt_tokens']} prompt tokens ({stats['cached_tokens']} from the "
            f"prefix cache), {stats['new_tokens']} new tokens in {stats['run_s']:.2f} s ({stats['tokens_per_s']:.1f} "
            f"tokens/s) after {stats['compile_s']:.2f} s compiling (the first token after "
            f"{stats['first_token_s']:.2f} s, compiling included); {stats['total_s']:.1f} s in all)")


def main(argv: Optional[Sequence[str]] = None, stdin=None) -> dict:
    """Run the entry point; returns the first answer's text, its token ids, its prompt and timings, and `turns`:
    one dict (question, answer, tokens, stats) per question asked."""
    from lwm.inference.engine import Engine
    from lwm.inference.loader import load_model
    from lwm.inference.sampling import PromptTooLongError
    from lwm.utils.vision_io import load_frames
    from lwm.model.vqgan import VQGAN, VQGANConfig

    start = time.perf_counter()
    stdin = stdin or sys.stdin
    config = parse(sys.argv[1:] if argv is None else argv, get_default_config())
    if not config.prompt and not config.interactive:
        raise ValueError("--prompt is required: the question to ask about --input_file (or --interactive=True "
                         "to type the questions)")
    if not config.input_file:
        raise ValueError("--input_file is required: an image (.png/.jpg) or a video file")
    if config.max_n_frames < 1:
        raise ValueError(f"--max_n_frames={config.max_n_frames} must be >= 1")
    vq_config = VQGANConfig.load(config.vqgan_config)
    rt = runtime.setup(config, modality="vision,text", sample_mode="text")
    tokenizer, dtype, mesh, llama_config = rt.tokenizer, rt.dtype, rt.mesh, rt.model_config

    t0 = time.perf_counter()
    frames = load_frames(config.input_file, vq_config.resolution, config.max_n_frames)   # (T, S, S, 3)
    side = vq_config.codes_per_side
    placeholder = vision_tokens(np.zeros((len(frames), side, side), np.int32))           # same length, no compile
    check_budget(len(chat_prompt(tokenizer, config.prompt, placeholder)), config.max_new_tokens,
                 llama_config.max_sequence_length,
                 f"--input_file with {len(frames)} frame(s) and --max_new_tokens={config.max_new_tokens}")
    vqgan = VQGAN.load(config.vqgan_checkpoint or None, vq_config, seed=config.seed)
    _, codes = vqgan.encode(frames)                                    # (T, h, w): once, for every question
    codes = np.asarray(codes)
    encode_s = time.perf_counter() - t0

    def questions():
        if config.prompt:
            yield config.prompt
        while config.interactive:
            print("USER: ", end="", flush=True)
            line = stdin.readline()
            if not line or line.strip() in EXIT_WORDS:
                return
            if line.strip():
                yield line.strip()

    turns = []
    with jax.set_mesh(mesh):
        model, params = load_model(llama_config, config.load_checkpoint, dtype, mesh, random_if_empty=True,
                                   seed=config.seed)
        engine = Engine(model, params, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                        vocab_size=tokenizer.vocab_size, cache_dtype=config.cache_dtype, head="text")
        chat = VisionChat(engine, tokenizer, vision_tokens(codes), max_new_tokens=config.max_new_tokens,
                          temperature=config.temperature, seed=config.seed,
                          prefix_cache=runtime.prefix_cache_from_flags(engine, config),
                          prefill_chunk=runtime.prefill_chunk_from_flags(engine, config))
        for question in questions():
            stats = dict(frames=len(frames), encode_s=encode_s if not turns else 0.0)
            try:
                ids = chat.ask(question, stats)
            except PromptTooLongError as e:
                if not turns:
                    raise
                print(f"[question not asked: {e}]", flush=True)
                continue
            text = tokenizer.decode(ids)
            stats["total_s"] = time.perf_counter() - start
            print(f"Question: {question}\nAnswer: {text}", flush=True)
            print(_stats_line(stats), file=sys.stderr, flush=True)
            turns.append(dict(question=question, answer=text, tokens=ids, prompt=chat.prompt, stats=stats))
            start = time.perf_counter()
    if not turns:
        return dict(answer="", tokens=[], prompt=None, stats={}, turns=[])
    first = turns[0]
    return dict(answer=first["answer"], tokens=first["tokens"], prompt=first["prompt"], stats=first["stats"],
                turns=turns)


if __name__ == "__main__":
    sys.exit(cli("lwm.vision_chat", main, get_default_config, __doc__))
