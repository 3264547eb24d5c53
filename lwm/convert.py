"""`python -m lwm.convert`: convert checkpoints between LWM and Hugging Face, both ways. CPU only; host memory
about the model once in the written dtype plus one layer stack (7B in bf16: ~14 GB). Seconds for small
models, minutes for 7B.

    # A local HF LLaMA-family folder (Llama 2/3.x, GQA, linear/llama3 RoPE scaling, tied embeddings,
    # Mistral without a short sliding window) -> our streaming params + a json:: config for --load_llama_config
    python -m lwm.convert from_hf --hf_dir=/models/Llama-3.2-1B --output=params::/ckpt/llama3_1b/streaming_params \\
        --config_out=/ckpt/llama3_1b/config.json --dtype=bf16
    # Our text (or, with --vision, vision) checkpoint -> a Hugging Face folder
    python -m lwm.convert to_hf --load_checkpoint=params::/ckpt/streaming_params --load_llama_config=7b \\
        --update_llama_config="dict(theta=50000000, max_sequence_length=1048576)" \\
        --tokenizer=/ckpt/tokenizer.model --output_dir=/out/lwm-text-1m-hf --dtype=bf16

The work is lwm.tools.hf_convert. Bad flags or files: one line, exit status 2.
"""
from __future__ import annotations

import sys

from ml_collections import ConfigDict

from lwm.cli.command import cli, parse, require, subcommand
from lwm.cli.values import parse_literal_dict


def get_default_config() -> dict[str, ConfigDict]:
    """The flags of each direction (subcommand) and their defaults."""
    f = ConfigDict()
    f.hf_dir = ""                              # a local folder with config.json and *.safetensors or *.bin
    f.output = ""                              # params::PATH (streaming) or orbax::DIR
    f.config_out = ""                          # the JSON config to write (load it with --load_llama_config json::PATH)
    f.dtype = ""                               # fp32 | bf16 | fp16; '' = floats as stored
    f.scan_layers = True                       # stack the layers as h/scan_decoder (True) or keep h/<i> (False)
    f.param_scan_axis = 0                      # 0 | 1: the layer axis of the stacked parameters
    f.update_llama_config = ""                 # dict(key=value, ...), a {'key': value} literal or JSON
    f.lock()
    t = ConfigDict()
    t.load_checkpoint = ""                     # params::, trainstate_params::, trainstate::, flax_params::, orbax::, hf::
    t.load_llama_config = ""                   # a preset (tiny, 7b, ...) or json::path
    t.update_llama_config = ""                 # dict(key=value, ...), a {'key': value} literal or JSON
    t.vision = False                           # a vision-language model (lwm.model.vision_llama)
    t.vqgan_config = "released"                # VQGAN preset or json::path (vision only)
    t.vqgan_checkpoint = ""                    # VQGAN params file to copy beside (vision only)
    t.output_dir = ""
    t.tokenizer = ""                           # a sentencepiece tokenizer.model, or a folder holding one
    t.dtype = "fp32"                           # fp32 | bf16 | fp16: dtype of the written weights
    t.max_shard_size = "5GB"
    t.lock()
    return {"from_hf": f, "to_hf": t}


def main(argv=None) -> str:
    """Run one direction; prints and returns the summary line. Raises FlagError / ValueError / OSError on bad
    flags or files."""
    from lwm.tools.hf_convert import convert_from_hf, convert_to_hf

    direction, rest = subcommand(sys.argv[1:] if argv is None else argv, ("from_hf", "to_hf"), "lwm.convert")
    config = parse(rest, get_default_config()[direction])
    updates = parse_literal_dict(config.update_llama_config)
    if direction == "from_hf":
        require(config, "hf_dir", "output", "config_out")
        summary = convert_from_hf(config.hf_dir, config.output, config.config_out, dtype=config.dtype,
                                  scan_layers=config.scan_layers, param_scan_axis=config.param_scan_axis,
                                  updates=updates)
    else:
        require(config, "load_checkpoint", "load_llama_config", "output_dir")
        summary = convert_to_hf(config.load_checkpoint, config.load_llama_config, config.output_dir,
                                updates=updates, vision=config.vision, vqgan_config=config.vqgan_config,
                                vqgan_checkpoint=config.vqgan_checkpoint, tokenizer=config.tokenizer,
                                dtype=config.dtype, max_shard_size=config.max_shard_size)
    print(summary)
    return summary


if __name__ == "__main__":
    sys.exit(cli("lwm.convert", main, get_default_config, __doc__))
