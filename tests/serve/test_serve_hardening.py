"""The server's request edge (lwm.serve.edge, issue 27): the body cap after the key and before parsing, header and
body deadlines, the connection cap, the API docs behind the key, malformed JSON as `invalid_json`, and one logged
500 without internals. Every server binds to 127.0.0.1; every wait is bounded. Each check carries its control: the
same request on the side of the limit that must pass (or the plain uvicorn server) gets the other answer."""
import json
import logging
import socket
import time
import urllib.error
import urllib.request

import pytest

from support.serving import running_server

KEY = "sekret"
CAP = 4096


@pytest.fixture(scope="module")
def app(text_engine):
    from lwm.serve import create_app

    app = create_app(text_engine["engine"], text_engine["tok"], model_name="tiny", api_key=KEY, max_batch_size=1,
                     max_body_bytes=CAP, body_timeout_s=0.6)

    async def boom():
        raise RuntimeError("secret detail /etc/internal/path")

    app.add_api_route("/v1/boom", boom, methods=["GET"])
    return app


@pytest.fixture(scope="module")
def url(app):
    with running_server(app, edge=dict(header_timeout_s=0.6, max_connections=3)) as u:
        yield u


def _port(url):
    return int(url.rsplit(":", 1)[1])


def _raw(url, head: str, body: bytes = b"", wait: float = 3.0) -> tuple:
    """Send `head` (request line + headers, no blank line end added) and `body` on a fresh socket; return
    (status or None, JSON body or None, seconds until the answer or the close) reading for at most `wait` s."""
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=wait) as s:
        t0 = time.monotonic()
        s.sendall(head.encode() + body)
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
                got = s.recv(65536)
                if not got:
                    break
                data += got
        except socket.timeout:
            return None, None, time.monotonic() - t0
        took = time.monotonic() - t0
    if not data:
        return None, None, took
    status = int(data.split(b" ", 2)[1])
    payload = data.split(b"\r\n\r\n", 1)[1]
    return status, (json.loads(payload) if payload.startswith(b"{") else None), took


def _http(url, data: bytes = None, headers=None) -> tuple:
    """(status, body text) of a GET (or a POST of `data`) through urllib, 4xx/5xx included."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def _post(path, length_or_chunked, key=True):
    auth = f"Authorization: Bearer {KEY}\r\n" if key else ""
    size = "Transfer-Encoding: chunked" if length_or_chunked == "chunked" else f"Content-Length: {length_or_chunked}"
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}{size}\r\n\r\n"


def _chunked(payload: bytes, piece: int = 1000) -> bytes:
    out = b"".join(b"%x\r\n" % len(payload[i:i + piece]) + payload[i:i + piece] + b"\r\n"
                   for i in range(0, len(payload), piece))
    return out + b"0\r\n\r\n"


def test_body_cap_after_key_before_body(url):
    # A declared 10 MB body that is never sent: answered at once (the server reads none of it), 401 without the
    # key, 413 with it. A server that read or parsed the body first would wait for it: no answer within 3 s.
    status, body, took = _raw(url, _post("/v1/chat/completions", 10_000_000, key=False))
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and took < 2, (status, body, took)
    status, body, took = _raw(url, _post("/v1/chat/completions", 10_000_000))
    assert status == 413 and body["error"]["code"] == "body_too_large" and took < 2, (status, body, took)
    assert "--max_body_bytes" in body["error"]["message"]
    # Chunked (no Content-Length): counted while read. Over the cap: 413 (401 without the key); the control just
    # under the cap is read and parsed (an unknown field, so no generation runs).
    over = json.dumps({"prompt": "a" * (CAP + 10)}).encode()
    under = json.dumps({"model": "tiny", "prompt": "a", "pad": "b" * (CAP - 100)}).encode()
    assert _raw(url, _post("/v1/completions", "chunked", key=False), _chunked(over))[0] == 401
    status, body, _ = _raw(url, _post("/v1/completions", "chunked"), _chunked(over))
    assert status == 413 and body["error"]["code"] == "body_too_large", (status, body)
    status, body, _ = _raw(url, _post("/v1/completions", "chunked"), _chunked(under))
    assert status == 400 and body["error"]["code"] == "unknown_field", (status, body)
    status, body, _ = _raw(url, _post("/v1/completions", len(under)), under)       # the same with Content-Length
    assert status == 400 and body["error"]["code"] == "unknown_field", (status, body)


def test_slow_headers_closed_and_late_body_refused(url, app):
    def slow_headers(base):
        # a header line every 0.2 s, at most 8 lines (1.6 s): how long until the server closes the connection
        with socket.create_connection(("127.0.0.1", _port(base)), timeout=3) as s:
            t0 = time.monotonic()
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            try:
                for i in range(8):
                    s.sendall(b"X-Slow-%d: 1\r\n" % i)
                    s.settimeout(0.2)
                    try:
                        if s.recv(1024) == b"":
                            return time.monotonic() - t0
                    except socket.timeout:
                        pass
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - t0
            return None                                         # still open after 1.6 s

    took = slow_headers(url)
    assert took is not None and took < 1.5, took                # header_timeout_s=0.6
    with running_server(app) as plain:                          # control: plain uvicorn holds it throughout
        assert slow_headers(plain) is None
    # The body deadline: headers done, 10 of 100 bytes sent, then nothing -> 408 within body_timeout_s=0.6;
    # the control sends the whole body at once and is parsed.
    status, body, took = _raw(url, _post("/v1/completions", 100), b'{"prompt":')
    assert status == 408 and body["error"]["code"] == "request_timeout" and 0.5 < took < 2, (status, body, took)
    good = b'{"model": "tiny", "prompt": "a", "x": 1}'
    status, body, _ = _raw(url, _post("/v1/completions", len(good)), good)
    assert status == 400 and body["error"]["code"] == "unknown_field"


@pytest.fixture(scope="module", params=["h11", "httptools"])
def impl_url(request, app):
    """The edge over each of uvicorn's two HTTP protocols (both installed: uvicorn[standard] in pyproject)."""
    with running_server(app, edge=dict(header_timeout_s=0.6, max_connections=3, http_impl=request.param)) as u:
        yield u


