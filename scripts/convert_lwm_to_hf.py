"""Convert an LWM Jax text checkpoint (streaming `params::` format) to a Hugging Face LlamaForCausalLM directory.
Hardware: CPU only; host memory about 2x the checkpoint in the chosen dtype (7B in bf16: ~28 GB).
Expected output: OUTPUT_DIR with config.json, generation_config.json, model*.safetensors (+ tokenizer files).

    python scripts/convert_lwm_to_hf.py --load_checkpoint params::/ckpt/streaming_params \
        --llama_config 7b --update_llama_config '{"theta": 50000000, "max_sequence_length": 1048576}' \
        --tokenizer /ckpt/tokenizer.model --output_dir /out/lwm-text-1m-hf --dtype bf16
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load_checkpoint", required=True,
                   help="params::PATH, trainstate_params::PATH, trainstate::PATH, flax_params::PATH or orbax::DIR")
    p.add_argument("--llama_config", required=True, help="a preset (tiny, 7b, ...) or json::path")
    p.add_argument("--update_llama_config", default="",
                   help='JSON object of config fields to change, e.g. \'{"theta": 50000000}\'')
    p.add_argument("--output_dir", required=True)
    p.add_argument("--tokenizer", default="", help="a sentencepiece tokenizer.model, or a directory holding one")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the written weights")
    p.add_argument("--max_shard_size", default="5GB")
    return p.parse_args(argv)


def load_config(args):
    from lwm.llama import LLaMAConfig

    config = LLaMAConfig.load(args.llama_config)
    if args.update_llama_config:
        try:
            updates = json.loads(args.update_llama_config)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--update_llama_config: not a JSON object ({e})")
        if not isinstance(updates, dict):
            raise SystemExit("--update_llama_config: expected a JSON object of config fields")
        config = config.replace(**updates)
    return config


def load_params(spec: str):
    """The inner linen params tree from any --load_checkpoint spec, as stored (no target: either layout)."""
    from lwm.checkpoint import load_checkpoint

    if spec.startswith("orbax::"):
        raise SystemExit("--load_checkpoint orbax::... needs the model's shapes; load it with lwm.checkpoint "
                         "and save params:: first, or pass a streaming checkpoint")
    train_state, params = load_checkpoint(spec)
    tree = params if params is not None else train_state["params"]
    while set(tree.keys()) == {"params"}:
        tree = tree["params"]
    return tree


def save_tokenizer(path: str, output_dir: str) -> None:
    from transformers import LlamaTokenizer

    model_file = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path
    if not os.path.isfile(model_file):
        raise SystemExit(f"--tokenizer {path}: no sentencepiece tokenizer.model there")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(model_file, os.path.join(tmp, "tokenizer.model"))
        # LLaMA prompts start with BOS; transformers 5 adds none unless told.
        tokenizer = LlamaTokenizer.from_pretrained(tmp, local_files_only=True, add_bos_token=True)
    tokenizer.save_pretrained(output_dir)
    shutil.copy(model_file, os.path.join(output_dir, "tokenizer.model"))


def main(argv=None):
    args = parse_args(argv)
    import ml_dtypes
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM

    from lwm.hf_convert import lwm_config_to_hf, lwm_params_to_hf_state_dict, to_torch

    config = load_config(args)
    params = load_params(args.load_checkpoint)
    dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[DTYPES[args.dtype]]
    state_dict = lwm_params_to_hf_state_dict(params, config, dtype=dtype)
    del params
    hf_config = lwm_config_to_hf(config, dtype=DTYPES[args.dtype])
    with torch.device("meta"):                  # no second copy of the weights: they are assigned below
        model = LlamaForCausalLM(hf_config)
    model.load_state_dict({k: to_torch(v) for k, v in state_dict.items()}, strict=True, assign=True)
    if hf_config.tie_word_embeddings:
        model.tie_weights()
    os.makedirs(args.output_dir, exist_ok=True)
    model.save_pretrained(args.output_dir, max_shard_size=args.max_shard_size)
    if args.tokenizer:
        save_tokenizer(args.tokenizer, args.output_dir)
    n = sum(v.size for k, v in state_dict.items() if not (hf_config.tie_word_embeddings and k == "lm_head.weight"))
    print(f"wrote {args.output_dir}: {n / 1e6:.2f}M parameters, {hf_config.num_hidden_layers} layers, "
          f"dtype {DTYPES[args.dtype]}{', tokenizer' if args.tokenizer else ''}")


if __name__ == "__main__":
    main()
