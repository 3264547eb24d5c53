"""`python -m lwm.serve`: serve an LWM text or vision model over the OpenAI HTTP API (docs/serve.md).

    python -m lwm.serve --load_llama_config=7b --load_checkpoint=params::/ckpt/LWM-Text-Chat-1M/params \
        --tokenizer=/ckpt/tokenizer.model --dtype=bf16 --port=8000 --api_key=secret
    python -m lwm.serve --modality=vision --load_llama_config=7b --load_checkpoint=params::/ckpt/LWM-Chat/params \
        --vqgan_checkpoint=/ckpt/vqgan --tokenizer=/ckpt/tokenizer.model

The model flags are the chat entry points' (lwm.text_chat, lwm.vision_chat); the server binds to 127.0.0.1
unless --host says otherwise.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from ml_collections import ConfigDict


def get_default_config() -> ConfigDict:
    c = ConfigDict()
    c.modality = "text"                        # text | vision (LWM-Chat: image/video input, image generation)
    c.load_llama_config = ""
    c.update_llama_config = ""
    c.load_checkpoint = ""                     # params::PATH ...; vision models: '' = random weights (demos)
    c.tokenizer = "LargeWorldModel/LWM-Text-Chat-1M"
    c.mesh_dim = "1,-1,1,1"
    c.dtype = "fp32"
    c.vqgan_checkpoint = ""                    # vision: the released pickle or .msgpack; '' = random weights
    c.vqgan_config = "released"                # vision: VQGAN preset ('released', 'tiny') or json::path
    c.max_n_frames = 8                         # frames taken from a video
    c.seed = 1234                              # random weights (vision demos)
    c.model_name = ""                          # the id clients send as `model`; '' = 'lwm-text' / 'lwm-vision'
    c.host = "127.0.0.1"
    c.port = 8000
    c.api_key = ""                             # '' = no key needed
    c.max_batch_size = 8
    c.max_queue = 64
    c.default_max_tokens = 256                 # budget of a request that sets no max_tokens
    c.allow_local_media = False                # read plain file paths in image/video parts
    c.llama = ConfigDict()                     # --llama.<field>=value
    return c


def main(argv: Optional[Sequence[str]] = None) -> None:
    import uvicorn

    from lwm.flags import parse_flags
    from lwm.serve import create_app
    from lwm.serve.loading import load_served

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("flags (defaults):\n" + "\n".join(f"  --{k}={v}" for k, v in get_default_config().items()
                                                if k != "llama"))
        return
    config = parse_flags(argv, get_default_config())
    engine, tokenizer, vqgan, mesh = load_served(config)
    name = config.model_name or f"lwm-{config.modality}"
    app = create_app(engine, tokenizer, model_name=name, vqgan=vqgan, api_key=config.api_key or None,
                     max_batch_size=config.max_batch_size, max_queue=config.max_queue,
                     allow_local_media=config.allow_local_media, max_n_frames=config.max_n_frames,
                     default_max_tokens=config.default_max_tokens, mesh=mesh)
    print(f"serving {name} on http://{config.host}:{config.port}/ (OpenAI API under /v1)", file=sys.stderr)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")


if __name__ == "__main__":
    main()
