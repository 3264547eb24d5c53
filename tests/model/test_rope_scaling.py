"""RoPE scaling `yarn`, `dynamic` and `longrope` against transformers' torch LlamaForCausalLM with the same
weights: logits within 1e-4 in fp32 for a prefill past the original context and for a KV-cache decode that
crosses it (teacher-forced, one token per step, transformers' forward with its KV cache, `cache=`, formerly
past_key_values), each with a
negative control (the same weights without the scaling; for the length-dependent kinds, also the one-shot
prefill's logits, which decode must not reproduce). The base comes in through `python -m lwm.convert from_hf`,
goes back out with `to_hf` and in again (config unchanged, transformers' logits unchanged), and
`--update_llama_config` sets the new fields (a list of floats for longrope). Bad fields are one-line errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lwm import convert
from lwm.checkpoint import formats as ckpt
from lwm.checkpoint.hf_tensors import hf_config_to_lwm
from lwm.cli.values import parse_literal_dict
from lwm.model.llama import (CacheMode, LLaMAConfig, LLaMAForCausalLM, init_cache, rope_attention_factor,
                             rope_inv_freq)

TOL = 1e-4
M = 16                                  # the original (pretraining) context of every case
T = 24                                  # prefill length, past M; decode runs from P to T
P = 12                                  # decode prompt, inside M: longrope switches factors, dynamic starts growing
BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)
HALF = 64 // 4 // 2                     # H/2 = 8 rotated pairs
CASES = {
    # theta 500 with M = 16 puts the YaRN ramp at dims 0..2: kept, blended and interpolated pairs all occur
    "yarn": dict(rope_type="yarn", rope_theta=500.0, factor=4.0, original_max_position_embeddings=M),
    "yarn-mscale": dict(rope_type="yarn", rope_theta=500.0, factor=4.0, original_max_position_embeddings=M,
                        beta_fast=4.0, beta_slow=0.25, mscale=1.0, mscale_all_dim=0.5, truncate=False),
    "dynamic": dict(rope_type="dynamic", rope_theta=500.0, factor=4.0),           # grows above max_position (M)
    # Phi-3 style: no factor, so s = max_position / original = 4 and the attention factor sqrt(1 + ln 4 / ln 16)
    "longrope": dict(rope_type="longrope", rope_theta=500.0, original_max_position_embeddings=M,
                     short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5],
                     long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 8.0, 12.0, 16.0]),
}
IDS = np.random.default_rng(3).integers(3, 256, (1, T))


def _hf_fields(case):
    fields = dict(BASE, rope_parameters=dict(CASES[case]))
    if case == "dynamic":
        fields["max_position_embeddings"] = M
    return fields


def _hf_model(path, case):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_hf_fields(case))).eval()
    with torch.no_grad():                        # non-trivial norms
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(str(path))
    return model


def _from_hf(hf_dir, out):
    convert.main(["from_hf", "--hf_dir", str(hf_dir), "--output", f"params::{out}/params",
                  "--config_out", f"{out}/config.json"])
    _, params = ckpt.load_checkpoint(f"params::{out}/params")
    return LLaMAConfig.load(f"json::{out}/config.json"), params["params"]


def _theirs_prefill(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def _theirs_decode(model):
    """Logits (P..T-1) of a prompt of P tokens, then one teacher-forced token per step with the cache."""
    fresh = LlamaForCausalLM(model.config).eval()      # a fresh rotary state (dynamic remembers lengths)
    fresh.load_state_dict(model.state_dict())
    out = []
    with torch.no_grad():
        res = fresh(torch.tensor(IDS[:, :P]), use_cache=True)
        out.append(res.logits[:, -1].numpy())
        for t in range(P, T - 1):
            res = fresh(torch.tensor(IDS[:, t:t + 1]), cache=res.cache, use_cache=True)
            out.append(res.logits[:, -1].numpy())
    return np.stack(out, 1)                              # (1, T-P, V): next-token logits after positions P-1..T-2


def _ours_prefill(config, params):
    return np.asarray(jax.jit(LLaMAForCausalLM(config).apply)({"params": params}, jnp.asarray(IDS, jnp.int32)))


def _ours_decode(config, params):
    model = LLaMAForCausalLM(config)
    prefill = jax.jit(lambda p, ids, c: model.apply({"params": p}, ids, cache=c, cache_mode=CacheMode.PREFILL))
    step = jax.jit(lambda p, tok, c, i: model.apply({"params": p}, tok, cache=c, cache_index=i,
                                                    cache_mode=CacheMode.DECODE))
    logits, cache = prefill(params, jnp.asarray(IDS[:, :P], jnp.int32), init_cache(config, 1, T))
    out = [np.asarray(logits[:, -1])]
    for t in range(P, T - 1):
        logits, cache = step(params, jnp.asarray(IDS[:, t:t + 1], jnp.int32), cache, jnp.int32(t))
        out.append(np.asarray(logits[:, -1]))
    return np.stack(out, 1)


@pytest.mark.parametrize("case", list(CASES))
def test_equals_transformers_prefill_and_decode(tmp_path, case):
    model = _hf_model(tmp_path / "hf", case)
    config, params = _from_hf(tmp_path / "hf", tmp_path / "ours")
    assert config.rope_scaling_type == CASES[case]["rope_type"]
    assert config.rope_original_max_position == M
    prefill, decode = _theirs_prefill(model), _theirs_decode(model)
    ours_prefill, ours_decode = _ours_prefill(config, params), _ours_decode(config, params)
    assert np.abs(ours_prefill - prefill).max() < TOL
    assert np.abs(ours_decode - decode).max() < TOL
    # Negative controls: the same weights without the scaling miss transformers' prefill by more than 10 TOL.
    assert np.abs(_ours_prefill(config.replace(rope_scaling_type=""), params) - prefill).max() > 10 * TOL
    if case in ("dynamic", "longrope"):
        # The length rule matters: a cached decode is not the one-shot prefill (keys keep the frequencies of
        # the call that wrote them), so a rule that took the whole sequence's length would fail the check above.
        assert np.abs(decode - prefill[:, P - 1:T - 1]).max() > 10 * TOL


def test_inv_freq_and_attention_factor_equal_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for case in CASES:
        hf = LlamaConfig(**_hf_fields(case))
        ours = LLaMAConfig.from_dict(hf_config_to_lwm(hf))
        for seq_len in (None, M, M + 1, 40):
            inv, factor = ROPE_INIT_FUNCTIONS[CASES[case]["rope_type"]](hf, None, seq_len=seq_len)
            np.testing.assert_allclose(rope_inv_freq(ours, seq_len), inv.numpy(), rtol=1e-6, err_msg=case)
            assert rope_attention_factor(ours) == pytest.approx(factor, rel=1e-12), case


def test_round_trip_through_convert_both_ways(tmp_path):
    for case in ("yarn-mscale", "dynamic", "longrope"):
        model = _hf_model(tmp_path / case / "hf", case)
        config, _ = _from_hf(tmp_path / case / "hf", tmp_path / case / "ours")
        convert.main(["to_hf", "--load_checkpoint", f"params::{tmp_path}/{case}/ours/params",
                      "--load_llama_config", f"json::{tmp_path}/{case}/ours/config.json",
                      "--output_dir", str(tmp_path / case / "back")])
        written = json.load(open(tmp_path / case / "back" / "config.json"))["rope_parameters"]
        expected = dict(CASES[case], factor=4.0)          # longrope's implicit factor is written out
        assert {k: v for k, v in written.items() if k in expected} == pytest.approx(expected), case
        assert set(written) - set(expected) <= {"beta_fast", "beta_slow"}, case   # yarn defaults, made explicit
        again, _ = _from_hf(tmp_path / case / "back", tmp_path / case / "again")
        assert again == config, case
        back = LlamaForCausalLM.from_pretrained(str(tmp_path / case / "back")).eval()
        assert np.abs(_theirs_prefill(back) - _theirs_prefill(model)).max() < TOL, case


def test_update_llama_config_sets_the_fields(tmp_path):
    # A default-RoPE base, given longrope (lists of floats) and then yarn by --update_llama_config on export.
    fields = dict(BASE)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**fields, rope_parameters=dict(rope_type="default", rope_theta=500.0))).save_pretrained(
        str(tmp_path / "hf"))
    _from_hf(tmp_path / "hf", tmp_path / "ours")
    short, long = CASES["longrope"]["short_factor"], CASES["longrope"]["long_factor"]
    updates = {"longrope": f"dict(rope_scaling_type='longrope', rope_scaling_factor=4.0, rope_original_max_position=16, "
                           f"rope_short_factor={short}, rope_long_factor={long})",
               "yarn": "{'rope_scaling_type': 'yarn', 'rope_scaling_factor': 4.0, 'rope_original_max_position': 16, "
                       "'rope_mscale': 1.0, 'rope_mscale_all_dim': 0.5, 'rope_attention_factor': 1.25}"}
    for kind, text in updates.items():
        config = LLaMAConfig.load("tiny").replace(**parse_literal_dict(text))
        assert config.rope_scaling_type == kind and hash(config)        # lists became tuples
        convert.main(["to_hf", "--load_checkpoint", f"params::{tmp_path}/ours/params",
                      "--load_llama_config", f"json::{tmp_path}/ours/config.json",
                      "--update_llama_config", text, "--output_dir", str(tmp_path / kind)])
        written = json.load(open(tmp_path / kind / "config.json"))["rope_parameters"]
        assert written["rope_type"] == kind and written["factor"] == 4.0
        assert written["original_max_position_embeddings"] == 16
    assert written["attention_factor"] == 1.25 and written["mscale_all_dim"] == 0.5
    assert json.load(open(tmp_path / "longrope" / "config.json"))["rope_parameters"]["long_factor"] == long


@pytest.mark.parametrize("updates, field", [
    (dict(rope_scaling_type="ntk"), "rope_scaling_type='ntk'"),
    (dict(rope_scaling_type="longrope", rope_short_factor=[1.0] * 8, rope_long_factor=[1.0] * 7),
     "rope_long_factor has 7 values"),
    (dict(rope_scaling_type="longrope", rope_short_factor=[1.0] * 7 + [0.0], rope_long_factor=[1.0] * 8),
     "rope_short_factor="),
    (dict(rope_scaling_type="yarn", rope_beta_fast=1.0, rope_beta_slow=2.0), "rope_beta_fast=1.0"),
    (dict(rope_beta_slow=0.0), "rope_beta_slow=0.0"),
    (dict(rope_attention_factor=-1.0), "rope_attention_factor=-1.0"),
    (dict(rope_mscale=-0.5), "rope_mscale=-0.5"),
    (dict(rope_short_factor=["a"]), "rope_short_factor=('a',)"),
])
def test_bad_fields_are_one_line_errors(updates, field):
    with pytest.raises(ValueError) as e:
        LLaMAConfig.load("tiny").replace(**updates)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_unknown_hf_rope_type_names_the_field():
    hf = LlamaConfig(**dict(BASE, rope_parameters=dict(rope_type="proportional", rope_theta=500.0, factor=2.0)))
    with pytest.raises(ValueError) as e:
        hf_config_to_lwm(hf, source="x/config.json")
    assert "rope_type" in str(e.value) and "'proportional'" in str(e.value) and "\n" not in str(e.value)
