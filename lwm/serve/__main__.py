"""`python -m lwm.serve`: serve an LWM text or vision model over the OpenAI HTTP API (docs/serve.md).

    python -m lwm.serve --load_llama_config=7b --load_checkpoint=params::/ckpt/LWM-Text-Chat-1M/params \
        --tokenizer=/ckpt/tokenizer.model --dtype=bf16 --port=8000 --api_key=secret
    python -m lwm.serve --modality=vision,text --load_llama_config=7b --load_checkpoint=params::/ckpt/LWM-Chat/params \
        --vqgan_checkpoint=/ckpt/vqgan --tokenizer=/ckpt/tokenizer.model

Model flags are the chat entry points' (lwm.text_chat, lwm.vision_chat: --load_llama_config,
--update_llama_config, --load_checkpoint, --tokenizer, --mesh_dim, --dtype, --vqgan_*); the server binds to
127.0.0.1 unless --host says otherwise. Then open http://127.0.0.1:8000/ for the chat page, or point any
OpenAI client at http://127.0.0.1:8000/v1. Bad flags or files: one line, exit status 2.

Across hosts (docs/serve.md, "Across hosts"): start the same command on every process with the
--jax_distributed.* flags (each its own process_id); process 0 serves HTTP and schedules, the others run the
same engine calls on their shards of the mesh (lwm.serve.replicated) and return when process 0 stops.
"""
from __future__ import annotations

import signal
import sys
from typing import Sequence

from ml_collections import ConfigDict

from lwm.cli.command import cli, parse
from lwm.inference import runtime


def get_default_config() -> ConfigDict:
    c = ConfigDict()
    c.modality = "text"                        # text | vision,text (alias vision; LWM-Chat: image/video in, images out)
    runtime.vision_flags(c)                    # the model flags, --vqgan_*, --seed
    c.tokenizer = "LargeWorldModel/LWM-Text-Chat-1M"
    c.max_n_frames = 8                         # frames taken from a video
    c.max_image_bytes = 1 << 27                # an image decoding to more bytes (W x H x bytes/pixel) is a 400
    c.max_video_pixels = 1 << 30               # a video of more frames x width x height is a 400
    c.max_chars_per_token = 32                 # a text of more characters than this x max_sequence_length is a 400 before tokenizing
    c.model_name = ""                          # the id clients send as `model`; '' = 'lwm-text' / 'lwm-vision'
    c.host = "127.0.0.1"
    c.port = 8000
    c.api_key = ""                             # '' = no key needed
    c.max_batch_size = 8                       # decode slots (rows decoded together)
    c.max_queue = 64                           # requests waiting for a slot; more get 429
    c.decode_steps_per_call = 16               # decode steps per engine call while every recent client decodes (docs/serve.md)
    c.batch_wait_ms = 20.0                     # an idle engine waits this long for the rest of a burst (0 = never)
    c.warmup_prompt_lengths = ""               # e.g. '64,1024': compile these prompt lengths' shapes before serving
    c.max_step_tokens = 0                      # decode + prefill-chunk tokens per scheduler step; 0 = --prefill_chunk + --max_batch_size
    c.default_max_tokens = 256                 # budget of a request that sets no max_tokens
    c.allow_local_media = False                # read plain file paths in image/video parts
    c.max_body_bytes = 32 << 20                # larger request bodies get 413 (base64 makes images 4/3 larger)
    c.header_timeout_s = 10.0                  # a connection's request headers must arrive within this
    c.body_timeout_s = 60.0                    # a request body must arrive within this after its headers (408)
    c.keep_alive_s = 5                         # an idle keep-alive connection is closed after this
    c.max_connections = 512                    # open connections + running requests; beyond it 503 (0 = no cap)
    return c


def main(argv: Sequence[str]) -> None:
    import jax
    import uvicorn

    from lwm.serve import create_app
    from lwm.serve.edge import server_config
    from lwm.serve.loading import is_vision, load_served, prefill_settings

    config = parse(argv, get_default_config())
    for flag in ("max_batch_size", "decode_steps_per_call"):
        if config[flag] < 1:
            raise ValueError(f"--{flag}={config[flag]}: must be >= 1")
    if config.batch_wait_ms < 0:
        raise ValueError(f"--batch_wait_ms={config.batch_wait_ms}: must be >= 0")
    try:
        warmup = [int(x) for x in str(config.warmup_prompt_lengths).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--warmup_prompt_lengths={config.warmup_prompt_lengths!r}: give comma-separated prompt "
                         "lengths in tokens, e.g. 64,1024") from None
    engine, tokenizer, vqgan, mesh = load_served(config)
    prefix_cache, prefill_chunk, max_step_tokens = prefill_settings(engine, config, mesh)
    leader = None
    if jax.process_count() > 1:
        from lwm.serve.replicated import ReplicatedEngine, serve_follower

        if jax.process_index() != 0:                  # --host/--port are process 0's; here they are unused
            print(f"lwm.serve: process {jax.process_index()} of {jax.process_count()} runs process 0's engine "
                  "calls", file=sys.stderr, flush=True)
            with jax.set_mesh(mesh):
                calls = serve_follower(engine)
            print(f"lwm.serve: process {jax.process_index()}: process 0 stopped after {calls} engine calls",
                  file=sys.stderr, flush=True)
            return
        engine = leader = ReplicatedEngine(engine)
        if prefix_cache is not None:                  # one on every process, with process 0's budget
            try:
                prefix_cache = leader.prefix_cache(prefix_cache.budget_bytes, prefix_cache.block_size)
            except BaseException:
                leader.close()                        # the followers return
                raise
        signal.signal(signal.SIGTERM, signal.default_int_handler)   # as Ctrl-C: uvicorn stops, then `finally`
    name = config.model_name or ("lwm-vision" if is_vision(config) else "lwm-text")
    app = create_app(engine, tokenizer, model_name=name, vqgan=vqgan, api_key=config.api_key or None,
                     max_batch_size=config.max_batch_size, max_queue=config.max_queue,
                     allow_local_media=config.allow_local_media, max_n_frames=config.max_n_frames,
                     default_max_tokens=config.default_max_tokens, mesh=mesh,
                     decode_steps_per_call=config.decode_steps_per_call, warmup_prompt_lengths=warmup,
                     batch_wait_ms=config.batch_wait_ms, max_body_bytes=config.max_body_bytes,
                     body_timeout_s=config.body_timeout_s, max_image_bytes=config.max_image_bytes,
                     max_video_pixels=config.max_video_pixels, max_chars_per_token=config.max_chars_per_token,
                     prefix_cache=prefix_cache, prefill_chunk=prefill_chunk, max_step_tokens=max_step_tokens)
    print(f"lwm.serve: {name} on http://{config.host}:{config.port}/ (OpenAI API under /v1)", file=sys.stderr,
          flush=True)
    try:
        uvicorn.Server(server_config(app, host=config.host, port=config.port,
                                     header_timeout_s=config.header_timeout_s, keep_alive_s=config.keep_alive_s,
                                     max_connections=config.max_connections or None)).run()
    finally:
        if leader is not None:                        # across hosts: the followers return
            leader.close()


if __name__ == "__main__":
    sys.exit(cli("lwm.serve", main, get_default_config, __doc__))
