"""Our checkpoints out to Hugging Face: the `debug` preset's logits in torch, the text export's token ids,
generation config and chat template (generation stops at the tokenizer's EOS), and a vision model that
leaves as a folder, is run in PyTorch as docs/checkpoints.md shows, and loads back through `hf::DIR`."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict
from transformers import AutoTokenizer, LlamaForCausalLM

from lwm.checkpoint import formats as ckpt
from lwm import convert
from lwm.text.chat_template import HF_CHAT_TEMPLATE
from lwm.checkpoint.hf_tensors import lwm_config_to_hf, lwm_params_to_hf_state_dict, to_torch
from lwm.checkpoint.hf_folders import export_hf
from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM
from lwm.text.tokenizer import train_sentencepiece
from lwm.model.vision_llama import VisionLLaMAConfig, VisionLLaMAForCausalLM


def _random_params(model, *init_args, seed=0, scale=0.3):
    """Random weights (norms around 1, non-trivial); scale 0.05 for the 256-wide debug preset keeps logits
    at the size of a trained model's (a few units), where float32 sums agree to 1e-4."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *init_args)["params"])
    rng = np.random.default_rng(seed)
    return unflatten_dict({k: (rng.standard_normal(s.shape) * scale + ("norm" in k[-2] or k[-2] == "ln_f")
                               ).astype(np.float32) for k, s in flatten_dict(shapes).items()})


def _unscan(params, layers):
    flat = {}
    for k, v in flatten_dict(params).items():
        if k[:3] == ("transformer", "h", "scan_decoder"):
            flat.update({("transformer", "h", str(i)) + k[3:]: v[i] for i in range(layers)})
        else:
            flat[k] = v
    return unflatten_dict(flat)


@pytest.mark.slow
def test_debug_preset_logits_equal_torch_scanned_and_unscanned():
    cfg = LLaMAConfig.load("debug").replace(theta=10000.0)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 40))
    params = _random_params(LLaMAForCausalLM(cfg), jnp.zeros((1, 8), jnp.int32), scale=0.05)
    for scan, tree in ((True, params), (False, _unscan(params, cfg.num_hidden_layers))):
        c = cfg.replace(scan_layers=scan)
        ours = np.asarray(jax.jit(LLaMAForCausalLM(c).apply)({"params": tree}, jnp.asarray(ids)))
        hf = LlamaForCausalLM(lwm_config_to_hf(c)).eval()
        hf.load_state_dict({k: to_torch(v) for k, v in lwm_params_to_hf_state_dict(tree, c).items()}, strict=True)
        with torch.no_grad():
            theirs = hf(torch.tensor(ids)).logits.numpy()
        assert np.abs(theirs).max() > 1.0 and np.abs(ours - theirs).max() < 1e-4


