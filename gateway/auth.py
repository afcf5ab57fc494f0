"""API keys: every route but the probes needs `Authorization: Bearer <key>` when keys are set."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from gateway.errors import Unauthorized
from gateway.types import ASGIApp, Receive, Scope, Send

# Load balancers and Kubernetes probe these without credentials.
OPEN_PATHS = frozenset({"/health", "/ready"})


class RequireApiKey:
    """ASGI middleware: refuses with OpenAI's 401 unless a configured key is presented."""

    __slots__ = ("_app", "_keys")

    def __init__(self, app: ASGIApp, keys: Iterable[str]) -> None:
        self._app = app
        self._keys = tuple(key.encode() for key in keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._accepts(scope):
            await self._app(scope, receive, send)
            return
        await Unauthorized(
            "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
            headers=((b"www-authenticate", b"Bearer"),),
        ).send_to(send)

    def _accepts(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    return False
                token = token.strip()
                # Compare with every key, without stopping at a match, so the time taken
                # does not tell which key (or how much of one) was right.
                matched = False
                for key in self._keys:
                    matched |= hmac.compare_digest(token, key)
                return matched
        return False
