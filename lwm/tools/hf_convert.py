"""Checkpoint conversion between LWM and Hugging Face, both ways (the library of `python -m lwm.convert`).
CPU only; host memory about the model once in the written dtype plus one layer stack (7B in bf16: ~14 GB).

    convert_from_hf("/models/Llama-3.2-1B", "params::/ckpt/p", "/ckpt/config.json", dtype="bf16")
    convert_to_hf("params::/ckpt/p", "7b", "/out/hf", updates={"theta": 5e7}, tokenizer="/ckpt/tokenizer.model")

Tensor maps: lwm.checkpoint.hf_tensors; folder reading and writing: lwm.checkpoint.hf_folders. Each function
returns the one-line summary the command prints; bad input raises ValueError / FileNotFoundError naming the
flag or file.
"""
from __future__ import annotations

import json
import os
from typing import Optional


def np_dtype(name: str):
    """'' -> None (floats as stored); fp32 | bf16 | fp16 (or the long names) -> the numpy dtype, from the one
    dtype table (lwm.utils.dtypes). Raises ValueError naming --dtype for another name."""
    from lwm.utils.dtypes import parse_float_dtype

    return parse_float_dtype(name, what="--dtype", max_bytes=4)


def convert_from_hf(hf_dir: str, output: str, config_out: str, *, dtype: str = "", scan_layers: bool = True,
                    param_scan_axis: int = 0, updates: Optional[dict] = None) -> str:
    """A local HF LLaMA-family folder -> `output` (params::PATH, streaming, or orbax::DIR) and the LWM config
    as JSON at `config_out` (for --load_llama_config json::PATH). Layers stacked as h/scan_decoder on
    `param_scan_axis` when scan_layers, else h/<i>. Returns the summary line."""
    import jax
    from flax.traverse_util import unflatten_dict

    from lwm.checkpoint import formats as ckpt
    from lwm.checkpoint.hf_folders import iter_hf_params, lwm_config_from_hf

    kind, sep, path = output.partition("::")
    if not sep or kind not in ("params", "orbax"):
        raise ValueError(f"--output={output!r}: expected params::PATH or orbax::DIR")
    if param_scan_axis not in (0, 1):
        raise ValueError(f"--param_scan_axis={param_scan_axis}: expected 0 or 1")
    config = lwm_config_from_hf(hf_dir, scan_layers=scan_layers, param_scan_axis=param_scan_axis, **(updates or {}))
    tree = unflatten_dict(dict(iter_hf_params(hf_dir, scan_layers, param_scan_axis, np_dtype(dtype))))
    for d in {os.path.dirname(os.path.abspath(p)) for p in (path, config_out)}:
        os.makedirs(d, exist_ok=True)
    if kind == "params":
        ckpt.save_streaming(path, tree)
    else:
        ckpt.save_orbax(path, tree)
    with open(config_out + ".tmp", "w") as f:     # renamed into place: an earlier config is never half-written
        json.dump(config.to_dict(), f, indent=2)
    os.replace(config_out + ".tmp", config_out)
    n = sum(v.size for v in jax.tree.leaves(tree))
    return (f"wrote {output} ({n / 1e6:.2f}M parameters, {config.num_hidden_layers} layers, "
            f"{'scanned' if scan_layers else 'unscanned'}) and {config_out} (--load_llama_config "
            f"json::{config_out})")


def convert_to_hf(load_checkpoint: str, llama_config: str, output_dir: str, *, updates: Optional[dict] = None,
                  vision: bool = False, vqgan_config: str = "released", vqgan_checkpoint: str = "",
                  tokenizer: str = "", dtype: str = "fp32", max_shard_size: str = "5GB") -> str:
    """Our checkpoint (any --load_checkpoint spec) of the model `llama_config` (+ `updates`) -> a Hugging Face
    folder `output_dir` (config, safetensors shards of at most max_shard_size, the tokenizer when given; a
    vision model with its VQGAN config and params beside). The folder is written aside (`.tmp-NAME`) and
    renamed into place: an earlier export there is replaced whole, and kept whole if this one fails.
    Returns the summary line."""
    from lwm.checkpoint.formats import load_checkpoint as load
    from lwm.checkpoint.hf_folders import export_hf
    from lwm.utils.atomic import replace_dir

    if vision:
        from lwm.model.vision_llama import VisionLLaMAConfig as Config
        from lwm.model.vqgan import VQGANConfig

        vqgan = VQGANConfig.load(vqgan_config)
    else:
        from lwm.model.llama import LLaMAConfig as Config

        vqgan = None
    config = Config.load(llama_config).replace(**(updates or {}))
    target = None
    if load_checkpoint.startswith("orbax::"):          # orbax needs the shapes
        from lwm.model.shapes import param_shapes

        target = param_shapes(config)
    _, params = load(load_checkpoint, params_target=target)
    tree = params["params"]
    while set(tree.keys()) == {"params"}:
        tree = tree["params"]
    with replace_dir(output_dir) as tmp:    # a folder with an earlier export is replaced whole, never mixed
        summary = export_hf(tree, config, tmp, tokenizer=tokenizer, dtype=np_dtype(dtype),
                            max_shard_size=max_shard_size, vqgan_config=vqgan, vqgan_checkpoint=vqgan_checkpoint)
    return (f"wrote {output_dir}: {summary['parameters'] / 1e6:.2f}M parameters, "
            f"{config.num_hidden_layers} layers, dtype {summary['dtype']}, bos/eos "
            f"{summary['bos_token_id']}/{summary['eos_token_id']}"
            f"{', vision' if summary['vision'] else ''}{', tokenizer' if summary['tokenizer'] else ''}")
