"""Requests whose body length is ambiguous: refused before any route sees them.

A request with both `Content-Length` and `Transfer-Encoding` can be read two ways. RFC 9112
6.1 lets a server go by Transfer-Encoding, and hypercorn (h11) does; a proxy in front of the
gateway that went by Content-Length instead would take the rest of the body for a second
request, which is how request smuggling starts. Like nginx, the gateway answers such a
request 400 and closes the connection. (uvicorn's parser, llhttp, refuses it by itself, the
same way, before the app sees it.)
"""

from __future__ import annotations

from gateway.errors import BadRequest
from gateway.types import ASGIApp, Headers, Receive, Scope, Send

_CLOSE = ((b"connection", b"close"),)


def ambiguous_length(headers: Headers) -> bool:
    """Whether the request carries both Content-Length and Transfer-Encoding."""
    length = coding = False
    for name, _ in headers:
        if name == b"content-length":
            length = True
        elif name == b"transfer-encoding":
            coding = True
    return length and coding


class RefuseAmbiguousLength:
    """ASGI middleware: 400 and `Connection: close` for a request `ambiguous_length` flags."""

    __slots__ = ("_app",)

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and ambiguous_length(scope["headers"]):
            await BadRequest(
                "The request has both Content-Length and Transfer-Encoding headers.",
                headers=_CLOSE,
            ).send_to(send)
            return
        await self._app(scope, receive, send)

    def __repr__(self) -> str:
        return f"<RefuseAmbiguousLength {self._app!r}>"
