"""Convert checkpoints between LWM and Hugging Face, both ways. CPU only; host memory about the model once in
the written dtype plus one layer stack (7B in bf16: ~14 GB). Seconds for small models, minutes for 7B.

    # A local HF LLaMA-family folder (Llama 2/3.x, GQA, linear/llama3 RoPE scaling, tied embeddings,
    # Mistral without a short sliding window) -> our streaming params + a json:: config for --load_llama_config
    python -m lwm.convert from_hf --hf_dir /models/Llama-3.2-1B --output params::/ckpt/llama3_1b/streaming_params \
        --config_out /ckpt/llama3_1b/config.json --dtype bf16
    # Our text (or, with --vision, vision) checkpoint -> a Hugging Face folder
    python -m lwm.convert to_hf --load_checkpoint params::/ckpt/streaming_params --llama_config 7b \
        --update_llama_config '{"theta": 50000000, "max_sequence_length": 1048576}' \
        --tokenizer /ckpt/tokenizer.model --output_dir /out/lwm-text-1m-hf --dtype bf16
"""
from __future__ import annotations

import argparse
import json
import os
import sys

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lwm.convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="direction", required=True)
    f = sub.add_parser("from_hf", help="a local Hugging Face folder -> params::PATH or orbax::DIR + json config")
    f.add_argument("--hf_dir", required=True, help="a local folder with config.json and *.safetensors or *.bin")
    f.add_argument("--output", required=True, help="params::PATH (streaming) or orbax::DIR")
    f.add_argument("--config_out", required=True, help="where to write the JSON config (load it with "
                   "--load_llama_config json::PATH)")
    f.add_argument("--dtype", default="", choices=[""] + sorted(DTYPES), help="floats as stored if empty")
    f.add_argument("--scan_layers", default="true", choices=["true", "false"],
                   help="stack the layers as h/scan_decoder (true) or keep h/<i> (false)")
    f.add_argument("--param_scan_axis", type=int, default=0, choices=[0, 1])
    f.add_argument("--update_llama_config", default="", help="JSON object of config fields to change")
    t = sub.add_parser("to_hf", help="our params/train-state/orbax checkpoint -> a Hugging Face folder")
    t.add_argument("--load_checkpoint", required=True,
                   help="params::PATH, trainstate_params::PATH, trainstate::PATH, flax_params::PATH, "
                        "orbax::DIR or hf::DIR")
    t.add_argument("--llama_config", "--load_llama_config", dest="llama_config", required=True,
                   help="a preset (tiny, 7b, ...) or json::path")
    t.add_argument("--update_llama_config", default="", help="JSON object of config fields to change")
    t.add_argument("--vision", action="store_true", help="a vision-language model (lwm.model.vision_llama)")
    t.add_argument("--vqgan_config", default="released", help="VQGAN preset or json::path (vision only)")
    t.add_argument("--vqgan_checkpoint", default="", help="VQGAN params file to copy beside (vision only)")
    t.add_argument("--output_dir", required=True)
    t.add_argument("--tokenizer", default="", help="a sentencepiece tokenizer.model, or a folder holding one")
    t.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the written weights")
    t.add_argument("--max_shard_size", default="5GB")
    return p.parse_args(argv)


def _updates(text: str) -> dict:
    if not text:
        return {}
    try:
        updates = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--update_llama_config: not a JSON object ({e})") from None
    if not isinstance(updates, dict):
        raise SystemExit("--update_llama_config: expected a JSON object of config fields")
    return updates


def _np_dtype(name: str):
    import ml_dtypes
    import numpy as np

    return None if not name else {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16,
                                  "float16": np.float16}[DTYPES[name]]


def from_hf(args) -> str:
    import jax
    from flax.traverse_util import unflatten_dict

    from lwm.checkpoint import formats as ckpt
    from lwm.checkpoint.hf_folders import iter_hf_params, lwm_config_from_hf

    scan = args.scan_layers == "true"
    kind, sep, path = args.output.partition("::")
    if not sep or kind not in ("params", "orbax"):
        raise SystemExit(f"--output {args.output!r}: expected params::PATH or orbax::DIR")
    config = lwm_config_from_hf(args.hf_dir, scan_layers=scan, param_scan_axis=args.param_scan_axis,
                                **_updates(args.update_llama_config))
    tree = unflatten_dict(dict(iter_hf_params(args.hf_dir, scan, args.param_scan_axis, _np_dtype(args.dtype))))
    for d in {os.path.dirname(os.path.abspath(p)) for p in (path, args.config_out)}:
        os.makedirs(d, exist_ok=True)
    if kind == "params":
        ckpt.save_streaming(path, tree)
    else:
        ckpt.save_orbax(path, tree)
    with open(args.config_out, "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    n = sum(v.size for v in jax.tree.leaves(tree))
    return (f"wrote {args.output} ({n / 1e6:.2f}M parameters, {config.num_hidden_layers} layers, "
            f"{'scanned' if scan else 'unscanned'}) and {args.config_out} (--load_llama_config "
            f"json::{args.config_out})")


def to_hf(args) -> str:
    from lwm.checkpoint.formats import load_checkpoint
    from lwm.checkpoint.hf_folders import export_hf

    if args.vision:
        from lwm.model.vision_llama import VisionLLaMAConfig as Config
        from lwm.model.vqgan import VQGANConfig

        vqgan = VQGANConfig.load(args.vqgan_config)
    else:
        from lwm.model.llama import LLaMAConfig as Config

        vqgan = None
    config = Config.load(args.llama_config)
    config = config.replace(**_updates(args.update_llama_config))
    target = None
    if args.load_checkpoint.startswith("orbax::"):          # orbax needs the shapes
        import jax
        import jax.numpy as jnp

        if args.vision:
            from lwm.model.vision_llama import VisionLLaMAForCausalLM as Model
        else:
            from lwm.model.llama import LLaMAForCausalLM as Model
        ids = jnp.zeros((1, 1), jnp.int32)
        init = (lambda: Model(config).init(jax.random.key(0), ids, jnp.zeros((1, 1), bool))) if args.vision \
            else (lambda: Model(config).init(jax.random.key(0), ids))
        target = jax.eval_shape(init)["params"]
    _, params = load_checkpoint(args.load_checkpoint, params_target=target)
    tree = params["params"]
    while set(tree.keys()) == {"params"}:
        tree = tree["params"]
    summary = export_hf(tree, config, args.output_dir, tokenizer=args.tokenizer, dtype=_np_dtype(args.dtype),
                        max_shard_size=args.max_shard_size, vqgan_config=vqgan,
                        vqgan_checkpoint=args.vqgan_checkpoint)
    return (f"wrote {args.output_dir}: {summary['parameters'] / 1e6:.2f}M parameters, "
            f"{config.num_hidden_layers} layers, dtype {summary['dtype']}, bos/eos "
            f"{summary['bos_token_id']}/{summary['eos_token_id']}"
            f"{', vision' if summary['vision'] else ''}{', tokenizer' if summary['tokenizer'] else ''}")


def main(argv=None):
    args = parse_args(argv)
    try:
        print(from_hf(args) if args.direction == "from_hf" else to_hf(args))
    except (ValueError, KeyError, FileNotFoundError) as e:      # bad input: one line, no traceback
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        sys.exit(f"lwm.convert {args.direction}: {msg}")


if __name__ == "__main__":
    main()
