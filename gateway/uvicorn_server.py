"""GATEWAY_SERVER=uvicorn: the same ASGI app served by uvicorn with httptools, on this loop.

Hypercorn stays the default; uvicorn is the optional extra `vllm-gateway[uvicorn]`, imported
only when chosen. Its HTTP/1.1 parser (llhttp, in C) and its one-task-per-request cycle cost
about half of hypercorn's CPU per request and per streamed event, most of which is h11's
pure-Python framing (see the README's Performance section; bench/README.md has the table of
how the servers behave).

uvicorn lacks two guards hypercorn has, added here by a subclass of its protocol:
- a deadline for a request's head: a client that sends its headers a byte at a time
  (slowloris) would otherwise hold its connection for ever; hypercorn closes it after 5 s;
- a cap on a request's head: httptools buffers a header of any length.
It serves HTTP/1.1 only (HTTP/2 clients need hypercorn).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.types import ASGIApp

# As hypercorn's default keep-alive timeout, which is what closes a slow head there.
HEAD_TIMEOUT_S = 5.0
# As hypercorn's h11_max_incomplete_size.
MAX_HEAD_BYTES = 16 * 1024
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\ncontent-length: 31\r\nconnection: close\r\n\r\n"
    b"Request header fields too large"
)
# After the gateway's drain, as hypercorn's graceful_timeout in server.py.
GRACE_S = 1


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size cap for each request's head.

    The deadline runs from the connection's start, then from the first byte of each next
    request (between requests, uvicorn's own keep-alive timeout closes an idle connection);
    `sweep_slow_heads` enforces it once a second for every connection, so a request pays
    two stores for it rather than a timer. The size counts whole reads that end inside a
    head, so it can over-count only when a pipelined request's head arrives in the same read
    as the end of the previous body.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # When the head being read began, on the loop's clock; 0.0 while none is.
        self.head_since = 0.0
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_since = self.loop.time()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.head_since:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                self.head_since = 0.0
                self.transport.write(_HEAD_TOO_LARGE)
                self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self.head_since:
            self.head_since = self.loop.time()
            self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self.head_since = 0.0
        self._head_bytes = 0
        super().on_headers_complete()


async def sweep_slow_heads(connections: set[Any], loop: asyncio.AbstractEventLoop) -> None:
    """Close, once a second, every connection whose head is older than HEAD_TIMEOUT_S."""
    while True:
        await asyncio.sleep(1.0)
        oldest = loop.time() - HEAD_TIMEOUT_S
        for protocol in list(connections):
            since = getattr(protocol, "head_since", 0.0)
            if since and since < oldest and not protocol.transport.is_closing():
                protocol.head_since = 0.0
                protocol.transport.close()


class _DrainingServer(uvicorn.Server):
    """uvicorn, told when to stop by the gateway rather than by signals of its own.

    uvicorn would take SIGTERM itself and start closing at once; the gateway drains first
    (see server.serve_gateway), then lets uvicorn close, with a short grace.
    """

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[object]]) -> None:
        super().__init__(config)
        self._drain = drain

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def main_loop(self) -> None:
        loop = asyncio.get_running_loop()
        sweeper = loop.create_task(sweep_slow_heads(self.server_state.connections, loop))
        try:
            await self._drain()
        finally:
            sweeper.cancel()


async def serve_uvicorn(
    app: ASGIApp,
    *,
    sock: socket.socket,
    backlog: int,
    log_level: str,
    keepalive_s: float = HEAD_TIMEOUT_S,
    drain: Callable[[], Awaitable[object]],
) -> None:
    """Serve `app` on the listening `sock` (closed when done) until `drain` returns."""
    config = uvicorn.Config(
        app,
        loop="none",  # already running, on uvloop
        http=GuardedHttpTools,
        lifespan="off",
        # The gateway's logging, not uvicorn's; its start and stop lines are not news.
        log_config=None,
        log_level=None,
        access_log=False,
        # As under hypercorn: the backend's Date passes, no server banner.
        server_header=False,
        date_header=False,
        backlog=backlog,
        # X-Forwarded-For and -Proto are the client's to write: trusting them is a choice for
        # the deployment behind a known proxy, not a default (hypercorn makes none either).
        proxy_headers=False,
        # Whole seconds in uvicorn's signature; its timer takes any number.
        timeout_keep_alive=math.ceil(keepalive_s),
        timeout_graceful_shutdown=GRACE_S,
    )
    logging.getLogger("uvicorn.error").setLevel(max(logging.WARNING, _level(log_level)))
    await _DrainingServer(config, drain).serve(sockets=[sock])


def _level(name: str) -> int:
    level = logging.getLevelName(name.upper())
    return level if isinstance(level, int) else logging.INFO
