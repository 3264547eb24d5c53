"""`python -m lwm.convert` both ways against transformers' torch LLaMA: a Llama-3-style base (GQA, `llama3` RoPE
scaling, tied embeddings) and a `linear`-scaled one come in from HF folders (safetensors, sharded, bf16, .bin)
with logits equal to torch's, round trips are bit-exact, the text export stops generating at the tokenizer's
EOS, and a vision model leaves and comes back with unchanged logits."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from lwm.checkpoint import formats as ckpt
from lwm import convert
from lwm.checkpoint.hf_folders import HFWeights, export_hf
from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM

LLAMA3 = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
              bos_token_id=1, eos_token_id=2,
              # original_max 16 so that positions up to 24 reach the scaled, smoothed and kept bands
              rope_parameters=dict(rope_type="llama3", rope_theta=500.0, factor=8.0, low_freq_factor=1.0,
                                   high_freq_factor=4.0, original_max_position_embeddings=16))
LINEAR = dict(LLAMA3, tie_word_embeddings=False, num_key_value_heads=4,
              rope_parameters=dict(rope_type="linear", rope_theta=1000.0, factor=4.0))


def _hf_folder(path, fields, dtype=torch.float32, **save):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    with torch.no_grad():                        # non-trivial norms, so swapping two would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model = model.to(dtype)
    model.save_pretrained(str(path), **save)
    return model


def _from_hf(hf_dir, out, scan="true", dtype=""):
    convert.main(["from_hf", "--hf_dir", str(hf_dir), "--output", f"params::{out}/params",
                  "--config_out", f"{out}/config.json", "--scan_layers", scan] + (["--dtype", dtype] if dtype else []))
    config = LLaMAConfig.load(f"json::{out}/config.json")
    _, params = ckpt.load_checkpoint(f"params::{out}/params")
    return config, params["params"]


def _ours(config, params, ids):
    return np.asarray(jax.jit(LLaMAForCausalLM(config).apply)({"params": params}, jnp.asarray(ids, jnp.int32)))


IDS = np.random.default_rng(1).integers(0, 256, (2, 24))


@pytest.mark.parametrize("fields", [LLAMA3, LINEAR], ids=["llama3-gqa-tied", "linear"])
def test_hf_base_imports_with_torch_logits(tmp_path, fields):
    model = _hf_folder(tmp_path / "hf", fields)
    with torch.no_grad():
        theirs = model(torch.tensor(IDS)).logits.numpy()
    for scan in ("true", "false") if fields is LLAMA3 else ("true",):
        config, params = _from_hf(tmp_path / "hf", tmp_path / f"ours_{scan}", scan)
        assert config.scan_layers == (scan == "true")
        assert config.rope_scaling_type == fields["rope_parameters"]["rope_type"]
        assert ("lm_head" in params) != fields["tie_word_embeddings"]
        assert np.abs(_ours(config, params, IDS) - theirs).max() < 1e-4
    # Negative control: the same weights without the RoPE scaling give other logits.
    assert np.abs(_ours(config.replace(rope_scaling_type=""), params, IDS) - theirs).max() > 1e-3


def test_round_trips_are_bit_exact(tmp_path):
    # HF (sharded safetensors) -> ours -> HF: identical tensors.
    _hf_folder(tmp_path / "hf", LLAMA3, max_shard_size="100KB")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    original = HFWeights(str(tmp_path / "hf"))
    config, params = _from_hf(tmp_path / "hf", tmp_path / "ours")
    export_hf(params, config, str(tmp_path / "back"))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(original) - {"lm_head.weight"}           # tied: one copy on disk
    for name in back:
        np.testing.assert_array_equal(back[name], original[name], err_msg=name)
    hf_cfg = json.load(open(tmp_path / "back" / "config.json"))
    assert hf_cfg["rope_parameters"] == {**LLAMA3["rope_parameters"]} and hf_cfg["tie_word_embeddings"]
    # ours -> HF -> ours: identical tree (unscanned too).
    for scan in ("true", "false"):
        cfg2, params2 = _from_hf(tmp_path / "back", tmp_path / f"again_{scan}", scan)
        if scan == "true":
            assert cfg2 == config
            a, b = flatten_dict(params), flatten_dict(params2)
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
        else:
            np.testing.assert_array_equal(params2["transformer"]["h"]["1"]["attention"]["wk"]["kernel"],
                                          params["transformer"]["h"]["scan_decoder"]["attention"]["wk"]["kernel"][1])


def test_bf16_and_bin_folders(tmp_path):
    # bf16 safetensors stay bf16 bit for bit; a .bin folder (read with torch.load(weights_only=True)) too.
    model = _hf_folder(tmp_path / "hf", LINEAR, dtype=torch.bfloat16)
    _, params = _from_hf(tmp_path / "hf", tmp_path / "ours")
    wte = params["transformer"]["wte"]["embedding"]
    assert wte.dtype == jnp.bfloat16
    np.testing.assert_array_equal(wte.view(np.int16), model.model.embed_tokens.weight.view(torch.int16).numpy())
    os.makedirs(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    _, from_bin = _from_hf(tmp_path / "bin", tmp_path / "ours_bin", dtype="fp32")
    np.testing.assert_array_equal(from_bin["lm_head"]["kernel"], params["lm_head"]["kernel"].astype(np.float32))


@pytest.mark.parametrize("change, field", [
    (dict(model_type="gemma"), "model_type"), (dict(sliding_window=32), "sliding_window"),
    (dict(attention_bias=True), "attention_bias"), (dict(head_dim=32), "head_dim"),
    (dict(rope_parameters=dict(rope_type="proportional", rope_theta=1e4, factor=4.0)), "rope_type")])
def test_unsupported_configs_name_the_field(tmp_path, capsys, change, field):
    os.makedirs(tmp_path / "hf")
    fields = {**LLAMA3, "model_type": "llama", **change}
    if "sliding_window" in change:
        fields["model_type"] = "mistral"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError) as e:
        convert.main(["from_hf", "--hf_dir", str(tmp_path / "hf"), "--output", f"params::{tmp_path}/p",
                      "--config_out", f"{tmp_path}/c.json"])
    assert field in str(e.value) and "config.json" in str(e.value) and "\n" not in str(e.value)


def test_mistral_without_short_window_imports(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    fields = {k: v for k, v in LINEAR.items() if k != "rope_parameters"}
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**fields, sliding_window=None, rope_theta=1000.0)).eval()
    model.save_pretrained(str(tmp_path / "hf"))
    config, params = _from_hf(tmp_path / "hf", tmp_path / "ours")
    with torch.no_grad():
        theirs = model(torch.tensor(IDS)).logits.numpy()
    assert np.abs(_ours(config, params, IDS) - theirs).max() < 1e-4


def test_orbax_output(tmp_path):
    _hf_folder(tmp_path / "hf", LINEAR)
    convert.main(["from_hf", "--hf_dir", str(tmp_path / "hf"), "--output", f"orbax::{tmp_path}/orbax",
                  "--config_out", f"{tmp_path}/config.json"])
    config = LLaMAConfig.load(f"json::{tmp_path}/config.json")
    shapes = jax.eval_shape(lambda: LLaMAForCausalLM(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    _, params = ckpt.load_checkpoint(f"orbax::{tmp_path}/orbax", params_target=shapes["params"])
    _, direct = ckpt.load_checkpoint(f"hf::{tmp_path}/hf", params_target=shapes["params"])
    a, b = flatten_dict(params["params"]), flatten_dict(direct["params"])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=str(k))
