"""The LLaMA model: config, parameter tree names, shapes of every preset, and KV-cache decoding."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from lwm.model.llama import PRESETS, CacheMode, LLaMAConfig, LLaMAForCausalLM, init_cache
from lwm.parallel.sharding import make_mesh


@pytest.fixture(scope="module")
def tiny_chunk16():
    """(cfg, model, params, ids (2, 32)): the tiny preset with 16-token query and key scan chunks (so 32 tokens
    take two chunks), random init."""
    cfg = LLaMAConfig.load("tiny").replace(scan_query_chunk_size=16, scan_key_chunk_size=16)
    model = LLaMAForCausalLM(cfg)
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 32), 0, cfg.vocab_size)
    params = model.init(jax.random.PRNGKey(0), ids[:, :8])["params"]
    return cfg, model, params, ids


def test_config_presets_and_errors(tmp_path):
    assert set(PRESETS) >= {"tiny", "debug", "200m", "1b", "3b", "7b", "13b", "30b", "65b"}
    cfg = LLaMAConfig.load("7b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.kv_heads) == (4096, 32, 32)
    with pytest.raises(ValueError, match="unknown LLaMAConfig keys.*'bogus'"):
        cfg.replace(bogus=1)
    with pytest.raises(ValueError, match="attention_impl"):
        cfg.replace(attention_impl="flash3")
    with pytest.raises(ValueError, match="scan_attention=True"):
        cfg.replace(attention_impl="dense", scan_attention=True)
    with pytest.raises(ValueError, match="pallas_interpret=True applies only"):
        cfg.replace(pallas_interpret=True)                  # 'blockwise' has no Pallas kernel to interpret
    assert cfg.replace(attention_impl="ring_pallas", pallas_interpret=True).pallas_interpret
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        cfg.replace(num_key_value_heads=5)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**PRESETS["debug"], "theta": 5e7, "model_type": "llama", "use_cache": True}))
    loaded = LLaMAConfig.load(f"json::{path}")
    assert loaded.theta == 5e7 and loaded.hidden_size == 256
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LLaMAConfig.load(f"json::{path}")
    with pytest.raises(ValueError, match="preset"):
        LLaMAConfig.load("8b")


@pytest.mark.parametrize("scan_layers", [True, False])
def test_parameter_tree_matches_original_names(scan_layers):
    cfg = LLaMAConfig.load("tiny").replace(scan_layers=scan_layers)
    shapes = jax.eval_shape(lambda: LLaMAForCausalLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), int)))
    names = {"/".join(k): v.shape for k, v in flatten_dict(shapes["params"]).items()}
    d, f, v, n, k, h, l = 64, 128, 512, 4, 2, 16, 2
    layer = {
        "attention/wq/kernel": (d, n * h), "attention/wk/kernel": (d, k * h), "attention/wv/kernel": (d, k * h),
        "attention/wo/kernel": (n * h, d), "feed_forward/w1/kernel": (d, f), "feed_forward/w2/kernel": (f, d),
        "feed_forward/w3/kernel": (d, f), "attention_norm/kernel": (d,), "ffn_norm/kernel": (d,),
    }
    expected = {"transformer/wte/embedding": (v, d), "transformer/ln_f/kernel": (d,), "lm_head/kernel": (d, v)}
    if scan_layers:
        expected.update({f"transformer/h/scan_decoder/{p}": (l, *s) for p, s in layer.items()})
    else:
        expected.update({f"transformer/h/{i}/{p}": s for i in range(l) for p, s in layer.items()})
    assert names == expected


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_eval_shape_every_preset(preset):
    cfg = LLaMAConfig.load(preset)
    shapes = jax.eval_shape(lambda: LLaMAForCausalLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), int)))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    d, f, v, lyr = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    kvd = cfg.kv_heads * cfg.head_dim
    assert n_params == 2 * v * d + d + lyr * (2 * d * d + 2 * d * kvd + 3 * d * f + 2 * d)
    if preset == "7b":
        assert 6.7e9 < n_params < 6.8e9


def test_scan_and_unrolled_layers_agree(tiny_chunk16):
    cfg, model, params, ids = tiny_chunk16
    logits = model.apply({"params": params}, ids)
    unrolled = {**params, "transformer": {**params["transformer"], "h": {
        str(i): jax.tree.map(lambda x: x[i], params["transformer"]["h"]["scan_decoder"])
        for i in range(cfg.num_hidden_layers)}}}
    other = LLaMAForCausalLM(cfg.replace(scan_layers=False)).apply({"params": unrolled}, ids)
    np.testing.assert_allclose(other, logits, atol=1e-5)
    for update in (dict(scan_mlp=True, scan_mlp_chunk_size=8), dict(remat_block="nothing_saveable"),
                   dict(attention_impl="dense")):
        out = LLaMAForCausalLM(cfg.replace(**update)).apply({"params": params}, ids)
        np.testing.assert_allclose(out, logits, atol=1e-5, err_msg=str(update))


def test_attn_pdrop_refused_in_training_only(tiny_chunk16):
    cfg, _, params, ids = tiny_chunk16
    model = LLaMAForCausalLM(cfg.replace(attn_pdrop=0.1))
    eval_logits = model.apply({"params": params}, ids)  # deterministic: the setting has nothing to do
    np.testing.assert_allclose(eval_logits, LLaMAForCausalLM(cfg).apply({"params": params}, ids), atol=1e-6)
    with pytest.raises(ValueError, match="attn_pdrop=0.1: dropout on the attention probabilities"):
        model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    # resid_pdrop is applied: training output differs from eval output.
    drop = LLaMAForCausalLM(cfg.replace(resid_pdrop=0.5)).apply(
        {"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    assert float(jnp.abs(drop - eval_logits).max()) > 1e-3


def _count_scans(cfg, params, ids):
    jaxpr = jax.make_jaxpr(lambda p: LLaMAForCausalLM(cfg).apply({"params": p}, ids))(params)
    return str(jaxpr).count("scan[")


def test_scan_mlp_applies_to_any_length(tiny_chunk16):
    """scan_mlp chunks the feed-forward even when T is not a multiple of the chunk (T is padded)."""
    cfg, _, params, ids = tiny_chunk16
    unrolled = {**params, "transformer": {**params["transformer"], "h": {
        str(i): jax.tree.map(lambda x: x[i], params["transformer"]["h"]["scan_decoder"])
        for i in range(cfg.num_hidden_layers)}}}
    base = cfg.replace(scan_layers=False, attention_impl="dense")
    ids = ids[:, :30]  # 30 = 3 chunks of 8 + 6
    plain = LLaMAForCausalLM(base).apply({"params": unrolled}, ids)
    chunked_cfg = base.replace(scan_mlp=True, scan_mlp_chunk_size=8)
    chunked = LLaMAForCausalLM(chunked_cfg).apply({"params": unrolled}, ids)
    np.testing.assert_allclose(chunked, plain, atol=1e-5)
    # One scan per layer's feed-forward, and none without scan_mlp (the negative control).
    assert _count_scans(chunked_cfg, unrolled, ids) == cfg.num_hidden_layers
    assert _count_scans(base, unrolled, ids) == 0


def _decode_token_by_token(model, params, cfg, ids, prompt_len, cache_len):
    cache = init_cache(cfg, ids.shape[0], cache_len)
    logits, cache = model.apply({"params": params}, ids[:, :prompt_len], cache=cache, cache_mode=CacheMode.PREFILL)
    step = jax.jit(lambda p, tok, c, i: model.apply({"params": p}, tok, cache=c, cache_index=i,
                                                    cache_mode=CacheMode.DECODE))
    outs = [logits]
    for i in range(prompt_len, ids.shape[1]):
        logits, cache = step(params, ids[:, i:i + 1], cache, jnp.int32(i))
        outs.append(logits)
    return jnp.concatenate(outs, axis=1)


def test_kv_cache_decoding_equals_full_forward(tiny_chunk16):
    cfg, model, params, ids = tiny_chunk16
    full = model.apply({"params": params}, ids)
    decoded = _decode_token_by_token(model, params, cfg, ids, prompt_len=16, cache_len=48)
    np.testing.assert_allclose(decoded, full, atol=2e-5)
    # Negative control: decoding with the wrong cache index must not match.
    cache = init_cache(cfg, 2, 48)
    _, cache = model.apply({"params": params}, ids[:, :16], cache=cache, cache_mode=CacheMode.PREFILL)
    wrong, _ = model.apply({"params": params}, ids[:, 16:17], cache=cache, cache_index=jnp.int32(20),
                           cache_mode=CacheMode.DECODE)
    assert float(jnp.abs(wrong[:, 0] - full[:, 16]).max()) > 1e-3


def test_cache_mode_is_explicit(tiny_chunk16):
    """The one prefill/decode switch is CacheMode, passed by the caller: a cached call without it, a prefill
    at another slot, a decode without slots and a mode without a cache all raise one line (what used to be
    guessed from isinstance(cache_index, int) is now an error). Prefill with cache_index None or 0 is the
    same pass."""
    cfg, model, params, ids = tiny_chunk16
    apply = functools.partial(model.apply, {"params": params})
    cache = init_cache(cfg, 2, 48)
    with pytest.raises(ValueError, match="needs cache_mode=CacheMode.PREFILL or CacheMode.DECODE"):
        apply(ids[:, :8], cache=cache, cache_index=0)
    with pytest.raises(ValueError, match="cache_index must be 0 or None"):
        apply(ids[:, :8], cache=cache, cache_index=jnp.int32(0), cache_mode=CacheMode.PREFILL)
    with pytest.raises(ValueError, match="DECODE needs cache_index"):
        apply(ids[:, :1], cache=cache, cache_mode=CacheMode.DECODE)
    with pytest.raises(ValueError, match="without a cache"):
        apply(ids[:, :1], cache_mode="decode")
    a_logits, a_cache = apply(ids[:, :8], cache=cache, cache_mode=CacheMode.PREFILL)
    b_logits, b_cache = apply(ids[:, :8], cache=cache, cache_index=0, cache_mode="prefill")
    np.testing.assert_array_equal(a_logits, b_logits)
    jax.tree.map(np.testing.assert_array_equal, a_cache, b_cache)


def test_kv_cache_sharded_over_sp(tiny_chunk16):
    cfg, _, params, ids = tiny_chunk16
    cfg = cfg.replace(attention_impl="ring")
    model = LLaMAForCausalLM(cfg)
    mesh = make_mesh("1,1,1,4", jax.devices()[:4])
    full = LLaMAForCausalLM(cfg.replace(attention_impl="dense")).apply({"params": params}, ids)
    with jax.set_mesh(mesh):
        decoded = _decode_token_by_token(model, params, cfg, ids, prompt_len=16, cache_len=64)
    np.testing.assert_allclose(decoded, full, atol=2e-5)


def test_context_parallel_settings_without_a_ring_are_reported_once(caplog):
    """A context-parallel setting with a non-context-parallel attention_impl says so, once; the shape twin
    (plain attention, default strategy) and a ring config say nothing (negative controls)."""
    cfg = LLaMAConfig.load("tiny")
    with caplog.at_level("WARNING", logger="lwm.model.llama"):
        cfg.replace(attention_impl="ring", context_parallel_strategy="ulysses").shape_twin()
        assert not caplog.records
        cfg.replace(context_parallel_strategy="all_gather", context_parallel_load_balance="striped")
        cfg.replace(context_parallel_strategy="all_gather", context_parallel_load_balance="striped")
    assert len(caplog.records) == 1
    assert "context_parallel_strategy='all_gather'" in caplog.text and "attention_impl='blockwise'" in caplog.text
