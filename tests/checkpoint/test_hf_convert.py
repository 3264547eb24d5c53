"""LWM <-> Hugging Face conversion: exact round trips, logits parity with transformers' torch LLaMA, scripts."""
import io
import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict
from transformers import AutoTokenizer, LlamaForCausalLM

from lwm.checkpoint import formats as ckpt
from lwm.checkpoint import hf_tensors
from lwm.checkpoint.hf_tensors import hf_to_lwm_items, lwm_config_to_hf, lwm_params_to_hf_state_dict
from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny_random_norms():
    """The tiny preset (N=4 query heads, K=2 kv heads: grouped-query attention), random non-trivial params
    (norm weights too, so swapping two norms would show)."""
    cfg = LLaMAConfig.load("tiny").replace(attention_impl="dense", theta=500.0)
    model = LLaMAForCausalLM(cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    params = {k: (rng.standard_normal(s.shape) * 0.3 + (1.0 if "norm" in k[-2] or k[-2] == "ln_f" else 0.0)
                  ).astype(np.float32) for k, s in flatten_dict(shapes).items()}
    return cfg, model, unflatten_dict(params)



def hf_state_dict_to_lwm_params(state_dict, config, scan_layers=None, dtype=None) -> dict:
    """{HF name: array or torch tensor} -> LWM linen params (the inner tree), by lwm's hf_to_lwm_items."""
    from flax.traverse_util import unflatten_dict

    return unflatten_dict(dict(hf_to_lwm_items(state_dict, config, scan_layers, dtype)))

def _layouts(params, cfg):
    """The same weights as scanned (axis 0), scanned (axis 1) and unscanned LWM trees."""
    flat = flatten_dict(params)
    axis1, unscanned = {}, {}
    for k, v in flat.items():
        if k[:3] == ("transformer", "h", "scan_decoder"):
            axis1[k] = np.moveaxis(v, 0, 1)
            for i in range(cfg.num_hidden_layers):
                unscanned[("transformer", "h", str(i)) + k[3:]] = v[i]
        else:
            axis1[k] = unscanned[k] = v
    return {(True, 0): params, (True, 1): unflatten_dict(axis1), (False, 0): unflatten_dict(unscanned)}


def _assert_same(a, b):
    """Bitwise equality of two LWM trees or two HF state dicts (flat already)."""
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


def test_round_trip_is_exact_for_every_layout(tiny_random_norms):
    cfg, _, params = tiny_random_norms
    reference_sd = None
    for (scan, axis), tree in _layouts(params, cfg).items():
        c = cfg.replace(scan_layers=scan, param_scan_axis=axis)
        sd = lwm_params_to_hf_state_dict({"params": tree}, c)
        assert sd["model.layers.1.self_attn.k_proj.weight"].shape == (2 * 16, 64)        # (K*H, D)
        if reference_sd is None:
            reference_sd = sd
        _assert_same(sd, reference_sd)                     # the layout does not change the HF weights
        _assert_same(hf_state_dict_to_lwm_params(sd, c, scan_layers=scan), tree)
    # bf16 stays bf16, bit for bit.
    bf16 = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)
    sd = lwm_params_to_hf_state_dict(bf16, cfg)
    torch_sd = {k: hf_tensors.to_torch(v) for k, v in sd.items()}
    assert torch_sd["lm_head.weight"].dtype == torch.bfloat16
    _assert_same(hf_state_dict_to_lwm_params(torch_sd, cfg), bf16)


def test_rotary_permutation_within_each_head():
    # One kv head of H=4: LWM output features (0,1) and (2,3) are rotary pairs; HF pairs (0,2) and (1,3).
    kernel = np.arange(2 * 8, dtype=np.float32).reshape(2, 8)          # (D=2, K*H=2*4)
    out = hf_tensors._interleaved_to_halves(kernel, heads=2)
    np.testing.assert_array_equal(out[0], [0, 2, 1, 3, 4, 6, 5, 7])
    np.testing.assert_array_equal(hf_tensors._halves_to_interleaved(out, heads=2), kernel)


def _hf_model(cfg, state_dict):
    model = LlamaForCausalLM(lwm_config_to_hf(cfg)).eval()
    model.load_state_dict({k: hf_tensors.to_torch(v) for k, v in state_dict.items()}, strict=True)
    return model


def test_logits_match_transformers_torch(tiny_random_norms, monkeypatch):
    cfg, model, params = tiny_random_norms
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12))
    ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32)))
    hf = _hf_model(cfg, lwm_params_to_hf_state_dict(params, cfg))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - theirs).max() < 1e-4
    # Negative control: without the rotary permutation the same check fails.
    monkeypatch.setattr(hf_tensors, "_interleaved_to_halves", lambda kernel, heads: kernel)
    wrong = _hf_model(cfg, lwm_params_to_hf_state_dict(params, cfg))
    with torch.no_grad():
        assert np.abs(ours - wrong(torch.tensor(ids)).logits.numpy()).max() > 1e-2
    monkeypatch.undo()

    # The other direction: a model made by transformers runs the same in LWM.
    torch.manual_seed(0)
    theirs_model = LlamaForCausalLM(lwm_config_to_hf(cfg)).eval()
    back = hf_state_dict_to_lwm_params(theirs_model.state_dict(), cfg)
    with torch.no_grad():
        expected = theirs_model(torch.tensor(ids)).logits.numpy()
    got = np.asarray(jax.jit(model.apply)({"params": back}, jnp.asarray(ids, jnp.int32)))
    assert np.abs(got - expected).max() < 1e-4


