"""The request edge: what a connection may cost before any route runs.

    connection --(max_connections: beyond it a 503 `too_many_connections` JSON error, then closed, nothing read)--
               --(header_timeout_s: request headers complete in time, else closed)--> uvicorn
    Edge (ASGI) --(API key, else 401, body unread)--(Content-Length or bytes read > max_body_bytes: 413)--
               --(whole body within body_timeout_s, else 408)--> FastAPI routes (JSON parsed only now)
               --(an exception no handler took: one logged 500 without internals)

uvicorn has settings for idle keep-alive connections and for the number of open connections, none for how long
a client may take to send its headers or its body; so `server_config` builds uvicorn's protocol with a header
deadline, and `Edge` (a pure ASGI middleware) reads the body itself under a deadline, counting bytes as they
arrive (chunked bodies included). Starlette >= 1.6 and recent FastAPI have a body cap of their own
(`max_body_size`), but this project supports starlette >= 0.40 / fastapi >= 0.115 (pyproject.toml), which have
none, and the body deadline needs the read here anyway. The flags are `python -m lwm.serve`'s
(docs/serve.md, "Limits").
"""
from __future__ import annotations

import asyncio
import hmac
import http
import json
import time
from typing import Optional

from lwm.serve.errors import APIError, internal_error

OPEN_PATHS = frozenset({"/", "/health"})     # everything else (/v1/*, /openapi.json, /docs, /redoc) needs the key


class Edge:
    """ASGI middleware: the key, the body cap and the body deadline, then `app` with the body replayed.

    api_key: when set, every path but OPEN_PATHS needs `Authorization: Bearer KEY` (401 before the body is read).
    max_body_bytes: a larger body is refused with 413 `body_too_large`: from its Content-Length before reading,
    or while reading a chunked body, once the count passes the cap (the rest is never read). body_timeout_s: the
    whole body must arrive within this many seconds of the headers (408 `request_timeout` otherwise). Both
    refusals close the connection. An exception that reaches here is logged once and answered with a 500 whose
    message names only a log id (`errors.internal_error`)."""

    def __init__(self, app, *, api_key: Optional[str] = None, max_body_bytes: int = 32 << 20,
                 body_timeout_s: float = 60.0):
        self.app, self.api_key = app, api_key
        self.max_body_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            refusal = self._check_key(scope) or self._check_length(scope)
            if refusal is None:
                body, refusal = await self._read_body(receive)
            if refusal is not None:
                return await refusal.response(close=True)(scope, receive, send)
            await self.app(scope, _replay(body, receive), send_tracked)
        except Exception as e:                               # noqa: BLE001 - the last line: every fault answered
            error = internal_error(e, scope.get("path"))
            if not started:
                await error.response()(scope, receive, send)

    def _check_key(self, scope) -> Optional[APIError]:
        if self.api_key is None or scope["path"] in OPEN_PATHS:
            return None
        header = _header(scope, b"authorization")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                                 "key the server was started with (--api_key)", code="invalid_api_key")
        return None

    def _check_length(self, scope) -> Optional[APIError]:
        length = _header(scope, b"content-length")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return self._too_large(f"Content-Length {int(length)}")
        return None

    def _too_large(self, got: str) -> APIError:
        return APIError(413, f"request body too large: {got} bytes is over the server's limit of "
                             f"{self.max_body_bytes} bytes (--max_body_bytes)", code="body_too_large")

    async def _read_body(self, receive):
        """(body bytes, None), or (None, APIError) once the count passes the cap or the deadline passes."""
        chunks, size, deadline = [], 0, time.monotonic() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                return None, APIError(408, f"the request body did not arrive within {self.body_timeout_s:g} s "
                                           "(--body_timeout_s)", code="request_timeout")
            if message["type"] == "http.disconnect":
                return b"".join(chunks), None                # the app sees the disconnect when it reads on
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None, self._too_large(f"more than {self.max_body_bytes}")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _header(scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def _replay(body: bytes, receive):
    """An ASGI receive that gives the app the whole body once, then the client's own messages (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay


# --------------------------------------------------------------------------------------------- connections
def _canned(error: APIError) -> bytes:
    """A whole HTTP/1.1 response carrying `error`'s JSON body (`APIError.body`), closing the connection."""
    body = json.dumps(error.body()).encode()
    reason = http.HTTPStatus(error.status).phrase
    return (f"HTTP/1.1 {error.status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
            f"\r\nconnection: close\r\n\r\n").encode() + body


class _ConnectionEdge:
    """Mixed into uvicorn's HTTP protocol (httptools or h11, the same two hooks in both):

    - the connection cap: a connection opened while `max_connections` others are open is answered with a 503
      whose body is the API's error object (code `too_many_connections`) and closed before anything of it is
      read (uvicorn's own `limit_concurrency` answers in plain text, so it is not used);
    - the header deadline: a connection whose next request's headers are not complete within
      `header_timeout_s` of its opening (or of its previous response) is closed. The protocol makes a new
      `self.cycle` when a request's headers are complete, so the deadline holds while `self.cycle` is the one
      seen when it was armed."""

    header_timeout_s = 10.0
    max_connections: Optional[int] = 512

    def connection_made(self, transport):
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            transport.write(_canned(APIError(
                503, f"the server has {self.max_connections} connections open (--max_connections); retry later",
                code="too_many_connections")))
            transport.close()
            return
        self._arm()

    def on_response_complete(self):
        finished = self.cycle
        super().on_response_complete()                 # h11 may start a pipelined request's cycle in here
        if self.cycle is finished and not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc):
        self._disarm()
        super().connection_lost(exc)

    def _arm(self):
        self._disarm()
        self._armed_cycle = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self):
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        self._header_timer = None

    def _expire(self):
        self._header_timer = None
        if self.cycle is self._armed_cycle and not self.transport.is_closing():
            self.transport.close()                         # no request started since: slow or idle headers


def server_config(app, *, host: str = "127.0.0.1", port: int = 8000, header_timeout_s: float = 10.0,
                  keep_alive_s: int = 5, max_connections: Optional[int] = 512, log_level: str = "warning",
                  http_impl: str = "auto"):
    """uvicorn.Config for `app`: uvicorn's own protocol (httptools when installed, else h11; http_impl 'h11' or
    'httptools' names one) with the header deadline and the connection cap (`_ConnectionEdge`: at most max_connections open
    connections, None = no cap), and idle keep-alive connections closed after keep_alive_s (uvicorn's
    timeout_keep_alive). Running requests are bounded by the scheduler's queue (429 `queue_full`)."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    base = AutoHTTPProtocol
    if http_impl != "auto":
        import importlib

        module, name = {"h11": ("h11_impl", "H11Protocol"),
                        "httptools": ("httptools_impl", "HttpToolsProtocol")}[http_impl]
        base = getattr(importlib.import_module(f"uvicorn.protocols.http.{module}"), name)
    protocol = type("EdgeProtocol", (_ConnectionEdge, base),
                    {"header_timeout_s": float(header_timeout_s), "max_connections": max_connections})
    return uvicorn.Config(app, host=host, port=port, http=protocol, timeout_keep_alive=keep_alive_s,
                          log_level=log_level)
