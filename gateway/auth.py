"""API keys: every route but the probes needs `Authorization: Bearer <key>` when keys are set."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from gateway.errors import Unauthorized
from gateway.types import Scope

# Load balancers and Kubernetes probe these without credentials.
OPEN_PATHS = frozenset({"/health", "/ready"})


class ApiKeys:
    """The configured keys, and the check every route but the probes goes through."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(key.encode() for key in keys)

    @staticmethod
    def refusal() -> Unauthorized:
        return Unauthorized(
            "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
            headers=((b"www-authenticate", b"Bearer"),),
        )

    def accepts(self, scope: Scope) -> bool:
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

    def __repr__(self) -> str:
        return f"<ApiKeys [{len(self._keys)} keys]>"