def test_text_export_ids_template_and_generation_stops_at_eos(tmp_path):
    words = "the cat sat on a mat hello world paris france capital of is what".split()
    rng = np.random.default_rng(0)
    sp = train_sentencepiece([" ".join(rng.choice(words, 30)) for _ in range(200)], str(tmp_path / "tok.model"),
                             vocab_size=300)
    cfg = LLaMAConfig.load("tiny").replace(vocab_size=sp.vocab_size, attention_impl="dense")
    params = _random_params(LLaMAForCausalLM(cfg), jnp.zeros((1, 8), jnp.int32))
    params = jax.tree.map(lambda x: x * 0.1, params)
    # A model that answers EOS at once: every embedding has a large dimension 0, which lm_head maps to EOS.
    params["transformer"]["wte"]["embedding"][:, 0] += 20.0
    params["transformer"]["ln_f"]["kernel"][:] = 1.0
    params["lm_head"]["kernel"][0, sp.eos_id] += 10.0
    ckpt.save_streaming(str(tmp_path / "params"), params, float_dtype="fp32")
    convert.main(["to_hf", "--load_checkpoint", f"params::{tmp_path / 'params'}", "--llama_config", "tiny",
                  "--update_llama_config", json.dumps({"vocab_size": sp.vocab_size, "bos_token_id": 0,
                                                      "eos_token_id": 1}),
                  "--tokenizer", str(tmp_path / "tok.model"), "--output_dir", str(tmp_path / "hf")])
    config = json.load(open(tmp_path / "hf" / "config.json"))
    generation = json.load(open(tmp_path / "hf" / "generation_config.json"))
    # The tokenizer's ids win over the (original's wrong 0/1) config values.
    assert (config["bos_token_id"], config["eos_token_id"]) == (sp.bos_id, sp.eos_id) == (1, 2)
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert tokenizer.chat_template == HF_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert text == "<s>You are a helpful assistant. USER: hello ASSISTANT:"

    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    prompt = torch.tensor([tokenizer("the cat sat").input_ids])
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + 1 and out[0, -1].item() == sp.eos_id
    # Negative control: with the old eos id 1 in the generation config it never stops.
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=1, pad_token_id=1)
    assert out.shape[1] == prompt.shape[1] + 6


def torch_vision_logits(folder, ids, vision_masks):
    """The PyTorch use of a vision export, as docs/checkpoints.md shows it: (B, T) ids and vision mask ->
    (vision logits (B, T, W), text logits (B, T, V))."""
    from safetensors.torch import load_file

    model = LlamaForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    vision = load_file(f"{folder}/vision.safetensors")
    vte = vision["model.vision_embed_tokens.weight"]                              # (W, D)
    head = vision.get("vision_head.weight", vte)                                  # (W, D); tied: the table
    embeds = torch.where(vision_masks[..., None], vte[torch.where(vision_masks, ids, 0)],
                         model.get_input_embeddings()(torch.where(vision_masks, 0, ids)))
    with torch.no_grad():
        hidden = model.model(inputs_embeds=embeds).last_hidden_state               # (B, T, D)
        return hidden @ head.T, model.lm_head(hidden)


def test_vision_model_round_trips_with_unchanged_logits(tmp_path):
    from lwm.model.vqgan import VQGANConfig

    cfg = VisionLLaMAConfig.load("tiny").replace(attention_impl="dense")
    model = VisionLLaMAForCausalLM(cfg)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 20))
    masks = np.zeros((2, 20), bool)
    masks[:, 5:15] = True
    params = _random_params(model, jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), bool))
    ours = jax.jit(model.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(masks))
    export_hf(params, cfg, str(tmp_path / "hf"), vqgan_config=VQGANConfig.load("tiny"))
    meta = json.load(open(tmp_path / "hf" / "lwm_vision.json"))
    assert meta["vision_vocab_size"] == cfg.vision_vocab_size and meta["vqgan"]["resolution"] == 32
    assert (meta["end_of_frame"], meta["end_of_vision"]) == (8192, 8193)

    vision_t, text_t = torch_vision_logits(str(tmp_path / "hf"), torch.tensor(ids), torch.tensor(masks))
    assert np.abs(vision_t.numpy() - np.asarray(ours[0])).max() < 1e-4
    assert np.abs(text_t.numpy() - np.asarray(ours[1])).max() < 1e-4

    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                                               jnp.zeros((1, 8), bool))["params"])
    _, back = ckpt.load_checkpoint(f"hf::{tmp_path / 'hf'}", params_target=shapes)
    a, b = flatten_dict(params), flatten_dict(back["params"])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(b[k]), a[k], err_msg=str(k))
    again = jax.jit(model.apply)(back, jnp.asarray(ids), jnp.asarray(masks))
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(ours[0]))
    # The text-only loader refuses the vision tensors by name rather than dropping them.
    with pytest.raises(ValueError, match="vision"):
        export_hf(params, LLaMAConfig.load("tiny"), str(tmp_path / "bad"))
