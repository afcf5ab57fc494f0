"""Backend addresses: what a vLLM server is, and how the two route variables spell them."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from yarl import URL


class BackendError(ValueError):
    """A backend URL or a route list is malformed."""


@dataclass(frozen=True)
class Backend:
    """One vLLM server, by its base URL (scheme, host, port and an optional path prefix)."""

    url: str

    @property
    def base(self) -> URL:
        return URL(self.url)

    def endpoint(self, path: str) -> URL:
        """The absolute URL of `path` (which starts with "/") on this server, built once."""
        return URL(self.url + path, encoded=True)

    @property
    def address(self) -> str | None:
        """The host when it is an IP address, or for https (whose certificate names the host):
        None when it is a name that stands for every address it resolves to."""
        base = self.base
        host = base.raw_host or ""
        if base.scheme == "https":
            return host
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return None
        return host

    @property
    def port(self) -> int:
        return self.base.port or 80

    def at(self, address: str) -> Backend:
        """This backend with its host name replaced by one of the addresses it resolves to."""
        base = self.base
        host = f"[{address}]" if ":" in address else address
        return Backend(f"{base.scheme}://{host}:{self.port}{base.path.rstrip('/')}")


def parse_backend(raw: str) -> Backend:
    text = raw.strip()
    try:
        url = URL(text)
    except ValueError as exc:
        raise BackendError(f"{text!r} is not a URL ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise BackendError(f"{text!r} is not an http:// or https:// URL with a host")
    if url.query_string or url.fragment or url.user is not None:
        raise BackendError(f"{text!r}: a base URL has no query, fragment or credentials")
    path = url.path.rstrip("/")
    if path.endswith("/v1"):
        # The usual slip: vLLM's base URL for an OpenAI client ends in /v1, ours does not,
        # since we also proxy /tokenize, /pooling and /health, which live outside /v1.
        raise BackendError(f"{text!r}: give the server's base URL without /v1")
    port = url.explicit_port
    authority = url.host if port is None else f"{url.host}:{port}"
    if url.host and ":" in url.host:
        authority = f"[{url.host}]" if port is None else f"[{url.host}]:{port}"
    return Backend(f"{url.scheme}://{authority}{path}")


def parse_backend_list(raw: str) -> tuple[Backend, ...]:
    """`http://h1:8000,http://h2:8000`: distinct backends, in order."""
    backends: dict[str, Backend] = {}
    for item in raw.split(","):
        if item.strip():
            backend = parse_backend(item)
            backends.setdefault(backend.url, backend)
    return tuple(backends.values())


def parse_model_routes(raw: str) -> dict[str, tuple[Backend, ...]]:
    """`model-a=http://h1:8000|http://h2:8000;model-b=http://h3:8000`."""
    routes: dict[str, tuple[Backend, ...]] = {}
    for item in raw.split(";"):
        if not item.strip():
            continue
        model, sep, urls = item.partition("=")
        model = model.strip()
        if not sep or not model:
            raise BackendError(f"{item.strip()!r} is not MODEL=URL|URL")
        if model in routes:
            raise BackendError(f"model {model!r} is listed twice")
        backends = parse_backend_list(urls.replace("|", ","))
        if not backends:
            raise BackendError(f"model {model!r} has no backend URL")
        routes[model] = backends
    return routes
