"""OpenAI-style error objects: every failure leaves the server as

    HTTP 4xx/5xx  {"error": {"message": "...", "type": "invalid_request_error", "param": "messages", "code": null}}

the shape the official `openai` client turns into `openai.BadRequestError`, `AuthenticationError`,
`NotFoundError`, `RateLimitError` (their `.body` is the inner object). Handlers are installed on the app by
`install_handlers`, so a bad request never reaches a traceback and the next request is served.
"""
from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("lwm.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error to send as an OpenAI error object: HTTP `status`, one-line `message`, the offending request
    field `param` (dotted path, or None) and a machine-readable `code` (e.g. 'context_length_exceeded')."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, close: bool = False) -> JSONResponse:
        """The JSON response; close=True adds `Connection: close` (the server drops the connection after it,
        e.g. when the request body was left unread)."""
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if close:
            headers["Connection"] = "close"
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)


def internal_error(exc: BaseException, where: Optional[str] = None) -> APIError:
    """A fault of the server, not of the request: logged once with its traceback under a fresh id (logger
    'lwm.serve'), answered as a 500 whose message names only that id (no exception text, paths or values)."""
    ident = uuid.uuid4().hex[:12]
    log.error("internal error %s%s", ident, f" in {where}" if where else "", exc_info=exc)
    return APIError(500, f"internal server error (logged on the server as {ident})", code="internal_error")


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _loc_to_param(loc: tuple) -> Optional[str]:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not out:
            out = str(p)
        elif "[" in str(p) or "-" in str(p) or ":" in str(p):
            continue      # pydantic's union-branch tags ('function-after[...]', 'str'), not request fields
        else:
            out += f".{p}"
    return out or None


def _body_kind(value: Any, content_type: Optional[str]) -> str:
    """What a request body that is not a JSON object was, in words (for the error message)."""
    if isinstance(value, bytes):                  # FastAPI parses only a body sent as JSON
        return f"a body sent as {content_type or 'no Content-Type'}, not application/json"
    names = {list: "a JSON array", str: "a JSON string", bool: "JSON true/false", int: "a JSON number",
             float: "a JSON number", type(None): "JSON null"}
    return names.get(type(value), f"a JSON {type(value).__name__}")


def validation_error(exc: RequestValidationError, content_type: Optional[str] = None) -> APIError:
    """The first pydantic error as one line naming the field: malformed JSON, a body that is not a JSON object
    (empty, an array, not sent as application/json: content_type), an unknown field, a wrong type."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request body")
    err = errors[0]
    kind, param = err.get("type", ""), _loc_to_param(tuple(err.get("loc", ())))
    if kind == "json_invalid":
        detail = err.get("ctx", {}).get("error", "")
        return bad_request(f"the request body is not valid JSON ({detail})".replace(" ()", ""), None,
                           "invalid_json")
    if param is None:                                       # the body as a whole
        got = "an empty body" if kind == "missing" else _body_kind(err.get("input"), content_type)
        return bad_request(f"the request body must be a JSON object (Content-Type: application/json); got {got}",
                           None, "invalid_json")
    if kind == "extra_forbidden":
        return bad_request(f"unknown field {param!r}: not part of this API (check the spelling)", param,
                           "unknown_field")
    if kind == "missing":
        return bad_request(f"missing required field {param!r}", param, "missing_field")
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return bad_request(f"{param}: {message}" if param else message, param, "invalid_value")


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc, request.headers.get("content-type")).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 400 and isinstance(exc.__cause__, (ValueError, RecursionError)):
            # FastAPI's "error parsing the body": bytes that are not UTF-8, JSON nested too deeply
            why = "not UTF-8" if isinstance(exc.__cause__, UnicodeError) else "nested too deeply" \
                if isinstance(exc.__cause__, RecursionError) else "unreadable"
            return bad_request(f"the request body is not valid JSON ({why})", None, "invalid_json").response()
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return APIError(exc.status_code, message).response()
    # Any other exception goes on to lwm.serve.edge.Edge: one logged 500 (internal_error).


def sse(data: Any) -> str:
    """One server-sent event line pair: 'data: {json}\\n\\n' (or 'data: [DONE]\\n\\n')."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"
