"""What the server tests call: a uvicorn server on a free loopback port running an app (`lwm.serve.create_app`)
in a thread, and random weights drawn on the host. The tiny engines they serve are the fixtures of
tests/serve/conftest.py."""
from __future__ import annotations

import contextlib
import threading
import time

from support import free_port


@contextlib.contextmanager
def running_server(app, edge: dict | None = None):
    """Serve `app` on 127.0.0.1:<free port> in a thread; yields the base URL ('http://127.0.0.1:PORT').
    edge: when given, the server is `python -m lwm.serve`'s (`lwm.serve.edge.server_config(app, **edge)`:
    header deadline, connection cap); otherwise plain uvicorn."""
    import uvicorn

    port = free_port()
    if edge is None:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    else:
        from lwm.serve.edge import server_config

        config = server_config(app, host="127.0.0.1", port=port, **edge)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def host_random_params(model, seed: int = 0):
    """Random weights with the model's init law drawn on the host (nothing compiled: `model.init` of the
    tiny preset takes most of a minute to compile on a loaded 2-core machine)."""
    from lwm.inference.loader import param_shapes, random_params

    return random_params(param_shapes(model.config), model.config, seed=seed)
