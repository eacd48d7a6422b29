"""The outermost ASGI layer: bearer-token authentication and the request-body size limit.

It sits in front of everything, including the cached-LUT fast path (``fastpath.py``) and FastAPI's own
routing and body parsing, so an unauthenticated or oversized request is refused before one byte of
its body is read or parsed, and no endpoint (present or future) can forget the check.

- With a token (``EFFPOSE_TOKEN``), every request whose method is not GET or HEAD needs
  ``Authorization: Bearer <token>`` (compared with ``hmac.compare_digest``); otherwise 401.
- With ``EFFPOSE_PROTECT_READS=1`` GET and HEAD need it too, except ``/v1/health`` (container
  healthchecks carry no secret, and liveness reveals nothing). A read may instead carry the dashboard's
  login cookie (``ui.py``): HttpOnly, SameSite=Strict, holding ``cookie_value(token)``, an HMAC of the
  token rather than the token, so a leaked cookie grants reads only, never writes. A dashboard page
  (``/`` and ``/ui...``) refused for want of a token redirects to the login form instead of a 401.
- Open without a token: the login form and its POST (which checks the token itself), the logout POST
  (it only expires the cookie) and the dashboard's fixed CSS/JS files under ``/ui/static/``.
- A body over ``max_body_bytes`` gets 413: at once from its ``Content-Length``, or, for a chunked
  body, as soon as the bytes received pass the limit.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any
from urllib.parse import quote

READ_METHODS = frozenset({"GET", "HEAD"})
OPEN_PATHS = frozenset({"/v1/health"})
LOGIN_PATH = "/ui/login"
LOGOUT_PATH = "/ui/logout"
STATIC_PREFIX = "/ui/static/"
COOKIE_NAME = "effpose_session"


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


def cookie_value(token: bytes) -> str:
    """What the login cookie holds: a keyed hash of the token (reads only; see the module docstring)."""
    return hmac.new(token, b"effpose dashboard read cookie", hashlib.sha256).hexdigest()


def cookie_matches(headers: list[tuple[bytes, bytes]], expected: bytes) -> bool:
    """True when a ``Cookie`` header carries ``COOKIE_NAME=<expected>`` (constant-time comparison)."""
    name = COOKIE_NAME.encode()
    for header, value in headers:
        if header == b"cookie":
            for part in value.split(b";"):
                key, _, given = part.strip().partition(b"=")
                if key == name and hmac.compare_digest(given.strip(), expected):
                    return True
    return False


def is_page(path: str) -> bool:
    """A dashboard page (HTML for a browser) rather than the JSON API."""
    return path == "/" or path == "/ui" or path.startswith("/ui/")


class GuardMiddleware:
    """Pure ASGI middleware; see the module docstring."""

    def __init__(self, app: Any, token: str | None, protect_reads: bool, max_body_bytes: int) -> None:
        self.app = app
        self.token = token.encode("utf-8") if token else None
        self.cookie = cookie_value(self.token).encode() if self.token else b""
        self.protect_reads = protect_reads
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.token is not None and self._needs_token(scope) and not self._authorized(scope):
            await _refuse(scope, send)
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
            body = await self._read_chunked(receive, send)
            if body is None:
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_chunked(self, receive: Any, send: Any) -> bytes | None:
        """The whole chunked body, or None once it has been refused (413) or the client went away."""
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                await _reply(send, 413, self._too_large(f"more than {self.max_body_bytes} bytes (chunked)"))
                return None
        return bytes(body)

    def _needs_token(self, scope: dict[str, Any]) -> bool:
        path = scope["path"]
        if scope["method"] not in READ_METHODS:
            return path not in (LOGIN_PATH, LOGOUT_PATH)
        static = path.startswith(STATIC_PREFIX) and "/" not in path[len(STATIC_PREFIX) :]  # one file name, no more
        open_read = path in OPEN_PATHS or path == LOGIN_PATH or static
        return self.protect_reads and not open_read

    def _authorized(self, scope: dict[str, Any]) -> bool:
        """The bearer token on any request; the login cookie on reads only."""
        if bearer_matches(scope["headers"], self.token):  # type: ignore[arg-type]
            return True
        return scope["method"] in READ_METHODS and cookie_matches(scope["headers"], self.cookie)

    def _too_large(self, what: str) -> str:
        return (
            f"request body of {what} exceeds the limit of {self.max_body_bytes} bytes "
            "(max_body_bytes, EFFPOSE_MAX_BODY_BYTES)"
        )


async def _refuse(scope: dict[str, Any], send: Any) -> None:
    """401 for the API; a dashboard page redirects to the login form instead."""
    if scope["method"] in READ_METHODS and is_page(scope["path"]):
        await _redirect_to_login(scope, send)
        return
    await _reply(
        send,
        401,
        "missing or invalid bearer token: send 'Authorization: Bearer <EFFPOSE_TOKEN>'",
        [(b"www-authenticate", b"Bearer")],
    )


async def _redirect_to_login(scope: dict[str, Any], send: Any) -> None:
    """303 to the login form, which sends the browser back to the page it asked for after login."""
    target = scope["path"] + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
    location = f"{LOGIN_PATH}?next={quote(target, safe='')}".encode("latin-1")
    headers = [(b"location", location), (b"content-length", b"0"), (b"cache-control", b"no-store")]
    await send({"type": "http.response.start", "status": 303, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


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
