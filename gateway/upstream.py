"""The pooled aiohttp session to the backends, and the one place aiohttp errors are translated."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp

from gateway.errors import UpstreamTimeout, UpstreamUnreachable


def create_session(
    *, connect_timeout_s: float, read_timeout_s: float, keepalive_s: float
) -> aiohttp.ClientSession:
    """One session for every upstream request and health check; call on the running loop."""
    connector = aiohttp.TCPConnector(
        # No pool cap: every open stream holds one connection, and a cap would queue
        # new requests behind long generations.
        limit=0,
        limit_per_host=0,
        keepalive_timeout=keepalive_s,
        ttl_dns_cache=10,
    )
    return aiohttp.ClientSession(
        connector=connector,
        # Bytes pass through as the backend sent them, compressed or not.
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        # Only what the client sent goes upstream; aiohttp would add its own defaults.
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        # No total: a generation may stream for many minutes. sock_read bounds each silence.
        timeout=aiohttp.ClientTimeout(
            total=None,
            connect=None,
            sock_connect=connect_timeout_s,
            sock_read=read_timeout_s,
        ),
        raise_for_status=False,
    )


@contextmanager
def upstream_errors() -> Iterator[None]:
    """Translate a failure to get a response from a backend into the error the client gets.

    The messages are fixed text: aiohttp's own messages name the backend's address.
    """
    try:
        yield
    except TimeoutError:
        # aiohttp's connect and read timeouts both derive from TimeoutError.
        raise UpstreamTimeout("The model server did not answer in time.") from None
    except (aiohttp.ClientError, OSError):
        raise UpstreamUnreachable("The model server could not be reached.") from None