def test_connection_cap_and_header_deadline_on_both_protocols(impl_url):
    # max_connections=3: with three idle connections open, a fourth gets a 503 with the API's error object;
    # once they close, it is served.
    idle = [socket.create_connection(("127.0.0.1", _port(impl_url)), timeout=2) for _ in range(3)]
    try:
        time.sleep(0.1)
        status, body, _ = _raw(impl_url, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503 and body["error"]["code"] == "too_many_connections", (status, body)
        # The idle connections are closed by the header deadline (0.6 s) without a request.
        time.sleep(1.0)
        for s in idle:
            s.settimeout(1)
            assert s.recv(1) == b""
    finally:
        for s in idle:
            s.close()
    time.sleep(0.2)
    assert _http(impl_url + "/health")[0] == 200                 # control: under the cap it is served


def test_docs_behind_key(url, text_engine):

    from lwm.serve import create_app

    for path in ("/openapi.json", "/docs", "/redoc", "/v1/models"):
        status, text = _http(url + path)
        assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key", (path, text)
    auth = {"Authorization": f"Bearer {KEY}"}
    assert json.loads(_http(url + "/openapi.json", headers=auth)[1])["info"]["title"] == "LWM"
    assert _http(url + "/health")[0] == 200                                   # open paths stay open
    assert _http(url + "/")[0] == 200
    keyless = create_app(text_engine["engine"], text_engine["tok"], model_name="tiny", max_batch_size=1)
    with running_server(keyless) as open_url:                                  # control: no key, served
        assert _http(open_url + "/openapi.json")[0] == 200


def test_malformed_json_codes(text_engine):
    # Without a small cap, every malformed body reaches the parser: each is 400 invalid_json (FastAPI's own
    # "There was an error parsing the body", code null, for bytes that are not UTF-8 and for deep nesting);
    # control: well-formed JSON with an unknown field is unknown_field, not invalid_json.

    from lwm.serve import create_app

    app = create_app(text_engine["engine"], text_engine["tok"], model_name="tiny", max_batch_size=1)
    with running_server(app) as base:
        for raw in (b'{"prompt": "a",', b'{"prompt": "\xff\xfe"}', b"[" * 100_000 + b"]" * 100_000):
            status, text = _http(base + "/v1/completions", raw, {"Content-Type": "application/json"})
            assert status == 400 and json.loads(text)["error"]["code"] == "invalid_json", (raw[:20], text)
        good = json.dumps({"model": "tiny", "prompt": "a", "x": 1}).encode()
        status, text = _http(base + "/v1/completions", good, {"Content-Type": "application/json"})
        assert status == 400 and json.loads(text)["error"]["code"] == "unknown_field"


def test_unexpected_exception_is_one_logged_500_without_internals(url, caplog):

    with caplog.at_level(logging.ERROR, logger="lwm.serve"):
        status, text = _http(url + "/v1/boom", headers={"Authorization": f"Bearer {KEY}"})
        time.sleep(0.1)
    error = json.loads(text)["error"]
    assert status == 500 and error["code"] == "internal_error", text
    assert "secret" not in text and "RuntimeError" not in text                  # no internals to the client
    records = [rec for rec in caplog.records if rec.name == "lwm.serve"]
    assert len(records) == 1 and "secret detail" in caplog.text                 # control: the log has them
    assert records[0].getMessage().split()[2] in error["message"]               # the id the client was given
    # and the server goes on serving
    assert _http(url + "/health")[0] == 200
