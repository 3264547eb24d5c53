"""What the server tests share: a tiny text model with random weights and a small sentencepiece tokenizer,
and a uvicorn server on a free loopback port running `lwm.serve.create_app` in a thread."""
from __future__ import annotations

import contextlib
import threading
import time

import jax
import jax.numpy as jnp

from _data_fixtures import free_port


@contextlib.contextmanager
def running_server(app):
    """Serve `app` on 127.0.0.1:<free port> in a thread; yields the base URL ('http://127.0.0.1:PORT')."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def host_random_params(model, seed: int = 0):
    """Random weights with the model's init law drawn on the host (nothing compiled: `model.init` of the
    tiny preset takes most of a minute to compile on a loaded 2-core machine)."""
    from lwm.inference.loader import param_shapes, random_params

    return random_params(param_shapes(model.config), model.config, seed=seed)


def tiny_text_model(max_sequence_length: int = 256, seed: int = 0):
    """(config, model, params): the tiny preset with random weights, the output head sharpened so that greedy
    choices sit far from ties."""
    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM

    cfg = LLaMAConfig.load("tiny").replace(max_sequence_length=max_sequence_length)
    model = LLaMAForCausalLM(cfg)
    params = host_random_params(model, seed)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 8.0 if "lm_head" in jax.tree_util.keystr(p) else x, params)
    return cfg, model, params


def tiny_vision_served(directory, max_sequence_length: int = 512, seed: int = 0):
    """(engine, tokenizer, vqgan): the tiny vision-language preset with random weights (sample_mode 'text',
    for chat), the tiny VQGAN (32x32 frames -> 8x8 codes) and the small tokenizer written to `directory`."""
    from _data_fixtures import small_tokenizer

    from lwm.inference.engine import Engine
    from lwm.model.vision_llama import VisionLLaMAConfig, VisionLLaMAForCausalLM
    from lwm.model.vqgan import VQGAN, VQGANConfig

    tok = small_tokenizer(directory)
    cfg = VisionLLaMAConfig.load("tiny").replace(max_sequence_length=max_sequence_length, sample_mode="text")
    model = VisionLLaMAForCausalLM(cfg)
    params = host_random_params(model, seed)
    engine = Engine(model, params, eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_size=tok.vocab_size)
    return engine, tok, VQGAN.load(None, VQGANConfig.load("tiny"), seed=seed)
