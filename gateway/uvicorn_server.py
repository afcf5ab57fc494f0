"""The optional uvicorn server (`GATEWAY_SERVER=uvicorn`, `pip install 'vllm-gateway[uvicorn]'`).

Hypercorn stays the default. Measured with `make bench` on one core, the same gateway app
under uvicorn with httptools cost 443 µs of CPU per 16-event request against hypercorn's
1,312, and 41.8 µs per paced event against 67.6: most of hypercorn's share is h11 framing
each chunk. Imported only when chosen, so uvicorn is not a dependency of the default.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable, Iterator

import uvicorn

from gateway.types import ASGIApp


class _DrainingServer(uvicorn.Server):
    """uvicorn, told when to stop by the gateway rather than by signals of its own.

    uvicorn would take SIGTERM itself and start closing at once; the gateway first drains
    (see server.serve_gateway), then lets uvicorn shut down.
    """

    def __init__(self, config: uvicorn.Config, stop: Callable[[], Awaitable[object]]) -> None:
        super().__init__(config)
        self._stop = stop

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def main_loop(self) -> None:
        await self._stop()


async def serve_uvicorn(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    log_level: str,
    stop: Callable[[], Awaitable[object]],
    sock: socket.socket | None = None,
) -> None:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="none",  # already running on uvloop
        http="httptools",
        lifespan="off",
        log_config=None,  # the gateway's logging, not uvicorn's
        log_level=log_level,
        access_log=False,
        # As under hypercorn: the backend's Date passes, no server banner.
        server_header=False,
        date_header=False,
        backlog=4096,
        timeout_graceful_shutdown=1,
    )
    await _DrainingServer(config, stop).serve(sockets=[sock] if sock is not None else None)
