"""The gateway's app served by granian (bench/granian_asgi.py) instead of its own servers.

Same settings (GATEWAY_* from the environment), same long-lived objects built by
``gateway.server.running``; only the HTTP server differs. For the bench's comparison of
candidate servers; not a way to run the gateway (bench/README.md says why).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import uvloop

from gateway.server import running
from gateway.settings import Settings, SettingsError

try:
    from bench import granian_asgi
    from bench.sse_client import raise_nofile_limit
except ImportError:  # run as a script: bench/ itself is sys.path[0]
    import granian_asgi  # type: ignore[import-not-found, no-redef]
    from sse_client import raise_nofile_limit  # type: ignore[import-not-found, no-redef]


async def serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with running(settings) as gateway:
        await granian_asgi.serve(
            gateway.app, host=settings.host, port=settings.port, stop=stop.wait
        )


def main() -> int:
    try:
        settings = Settings.from_environ(os.environ)
    except SettingsError as exc:
        print(f"serve_granian: {exc}", file=sys.stderr)
        return 2
    raise_nofile_limit()  # two sockets per open stream, as the gateway's own command does
    uvloop.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