def test_tied_embeddings_config_and_errors(tiny_random_norms):
    cfg, _, params = tiny_random_norms
    tied_cfg = cfg.replace(tie_word_embeddings=True)
    tied = {k: v for k, v in params.items() if k != "lm_head"}
    sd = lwm_params_to_hf_state_dict(tied, tied_cfg)
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]
    _assert_same(hf_state_dict_to_lwm_params(sd, tied_cfg), tied)
    hf_cfg = lwm_config_to_hf(tied_cfg)
    assert (hf_cfg.tie_word_embeddings, hf_cfg.num_key_value_heads, hf_cfg.head_dim) == (True, 2, 16)
    assert hf_cfg.rope_parameters["rope_theta"] == 500.0
    assert hf_cfg.max_position_embeddings == cfg.max_sequence_length
    assert LLaMAConfig.from_dict(hf_tensors.hf_config_to_lwm(hf_cfg)).replace(
        attention_impl="dense", scan_query_chunk_size=64, scan_key_chunk_size=64, scan_mlp_chunk_size=64,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id) == tied_cfg

    with pytest.raises(ValueError, match=r"h/scan_decoder/feed_forward/w1/kernel: shape \(2, 64, 128\) does "
                                         r"not match the config's \(2, 64, 96\)"):
        lwm_params_to_hf_state_dict(params, cfg.replace(intermediate_size=96))
    with pytest.raises(KeyError, match="missing lm_head"):
        lwm_params_to_hf_state_dict(tied, cfg)
    with pytest.raises(ValueError, match="vte/embedding"):
        lwm_params_to_hf_state_dict({**params, "vte": {"embedding": np.zeros((3, 64))}}, cfg)
    sd = lwm_params_to_hf_state_dict(params, cfg)
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        hf_state_dict_to_lwm_params(sd, cfg)


def _train_tokenizer(path):
    import sentencepiece as spm

    rnd = random.Random(0)
    words = "the cat sat on a mat hello world paris france capital of is what where why large model".split()
    texts = [" ".join(rnd.choice(words) for _ in range(30)) for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=320, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2, num_threads=1)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path)).vocab_size()


def _run(script, *args):
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", script), *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_convert_and_sample_scripts_end_to_end(tmp_path, tiny_random_norms):
    _, _, tiny_params = tiny_random_norms
    vocab = _train_tokenizer(tmp_path / "tokenizer.model")
    cfg = LLaMAConfig.load("tiny").replace(vocab_size=vocab, attention_impl="dense", theta=500.0)
    model = LLaMAForCausalLM(cfg)
    params = {**tiny_params, "transformer": {**tiny_params["transformer"], "wte": {
        "embedding": tiny_params["transformer"]["wte"]["embedding"][:vocab]}},
        "lm_head": {"kernel": tiny_params["lm_head"]["kernel"][:, :vocab] * 3.0}}
    ckpt.save_streaming(str(tmp_path / "streaming_params"), params, float_dtype="fp32")
    out_dir = tmp_path / "hf"
    printed = _run("convert_lwm_to_hf.py", f"--load_checkpoint=params::{tmp_path / 'streaming_params'}",
                   "--llama_config", "tiny", "--update_llama_config", f'{{"vocab_size": {vocab}, "theta": 500}}',
                   "--output_dir", str(out_dir), "--tokenizer", str(tmp_path / "tokenizer.model"))
    assert "wrote" in printed and (out_dir / "model.safetensors").exists()

    # Greedy decoding with our JAX model, one compile for all steps (right padding cannot leak: causal).
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    prompt_ids = tokenizer("hello world what is").input_ids
    assert prompt_ids[0] == tokenizer.bos_token_id == 1
    max_new, width = 6, 24
    forward = jax.jit(lambda ids: model.apply({"params": params}, ids))
    ids = list(prompt_ids)
    for _ in range(max_new):
        logits = forward(jnp.asarray([ids + [0] * (width - len(ids))], jnp.int32))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
        if ids[-1] == tokenizer.eos_token_id:
            break
    assert len(set(ids[len(prompt_ids):])) > 1, "degenerate continuation: a weak check"
    expected = tokenizer.decode(ids, skip_special_tokens=True)

    hf = LlamaForCausalLM.from_pretrained(str(out_dir), local_files_only=True).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.numpy()
    assert np.abs(theirs - np.asarray(forward(jnp.asarray([ids + [0] * (width - len(ids))])))[:, :len(ids)]
                  ).max() < 1e-4
    printed = _run("sample_pyt.py", "--model", str(out_dir), "--prompt", "hello world what is",
                   "--max_new_tokens", str(max_new), "--temperature", "0")
    assert printed.strip() == expected.strip()
