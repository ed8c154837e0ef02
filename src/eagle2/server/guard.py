"""The ASGI layer in front of the app: Host check, API key, request-body limit.

A pure ASGI middleware (not Starlette's ``BaseHTTPMiddleware``, which hides the client's
disconnect from the app): it answers refused requests itself, before FastAPI parses anything, and
hands the app a ``receive`` that replays the checked body and then passes the server's own
messages through, so ``http.disconnect`` still reaches the routes.

- Host: only the names in the config's ``HostPolicy`` (the DNS-rebinding guard; 400 otherwise).
- Key: ``Authorization: Bearer <key>`` on /v1/* and the docs pages, when a key is set (401).
- Body: at most ``max_body_bytes``; a larger declared ``Content-Length`` is refused unread, a
  chunked body once it grows past the limit (413). Memory per request is bounded by the limit.
  The whole body must arrive within ``body_timeout_s`` (408 and the connection closed), so a client
  that announces a body and trickles it (or never sends it) cannot hold a connection indefinitely.
  Slow request *headers* are uvicorn's to bound, before this layer sees the request.
- Refusals drain what the client is still sending (read and dropped, bounded in bytes and time)
  before answering: closing a socket with unread input resets it, and the client would lose the
  answer it is owed (it sees "peer closed connection" instead of the 413).
"""

from __future__ import annotations

import asyncio
import hmac
import time

from .config import ServerConfig
from .errors import error_bytes

PROTECTED = ("/v1", "/docs", "/redoc", "/openapi.json")
DRAIN_BYTES = 256 << 20  # past this much refused input, or DRAIN_SECONDS, the connection is just closed
DRAIN_SECONDS = 3.0


class Refused(Exception):
    def __init__(self, status: int, message: str, code: str, headers: dict | None = None):
        super().__init__(message)
        self.answer = error_bytes(status, message, code, headers)
        self.pending = True  # the client may still be sending the body


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


class Guard:
    def __init__(self, app, config: ServerConfig):
        self.app = app
        self.limit = config.max_body_bytes
        self.body_timeout = float(config.body_timeout_s)
        self.key = config.api_key.encode() if config.api_key else None
        self.hosts = config.host_policy()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self.check(scope)
            body = await self.read_body(scope, receive)
        except Refused as r:
            if not r.pending or await self.drain(scope, receive):
                await self.answer(send, *r.answer)
            return None
        if body is None:  # the client left while sending
            return None
        return await self.app(scope, self.replay(body, receive), send)

    def check(self, scope) -> None:
        if not self.hosts.allows(_header(scope, b"host")):
            raise Refused(400, "invalid Host header: this server does not answer to that name "
                               "(start it with --allowed-hosts to add one)", "invalid_host")
        path = scope.get("path", "")
        if self.key is not None and any(path == p or path.startswith(p + "/") for p in PROTECTED):
            scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                raise Refused(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                              "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.limit:
            raise self.too_large()

    def too_large(self) -> Refused:
        return Refused(413, f"request body too large: at most {self.limit} bytes", "body_too_large",
                       {"Connection": "close"})

    async def read_body(self, scope, receive) -> bytes | None:
        """The whole body, at most ``limit`` bytes; None if the client disconnected first."""
        if scope.get("method") in ("GET", "HEAD", "OPTIONS") and _header(scope, b"content-length") is None \
                and _header(scope, b"transfer-encoding") is None:
            return b""
        parts, size, deadline = [], 0, time.monotonic() + self.body_timeout
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                refused = Refused(408, f"request body not received within {self.body_timeout:g} s",
                                  "request_timeout", {"Connection": "close"})
                refused.pending = False  # not drained: the client is what is slow
                raise refused from None
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                refused = self.too_large()
                refused.pending = msg.get("more_body", False)
                raise refused
            parts.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(parts)

    @staticmethod
    async def drain(scope, receive) -> bool:
        """Read and drop the rest of a refused request's body; False if the client left meanwhile."""
        if _header(scope, b"content-length") in (None, "0") and _header(scope, b"transfer-encoding") is None:
            return True
        seen, deadline = 0, time.monotonic() + DRAIN_SECONDS
        while seen < DRAIN_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            try:
                msg = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                return True
            if msg["type"] == "http.disconnect":
                return False
            seen += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                return True
        return True

    @staticmethod
    def replay(body: bytes, receive):
        """The app's ``receive``: the checked body once, then the server's messages (the disconnect)."""
        sent = False

        async def inner():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # http.disconnect, when it comes

        return inner

    @staticmethod
    async def answer(send, status: int, headers: list, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
