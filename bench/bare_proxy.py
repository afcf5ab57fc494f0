"""The server floor: the least a raw-ASGI proxy over aiohttp can be, for the benchmark.

It reads the request body, posts it to one upstream over a pooled session and relays the
status, the headers and each chunk as it arrives: no routing, no model lookup, no retries, no
SSE event boundaries, no timeouts, no error envelopes. Served by the same server as the
gateway and measured in the same run, it shows what the server (hypercorn, uvicorn or granian)
and aiohttp cost on their own; the gateway's figures minus its are what the gateway's own code
costs. A floor, not a product: it handles no error beyond what it needs not to hang.

    BARE_UPSTREAM=http://127.0.0.1:8001 python bench/bare_proxy.py hypercorn --port 8080
    BARE_UPSTREAM=http://127.0.0.1:8001 python bench/bare_proxy.py uvicorn --port 8080
    BARE_UPSTREAM=http://127.0.0.1:8001 python bench/bare_proxy.py granian --port 8080
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import uvloop

try:
    from bench.sse_client import raise_nofile_limit
except ImportError:  # run as a script: bench/ itself is sys.path[0]
    from sse_client import raise_nofile_limit  # type: ignore[import-not-found, no-redef]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# The server frames the response itself (chunked), so the upstream's framing must not pass.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length"})
NOT_UPSTREAM = HOP_BY_HOP | {b"host"}


class BareProxy:
    """The ASGI app: one upstream, one session, open while `opened()` is."""

    __slots__ = ("upstream", "session")

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        state = "closed" if self.session is None or self.session.closed else "open"
        return f"<BareProxy {self.upstream} session {state}>"

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        body = b""
        while (message := await receive())["type"] == "http.request":
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        else:
            return  # the client left before its body was in
        url = self.upstream + scope["path"]
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k not in NOT_UPSTREAM
        ]
        assert self.session is not None
        async with self.session.post(url, data=body, headers=headers) as response:
            # Neither server cancels the app when its client leaves (sends are dropped), so
            # without this a stream to nobody would run to its end; closing the upstream
            # connection makes the reading loop below fail, and the upstream see the abort.
            watcher = asyncio.ensure_future(_close_on_disconnect(receive, response))
            try:
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status,
                        "headers": [
                            (k, v) for k, v in response.raw_headers if k.lower() not in HOP_BY_HOP
                        ],
                    }
                )
                async for chunk in response.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except aiohttp.ClientError:
                return  # upstream closed or broken: no final chunk, the client sees it cut
            finally:
                watcher.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[BareProxy]:
        # As the gateway's session where it is only a cost (gateway/upstream.py): no pool cap
        # (aiohttp's default is 100, and every open stream holds a connection), no cookie
        # handling, no headers of aiohttp's own.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )
        try:
            yield self
        finally:
            await self.session.close()


async def _close_on_disconnect(receive: Receive, response: aiohttp.ClientResponse) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    response.close()


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def serve_hypercorn(app: BareProxy, port: int) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    stop = _stop_on_signals()
    # As the gateway's own (gateway.server.hypercorn_config), less what only it needs.
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.loglevel = "WARNING"
    config.include_server_header = False
    config.include_date_header = False
    config.backlog = 4096
    config.graceful_timeout = 1.0
    async with app.opened():
        await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


async def serve_uvicorn(app: BareProxy, port: int) -> None:
    from gateway.server import LISTEN_BACKLOG, listening_socket
    from gateway.uvicorn_server import serve_uvicorn

    # Exactly as the gateway serves itself under GATEWAY_SERVER=uvicorn, guards included.
    stop = _stop_on_signals()
    async with app.opened():
        await serve_uvicorn(
            app,
            sock=listening_socket("127.0.0.1", port),
            backlog=LISTEN_BACKLOG,
            log_level="warning",
            drain=stop.wait,
        )


async def serve_granian(app: BareProxy, port: int) -> None:
    try:
        from bench import granian_asgi
    except ImportError:  # run as a script
        import granian_asgi  # type: ignore[import-not-found, no-redef]

    stop = _stop_on_signals()
    async with app.opened():
        await granian_asgi.serve(app, host="127.0.0.1", port=port, stop=stop.wait)


SERVERS = {"hypercorn": serve_hypercorn, "uvicorn": serve_uvicorn, "granian": serve_granian}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("server", choices=sorted(SERVERS))
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    upstream = os.environ.get("BARE_UPSTREAM", "")
    if not upstream.startswith("http://"):
        print(
            f"bare_proxy: BARE_UPSTREAM must be an http:// URL, not {upstream!r}", file=sys.stderr
        )
        return 2
    raise_nofile_limit()  # two sockets per open stream
    uvloop.run(SERVERS[args.server](BareProxy(upstream), args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
