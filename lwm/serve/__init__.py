"""`lwm.serve`: an OpenAI-compatible HTTP server for the LWM text and vision models.

    from lwm.serve import create_app
    app = create_app(engine, tokenizer, model_name="lwm")   # a FastAPI app; run it with uvicorn

`python -m lwm.serve --help` for the entry point; docs/serve.md for the API and its limits.
"""
from lwm.serve.app import create_app

__all__ = ["create_app"]
