"""Errors as OpenAI error bodies: ``APIError`` and the app's exception handlers.

Every error the server answers has the body ``{"error": {"message", "type", "param", "code"}}``.
Messages are short and never carry exception text from libraries or file-system paths: an
unexpected exception is logged with its traceback and answered with a generic 500.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("eagle2.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def internal(what: str) -> APIError:
    return APIError(500, f"{what}: internal server error", type="server_error")


def shutting_down() -> APIError:
    """The answer to every request the server drops because it stops (new, waiting or running)."""
    return APIError(503, "the server is shutting down; retry later", type="server_error",
                    code="server_shutting_down")


def from_generation(e: BaseException) -> APIError:
    """The answer for an exception raised while generating: ``ValueError`` is the engine refusing a
    parameter (400, its one-line message); anything else is our fault (500, logged)."""
    if isinstance(e, ValueError):
        return APIError(400, str(e).splitlines()[0] if str(e) else "invalid request")
    log.error("generation failed", exc_info=e)
    return internal("generation failed")


def error_bytes(status: int, message: str, code: str | None = None, headers: dict | None = None) -> tuple:
    """(status, raw headers, body) for the ASGI guard, which answers before FastAPI runs."""
    body = json.dumps(APIError(status, message, code=code).body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return status, raw, body


_BRANCH_NAMES = {"str", "int", "float", "bool", "none"}


def _field(x) -> bool:
    """A location part that names a field or an index, not one of pydantic's union branches
    ('constrained-str', 'list[ContentPart]', 'str')."""
    return not (isinstance(x, str) and (x == "body" or "[" in x or "-" in x or x in _BRANCH_NAMES))


def _path(e: dict) -> tuple:
    return tuple(x for x in e.get("loc", ()) if _field(x))


def _most_telling(errs: list) -> dict:
    """The error to show. A field that may be one of several types reports a mismatch per branch;
    a branch whose type did match fails for a reason ('at most 4 items'), so that one is shown
    first, else the deepest mismatch (the list item that is wrong rather than 'not a string')."""
    if not errs:
        return {"loc": (), "msg": "invalid request"}
    reasons = [e for e in errs if not str(e.get("type", "")).endswith("_type")]
    return reasons[0] if reasons else max(errs, key=lambda e: len(e.get("loc", ())))


def _validation_message(exc: RequestValidationError) -> APIError:
    errs = exc.errors()
    e = _most_telling(errs)
    loc = [str(x) for x in _path(e)]
    if e.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
    param = ".".join(loc) or None
    if e.get("type") == "missing" and not loc:
        return APIError(400, "request body is missing (send a JSON object)")
    msg = f"{param}: {e.get('msg')}" if param else str(e.get("msg"))
    others = {_path(x)[:1] for x in errs} - {_path(e)[:1]}  # other fields, not this one's other type branches
    if others:
        msg += f" (and {len(others)} more invalid field{'s' if len(others) > 1 else ''})"
    return APIError(400, msg, param=param.split(".")[0] if param else None)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into an OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return _validation_message(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.error("internal error", exc_info=exc)
        return internal("request failed").response()
