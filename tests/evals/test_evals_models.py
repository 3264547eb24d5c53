"""The long-context suite on real models: `python -m lwm.eval_long` on a tiny random LWM checkpoint through
the JAX path (blockwise attention on one device, and RingAttention over dp=2 x sp=4) and on the same weights
converted to a Hugging Face LlamaForCausalLM through transformers' PyTorch path: identical prompts give
identical greedy answers, record for record."""
import json
import os

os.environ.setdefault("NPROC", "32")   # room for concurrent CPU collectives of the simulated devices

import numpy as np
import pytest

from lwm.evals import vocab

TASKS = "niah_single_noise,fwe,coref"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import LlamaForCausalLM

    from lwm.checkpoint import hf_tensors
    from lwm.checkpoint.formats import save_streaming
    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM
    from lwm.text.tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("evals_models")
    from lwm.evals import suite
    from lwm.evals.haystack import Haystack

    texts = ["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
             " ".join(vocab.WORDS)]
    texts += [t.make(0, 10, 50.0, Haystack(["An essay sentence."], "e"))["message"] for t in suite.text_tasks().values()]
    tok = train_sentencepiece(texts, str(d / "tokenizer.model"), 512)
    config = LLaMAConfig.load("tiny")
    model = LLaMAForCausalLM(config)
    params = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 8), jnp.int32))["params"]
    # Larger weights than the init's, so that greedy choices are far from ties.
    params = jax.tree.map(lambda x: x * 4.0 if x.ndim == 2 else x, params)
    save_streaming(str(d / "params"), params)
    hf = LlamaForCausalLM(hf_tensors.lwm_config_to_hf(config)).eval()
    state = hf_tensors.lwm_params_to_hf_state_dict({"params": jax.tree.map(np.asarray, params)}, config)
    hf.load_state_dict({k: hf_tensors.to_torch(v) for k, v in state.items()}, strict=True)
    hf.save_pretrained(str(d / "hf"))
    (d / "hf" / "tokenizer.model").write_bytes((d / "tokenizer.model").read_bytes())
    return d, tok


def _flags(d, out, extra=()):
    return [f"--tasks={TASKS}", "--lengths=400,600", "--depths=0,100", "--n_samples=1", "--seed=5",
            f"--output_dir={out}", "--progress=False", "--plots=False", *extra]


def _lwm(d, impl, mesh):
    return ["--load_llama_config=tiny", f"--update_llama_config=dict(attention_impl='{impl}')",
            f"--load_checkpoint=params::{d / 'params'}", f"--tokenizer={d / 'tokenizer.model'}",
            f"--mesh_dim={mesh}"]


@pytest.mark.slow
def test_jax_and_torch_paths_give_the_same_greedy_answers(models):
    from lwm import eval_long

    d, tok = models
    eval_long.main(_flags(d, d / "torch", [f"--hf_model={d / 'hf'}"]))
    eval_long.main(_flags(d, d / "jax", _lwm(d, "blockwise", "1,1,1,-1")))
    eval_long.main(_flags(d, d / "ring", _lwm(d, "ring", "2,1,1,4")))
    runs = {name: json.loads((d / name / "results.json").read_text()) for name in ("torch", "jax", "ring")}
    ref = runs["torch"]["records"]
    assert len(ref) == 3 * 2 * 2
    assert len({r["response"] for r in ref}) > 4             # the model says different things to different prompts
    assert sum(r["new_tokens"] for r in ref) > 40
    for name in ("jax", "ring"):
        recs = runs[name]["records"]
        assert [(r["task"], r["length"], r["depth"], r["seed"], r["prompt_tokens"]) for r in recs] == \
            [(r["task"], r["length"], r["depth"], r["seed"], r["prompt_tokens"]) for r in ref]
        assert [r["response"] for r in recs] == [r["response"] for r in ref], name
        assert runs[name]["summary"]["tasks"].keys() == runs["torch"]["summary"]["tasks"].keys()
    assert (d / "jax" / "summary.md").read_text().startswith("| task | 400 | 600 | effective length |")


def test_entry_point_flag_errors(models, tmp_path):
    from lwm import eval_long

    d, _ = models
    with pytest.raises(FileNotFoundError, match="--hf_model=.*not a local directory"):
        eval_long.main(_flags(d, tmp_path, ["--hf_model=/no/such/model"]))
    with pytest.raises(ValueError, match="need --haystack_file"):
        eval_long.main(_flags(d, tmp_path, ["--tasks=niah_single_essay", f"--hf_model={d / 'hf'}"]))
    with pytest.raises(ValueError, match="give --hf_model"):
        eval_long.main(_flags(d, tmp_path))
    with pytest.raises(ValueError, match="--lengths=.*integers"):
        eval_long.main(_flags(d, tmp_path, ["--lengths=1k", f"--hf_model={d / 'hf'}"]))
