"""Serve an ASGI app with granian on the running loop, for the benchmark's granian contenders.

Granian normally runs as its own process manager; here its worker is driven directly on the
running event loop (as `granian.server.embed` does, less its signal handling and its lifespan
protocol), so that the gateway's long-lived objects and the bare proxy's session live on the
same loop as under the other servers. One Rust runtime thread, asyncio tasks for the app.
Not a supported way to run the gateway: bench/README.md says why granian is not one of its
servers.
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Awaitable, Callable
from typing import Any

from granian._futures import _new_cbscheduler
from granian._granian import ASGIWorker, ListenerSpec, WorkerSignal
from granian.http import HTTP1Settings

App = Callable[[Any, Any, Any], Awaitable[None]]


async def serve(app: App, *, host: str, port: int, stop: Callable[[], Awaitable[object]]) -> None:
    """Serve `app` on host:port, HTTP/1.1, until `stop` returns; then close gracefully."""
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[None] = loop.create_future()

    def on_stopped() -> None:  # from granian's thread, once every connection is closed
        loop.call_soon_threadsafe(lambda: stopped.done() or stopped.set_result(None))

    async def run(watcher: Any) -> None:
        # Granian's own wrapper, less a state copy and a root path per request.
        proto = watcher.proto
        try:
            await app(watcher.scope, proto.receive, proto.send)
        except BaseException as exc:
            watcher.err(exc)
            return
        watcher.done()

    signal = WorkerSignal()
    signal.add_cb(on_stopped)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    worker = ASGIWorker(
        1,
        (ListenerSpec(host, port, 4096), None),
        None,  # no IPC
        1,  # one Rust runtime thread
        512,  # runtime blocking threads (granian's default)
        1,  # Python threads handing requests to this loop
        30,
        max(1024, soft // 2),  # connections at once (granian's "backpressure")
        "1",  # HTTP/1.1
        HTTP1Settings(header_read_timeout=5_000),
        None,
        False,  # no websockets
        None,  # no static files
        False,  # no TLS
        None,
        None,
        None,
        "tls1.3",
        None,
        [],
        False,
        (None, None),  # no metrics
    )
    worker.serve_async(_new_cbscheduler(loop, run, impl_asyncio=True), loop, signal)
    try:
        await stop()
    finally:
        signal.set()
        await asyncio.shield(stopped)
