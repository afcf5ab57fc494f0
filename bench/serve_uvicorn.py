"""The gateway's app served by uvicorn (httptools, uvloop) instead of hypercorn, for the bench.

Same settings (GATEWAY_* from the environment), same long-lived objects built by
``gateway.server.running``; only the HTTP server differs, so the hypercorn-versus-uvicorn
figures show the server's own share of the gateway's cost. Not a supported way to run the
gateway: no drain on SIGTERM (uvicorn stops at once).
"""

from __future__ import annotations

import os
import sys

import uvicorn
import uvloop

from gateway.server import running
from gateway.settings import Settings, SettingsError

try:
    from bench.sse_client import raise_nofile_limit
except ImportError:  # run as a script: bench/ itself is sys.path[0]
    from sse_client import raise_nofile_limit  # type: ignore[import-not-found, no-redef]


async def serve(settings: Settings) -> None:
    async with running(settings) as gateway:
        config = uvicorn.Config(
            gateway.app,
            host=settings.host,
            port=settings.port,
            loop="uvloop",
            http="httptools",
            lifespan="off",
            log_level=settings.log_level,
            access_log=False,
            # As the gateway's hypercorn config: the backend's headers, not a server banner
            # nor a second Date, and a listen backlog for hundreds of connects at once.
            server_header=False,
            date_header=False,
            backlog=4096,
        )
        await uvicorn.Server(config).serve()


def main() -> int:
    try:
        settings = Settings.from_environ(os.environ)
    except SettingsError as exc:
        print(f"serve_uvicorn: {exc}", file=sys.stderr)
        return 2
    raise_nofile_limit()  # two sockets per open stream, as the gateway's own command does
    uvloop.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
