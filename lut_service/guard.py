"""The outermost ASGI layer: bearer-token authentication and the request-body size limit.

It sits in front of everything, including the cached-LUT fast path (``fastpath.py``) and FastAPI's own
routing and body parsing, so an unauthenticated or oversized request is refused before one byte of
its body is read or parsed, and no endpoint (present or future) can forget the check.

- With a token (``EFFPOSE_TOKEN``), every request whose method is not GET or HEAD needs
  ``Authorization: Bearer <token>`` (compared with ``hmac.compare_digest``); otherwise 401.
- With ``EFFPOSE_PROTECT_READS=1`` GET and HEAD need it too, except ``/v1/health`` (container
  healthchecks carry no secret, and liveness reveals nothing).
- A body over ``max_body_bytes`` gets 413: at once from its ``Content-Length``, or, for a chunked
  body, as soon as the bytes received pass the limit.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

READ_METHODS = frozenset({"GET", "HEAD"})
OPEN_PATHS = frozenset({"/v1/health"})


async def _reply(send: Any, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("latin-1")),
        *(headers or []),
    ]
    head.append((b"connection", b"close"))  # an unread body must not be taken for the next request
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def bearer_matches(headers: list[tuple[bytes, bytes]], token: bytes) -> bool:
    """True when the first ``Authorization`` header is ``Bearer <token>`` (constant-time comparison)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, given = value.strip().partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)
    return False


class GuardMiddleware:
    """Pure ASGI middleware; see the module docstring."""

    def __init__(self, app: Any, token: str | None, protect_reads: bool, max_body_bytes: int) -> None:
        self.app = app
        self.token = token.encode("utf-8") if token else None
        self.protect_reads = protect_reads
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.token is not None and self._needs_token(scope) and not bearer_matches(scope["headers"], self.token):
            await _reply(
                send,
                401,
                "missing or invalid bearer token: send 'Authorization: Bearer <EFFPOSE_TOKEN>'",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        length: bytes | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length" and length is None:
                length = value
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                await _reply(send, 400, f"invalid Content-Length header {length.decode('latin-1')!r}")
                return
            if size > self.max_body_bytes:
                await _reply(send, 413, self._too_large(f"{size} bytes"))
                return
        elif chunked:
            body = bytearray()
            more = True
            while more:
                message = await receive()
                if message["type"] != "http.request":  # the client went away
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body_bytes:
                    await _reply(send, 413, self._too_large(f"more than {self.max_body_bytes} bytes (chunked)"))
                    return
            receive = _replay(bytes(body), receive)
        await self.app(scope, receive, send)

    def _needs_token(self, scope: dict[str, Any]) -> bool:
        if scope["method"] not in READ_METHODS:
            return True
        return self.protect_reads and scope["path"] not in OPEN_PATHS

    def _too_large(self, what: str) -> str:
        return (
            f"request body of {what} exceeds the limit of {self.max_body_bytes} bytes "
            "(max_body_bytes, EFFPOSE_MAX_BODY_BYTES)"
        )


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that yields the already-read body once, then defers to the server's (disconnects)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
