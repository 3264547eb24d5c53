"""Vision-language LLaMA: text path equals the text model, vision masks route embeddings and heads (checked
against a text LLaMA over the joint vocabulary), KV-cache decoding, tied heads, config and parameter tree."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import PartitionSpec as P

from lwm.model.llama import PRESETS, CacheMode, LLaMAConfig, LLaMAForCausalLM, init_cache
from lwm.parallel.sharding import match_partition_rules
from lwm.model.vision_llama import (END_OF_FRAME, END_OF_VISION, VisionLLaMAConfig, VisionLLaMAForCausalLM,
                              output_head_kernels)

B, T = 2, 16


def _text_config(cfg, **updates):
    """The LLaMAConfig part of a VisionLLaMAConfig."""
    fields = {f.name for f in dataclasses.fields(LLaMAConfig)}
    return LLaMAConfig.from_dict({**{k: v for k, v in cfg.to_dict().items() if k in fields}, **updates})


@pytest.fixture(scope="module")
def tiny_vision():
    """(cfg, model, params, ids (B, T), vision masks (B, T)): the tiny vision-language preset, dense attention,
    random init, one batch of interleaved text and vision tokens."""
    cfg = VisionLLaMAConfig.load("tiny").replace(attention_impl="dense")  # attention impls: tested elsewhere
    model = VisionLLaMAForCausalLM(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), bool))["params"]
    # Interleaved modalities: row 0 is text, a 2-frame clip with its markers, text; row 1 starts with vision.
    masks = np.zeros((B, T), bool)
    masks[0, 3:11], masks[1, :7] = True, True
    rng = np.random.default_rng(0)
    text_ids = rng.integers(0, cfg.vocab_size, (B, T))
    vision_ids = rng.integers(0, 8192, (B, T))
    vision_ids[0, 6], vision_ids[0, 10], vision_ids[1, 6] = END_OF_FRAME, END_OF_VISION, END_OF_VISION
    vision_ids[1, 5] = 100  # also a valid text id, for a negative control that reads the wrong table
    ids = jnp.asarray(np.where(masks, vision_ids, text_ids), jnp.int32)
    return cfg, model, params, ids, jnp.asarray(masks)


def _joint_reference(cfg, params, ids, masks):
    """The same network as a text-only LLaMA over the joint vocabulary [text (V) | vision (W)]: vision id i
    becomes V + i, the embedding and output tables are the two stacked. Returns (text (B,T,V), vision (B,T,W))."""
    v = cfg.vocab_size
    joint_cfg = _text_config(cfg, vocab_size=v + cfg.vision_vocab_size)
    text_k, vision_k = output_head_kernels(params, cfg)
    joint = {
        "transformer": {
            "wte": {"embedding": jnp.concatenate([params["transformer"]["wte"]["embedding"],
                                                  params["transformer"]["vte"]["embedding"]])},
            "h": params["transformer"]["h"], "ln_f": params["transformer"]["ln_f"]},
        "lm_head": {"kernel": jnp.concatenate([text_k, vision_k], axis=1)},
    }
    logits = LLaMAForCausalLM(joint_cfg).apply({"params": joint}, jnp.where(masks, ids + v, ids))
    return logits[..., :v], logits[..., v:]


def test_text_path_equals_text_model(tiny_vision):
    cfg, model, params, ids, _ = tiny_vision
    text_ids = jnp.where(ids < cfg.vocab_size, ids, 7)
    no_vision = jnp.zeros_like(text_ids, bool)
    text_model = LLaMAForCausalLM(_text_config(cfg))
    text_params = {"transformer": {k: params["transformer"][k] for k in ("wte", "h", "ln_f")},
                   "lm_head": params["lm_head"]}
    expected = text_model.apply({"params": text_params}, text_ids)                     # (B, T, V)
    _, text_logits = model.apply({"params": params}, text_ids, no_vision)
    np.testing.assert_allclose(text_logits, expected, atol=1e-6)
    text_only = VisionLLaMAForCausalLM(cfg.replace(sample_mode="text"))
    np.testing.assert_allclose(text_only.apply({"params": params}, text_ids), expected, atol=1e-6)
    # Negative control: marking position 5 as vision changes position 5 onwards, and nothing before it.
    _, moved = model.apply({"params": params}, text_ids, no_vision.at[:, 5].set(True))
    np.testing.assert_allclose(moved[:, :5], expected[:, :5], atol=1e-6)
    assert float(jnp.abs(moved[:, 5:] - expected[:, 5:]).max(axis=-1).min()) > 1e-4


def test_vision_masks_route_embeddings_and_heads(tiny_vision):
    cfg, model, params, ids, masks = tiny_vision
    vision_logits, text_logits = model.apply({"params": params}, ids, masks)
    assert vision_logits.shape == (B, T, cfg.vision_vocab_size) and text_logits.shape == (B, T, cfg.vocab_size)
    ref_text, ref_vision = _joint_reference(cfg, params, ids, masks)
    np.testing.assert_allclose(text_logits, ref_text, atol=1e-5)
    np.testing.assert_allclose(vision_logits, ref_vision, atol=1e-5)
    # Negative control: the reference without the vision offset reads vision ids from the text table.
    wrong_text, _ = _joint_reference(cfg, params, ids, jnp.zeros_like(masks))
    assert float(jnp.abs(wrong_text - text_logits).max()) > 1e-2
    # sample_mode picks the output; return_hidden and the head kernels give the same logits.
    vision_only = VisionLLaMAForCausalLM(cfg.replace(sample_mode="vision")).apply({"params": params}, ids, masks)
    np.testing.assert_array_equal(vision_only, vision_logits)
    hidden = model.apply({"params": params}, ids, masks, return_hidden=True)            # (B, T, D)
    text_k, vision_k = output_head_kernels(params, cfg)
    np.testing.assert_allclose(hidden @ text_k, text_logits, atol=1e-5)
    np.testing.assert_allclose(hidden @ vision_k, vision_logits, atol=1e-5)


def test_kv_cache_decoding_equals_full_forward(tiny_vision):
    cfg, model, params, ids, masks = tiny_vision
    vision_full, text_full = model.apply({"params": params}, ids, masks)
    prompt = 4
    cache = init_cache(cfg, B, 24)
    (vision_out, text_out), cache = model.apply({"params": params}, ids[:, :prompt], masks[:, :prompt],
                                                cache=cache, cache_mode=CacheMode.PREFILL)
    step = jax.jit(lambda p, tok, m, c, i: model.apply({"params": p}, tok, m, cache=c, cache_index=i,
                                                       cache_mode=CacheMode.DECODE))
    vision_steps, text_steps = [vision_out], [text_out]
    for i in range(prompt, T):
        (v, t), cache = step(params, ids[:, i:i + 1], masks[:, i:i + 1], cache, jnp.int32(i))
        vision_steps.append(v), text_steps.append(t)
    np.testing.assert_allclose(jnp.concatenate(vision_steps, 1), vision_full, atol=2e-5)
    np.testing.assert_allclose(jnp.concatenate(text_steps, 1), text_full, atol=2e-5)
    # Vision generation: no masks, sample_mode='vision' embeds every new token with vte (row 1 is vision
    # at positions 0..6); a decode step that wrongly uses the text table does not match.
    gen = VisionLLaMAForCausalLM(cfg.replace(sample_mode="vision"))
    _, cache = gen.apply({"params": params}, ids[:, :5], cache=init_cache(cfg, B, 24), cache_mode=CacheMode.PREFILL)
    logits, _ = jax.jit(lambda p, tok, c, i: gen.apply({"params": p}, tok, cache=c, cache_index=i,
                                                       cache_mode=CacheMode.DECODE))(
        params, ids[:, 5:6], cache, jnp.int32(5))
    np.testing.assert_allclose(logits[1, 0], vision_full[1, 5], atol=2e-5)
    (as_text, _), _ = step(params, ids[:, 5:6], jnp.zeros((B, 1), bool), cache, jnp.int32(5))
    assert float(jnp.abs(as_text[1, 0] - vision_full[1, 5]).max()) > 1e-3


def test_tied_embeddings(tiny_vision):
    cfg, _, params, ids, masks = tiny_vision
    tied_cfg = cfg.replace(tie_vision_embeddings=True, tie_word_embeddings=True)
    tied = VisionLLaMAForCausalLM(tied_cfg)
    shapes = jax.eval_shape(lambda: tied.init(jax.random.key(0), ids[:, :4], masks[:, :4]))["params"]
    assert set(shapes) == {"transformer"}                                               # no heads
    tied_params = {"transformer": params["transformer"]}
    vision_logits, text_logits = tied.apply({"params": tied_params}, ids, masks)
    text_k, vision_k = output_head_kernels(tied_params, tied_cfg)
    np.testing.assert_array_equal(vision_k, params["transformer"]["vte"]["embedding"].T)
    ref_params = {**tied_params, "lm_head": {"kernel": text_k}, "vision_head": {"kernel": vision_k}}
    ref_text, ref_vision = _joint_reference(cfg, ref_params, ids, masks)
    np.testing.assert_allclose(vision_logits, ref_vision, atol=1e-5)
    np.testing.assert_allclose(text_logits, ref_text, atol=1e-5)


def test_config_and_errors(tiny_vision, tmp_path):
    cfg, model, params, ids, masks = tiny_vision
    assert (cfg.vision_vocab_size, cfg.tie_vision_embeddings, cfg.sample_mode) == (8448, False, "all")
    assert cfg.hidden_size == LLaMAConfig.load("tiny").hidden_size
    assert VisionLLaMAConfig.from_text_config(LLaMAConfig.load("7b"), sample_mode="vision").sample_mode == "vision"
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**PRESETS["tiny"], "vision_vocab_size": 8704, "sample_mode": "text"}))
    loaded = VisionLLaMAConfig.load(f"json::{path}")
    assert (loaded.vision_vocab_size, loaded.sample_mode) == (8704, "text")
    with pytest.raises(ValueError, match="sample_mode"):
        cfg.replace(sample_mode="video")
    with pytest.raises(ValueError, match="unknown LLaMAConfig keys.*vision_vocab"):
        LLaMAConfig.load("tiny").replace(vision_vocab=1)
    with pytest.raises(ValueError, match="end-of-vision"):
        cfg.replace(vision_vocab_size=8192)
    with pytest.raises(ValueError, match="vision_masks are required"):
        model.apply({"params": params}, ids)
    with pytest.raises(ValueError, match="vision_masks shape"):
        model.apply({"params": params}, ids, masks[:, :3])


def test_parameter_tree_and_sharding_rules():
    cfg = VisionLLaMAConfig.load("tiny")
    init = lambda c: VisionLLaMAForCausalLM(c).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                                     jnp.zeros((1, 4), bool))["params"]
    shapes = jax.eval_shape(lambda: init(cfg))
    names = {"/".join(k): v.shape for k, v in flatten_dict(shapes).items()}
    text_names = {"/".join(k): v.shape for k, v in flatten_dict(jax.eval_shape(
        lambda: LLaMAForCausalLM(LLaMAConfig.load("tiny")).init(jax.random.key(0), jnp.zeros((1, 4), int))
    )["params"]).items()}
    assert names == {**text_names, "transformer/vte/embedding": (8448, 64), "vision_head/kernel": (64, 8448)}
    specs = {"/".join(k): v for k, v in flatten_dict(match_partition_rules(shapes, cfg)).items()}
    assert specs["transformer/vte/embedding"] == P("tp", ("fsdp", "sp"))
    assert specs["vision_head/kernel"] == P(("fsdp", "sp"), "tp")
    # The 7B vision model: the text model plus two (8448, 4096) tables.
    big = VisionLLaMAConfig.load("7b")
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jax.eval_shape(lambda: init(big))))
    n_text = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jax.eval_shape(
        lambda: LLaMAForCausalLM(LLaMAConfig.load("7b")).init(jax.random.key(0), jnp.zeros((1, 4), int)))))
    assert n == n_text + 2 * 8448 * 4096
