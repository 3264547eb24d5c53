"""Convert an LWM Jax text or vision checkpoint to a Hugging Face folder: `python -m lwm.convert to_hf` (the
flags are the same; this wrapper is kept for the original's command lines). Both directions: lwm/convert.py.
Hardware: CPU only; host memory about 2x the checkpoint in the chosen dtype (7B in bf16: ~28 GB).
Expected output: OUTPUT_DIR with config.json, generation_config.json, model*.safetensors (+ tokenizer files).

    python scripts/convert_lwm_to_hf.py --load_checkpoint params::/ckpt/streaming_params \\
        --llama_config 7b --update_llama_config '{"theta": 50000000, "max_sequence_length": 1048576}' \\
        --tokenizer /ckpt/tokenizer.model --output_dir /out/lwm-text-1m-hf --dtype bf16
"""
import sys

from lwm.convert import get_default_config, main

if __name__ == "__main__":
    from lwm.cli.command import cli

    sys.exit(cli("scripts/convert_lwm_to_hf.py", lambda argv: main(["to_hf", *argv]),
                 lambda: get_default_config()["to_hf"], __doc__))
