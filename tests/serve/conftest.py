"""Fixtures of the server tests: the tiny text and vision-language engines that tests/serve/test_serve*.py put
behind `lwm.serve.create_app` (support.serving.running_server starts it on a loopback port)."""
import pytest


@pytest.fixture(scope="module")
def text_engine(tmp_path_factory):
    """dict(engine, tok, tok_file, cfg, model, params): the tiny text preset (max_sequence_length 256) with random
    weights drawn on the host (support.serving.host_random_params, seed 0), the output head scaled by 8 so that
    greedy choices sit far from ties, and the small tokenizer (support.small_tokenizer) written to tok_file."""
    import jax

    from lwm.inference.engine import Engine
    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM
    from support import small_tokenizer
    from support.serving import host_random_params

    tok_dir = tmp_path_factory.mktemp("tok")
    tok = small_tokenizer(tok_dir)
    cfg = LLaMAConfig.load("tiny").replace(max_sequence_length=256)
    model = LLaMAForCausalLM(cfg)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 8.0 if "lm_head" in jax.tree_util.keystr(p) else x, host_random_params(model, 0))
    engine = Engine(model, params, eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_size=tok.vocab_size)
    return dict(engine=engine, tok=tok, tok_file=tok_dir / "tokenizer.model", cfg=cfg, model=model, params=params)


@pytest.fixture(scope="module")
def vision_engine(tmp_path_factory):
    """dict(engine, tok, vqgan, dir): the tiny vision-language preset (max_sequence_length 512, sample_mode 'text',
    for chat) with host-drawn random weights (seed 0), the tiny VQGAN (32x32 frames -> 8x8 codes, seed 0) and the
    small tokenizer, written to `dir` (a fresh folder the tests may add files to)."""
    from lwm.inference.engine import Engine
    from lwm.model.vision_llama import VisionLLaMAConfig, VisionLLaMAForCausalLM
    from lwm.model.vqgan import VQGAN, VQGANConfig
    from support import small_tokenizer
    from support.serving import host_random_params

    d = tmp_path_factory.mktemp("vision")
    tok = small_tokenizer(d)
    cfg = VisionLLaMAConfig.load("tiny").replace(max_sequence_length=512, sample_mode="text")
    model = VisionLLaMAForCausalLM(cfg)
    engine = Engine(model, host_random_params(model, 0), eos_id=tok.eos_id, pad_id=tok.pad_id,
                    vocab_size=tok.vocab_size)
    return dict(engine=engine, tok=tok, vqgan=VQGAN.load(None, VQGANConfig.load("tiny"), seed=0), dir=d)
