"""The pooled aiohttp session to the backends, and the one place aiohttp errors are translated."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp

from gateway.errors import UpstreamTimeout, UpstreamUnreachable


def create_session(
    *,
    connect_timeout_s: float,
    keepalive_s: float,
    backend_api_key: str = "",
    fresh_connections: bool = False,
) -> aiohttp.ClientSession:
    """A session for upstream requests and health checks; call on the running loop.

    The gateway keeps one pooled session for everything, and one with `fresh_connections`
    for the retry after a pooled connection turned out closed: when one idle connection has
    gone stale, its idle siblings usually have too, so that retry must not take another.
    """
    connector = aiohttp.TCPConnector(
        # No pool cap: every open stream holds one connection, and a cap would queue
        # new requests behind long generations.
        limit=0,
        limit_per_host=0,
        force_close=fresh_connections,
        keepalive_timeout=None if fresh_connections else keepalive_s,
        ttl_dns_cache=10,
    )
    # The client's own Authorization header is never forwarded (see headers.py); this is
    # the only credential the backends see, on requests and health checks alike.
    headers = {"Authorization": f"Bearer {backend_api_key}"} if backend_api_key else None
    return aiohttp.ClientSession(
        connector=connector,
        headers=headers,
        # Bytes pass through as the backend sent them, compressed or not.
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        # Only what the client sent goes upstream; aiohttp would add its own defaults.
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        # Only the connect timeout is aiohttp's. Waiting for headers and silence between
        # chunks are timed by the request's guard (guard.py); there is no total timeout.
        timeout=aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=connect_timeout_s, sock_read=None
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
    except aiohttp.ServerDisconnectedError:
        # Typically the keep-alive race: the backend closed an idle pooled connection just
        # as we sent on it. Nothing was processed; a fresh connection may well succeed.
        raise UpstreamUnreachable(
            "The model server closed the connection without answering.",
            retryable=True,
            stale=True,
            kind="reset",
        ) from None
    except aiohttp.ConnectionTimeoutError:
        raise UpstreamTimeout(
            "The model server did not accept a connection in time.", retryable=True, kind="timeout"
        ) from None
    except aiohttp.ClientConnectorError:
        # Refused or unreachable before any answer.
        raise UpstreamUnreachable(
            "The model server could not be reached.", retryable=True, kind="connect"
        ) from None
    except (aiohttp.ClientOSError, ConnectionError):
        # Reset before any answer.
        raise UpstreamUnreachable(
            "The model server could not be reached.", retryable=True, kind="reset"
        ) from None
    except TimeoutError:
        raise UpstreamTimeout(
            "The model server did not answer in time.", retryable=False, kind="timeout"
        ) from None
    except (aiohttp.ClientError, OSError):
        # A malformed answer: the server spoke, so the request may have run. No retry.
        raise UpstreamUnreachable(
            "The model server sent an invalid answer.", retryable=False, kind="protocol"
        ) from None
