"""Wiring: build every long-lived object once, run the health checks, serve with hypercorn."""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from gateway.app import build_app
from gateway.exchange import Forwarder
from gateway.health import HealthChecker
from gateway.proxy import Inflight, Proxy
from gateway.replicas import Registry
from gateway.routing import make_policy
from gateway.settings import Settings
from gateway.types import ASGIApp
from gateway.upstream import create_session

log = logging.getLogger("gateway.server")

# Hypercorn's default listen backlog of 100 overflows when a few hundred clients connect at
# once (a load balancer opening its pool, a burst of streams): the kernel then drops their
# SYNs and each retries after a second. The kernel caps this at net.core.somaxconn.
LISTEN_BACKLOG = 4096


@dataclass(frozen=True)
class Gateway:
    """The running gateway's parts, for the server and for tests that watch its state."""

    app: ASGIApp
    registry: Registry
    health: HealthChecker
    proxy: Proxy


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Gateway]:
    """The gateway with its session open and its health checks running on this loop.

    Startup does not wait for any backend: vLLM takes minutes to load, and a model whose
    servers are not up yet answers 503 until they are.
    """
    session = create_session(
        connect_timeout_s=settings.connect_timeout_s,
        keepalive_s=settings.upstream_keepalive_s,
        backend_api_key=settings.backend_api_key,
    )
    fresh_session = create_session(
        connect_timeout_s=settings.connect_timeout_s,
        keepalive_s=settings.upstream_keepalive_s,
        backend_api_key=settings.backend_api_key,
        fresh_connections=True,
    )
    registry = Registry(
        settings.backends,
        settings.pinned,
        fall=settings.health_fall,
        rise=settings.health_rise,
        retry_after_s=max(1, math.ceil(settings.health_interval_s)),
        eject_after=settings.eject_failures,
        eject_base_s=settings.eject_base_s,
        eject_max_s=settings.eject_max_s,
        policy=make_policy(
            settings.routing,
            index_entries=settings.prefix_index_entries,
            load_factor=settings.prefix_load_factor,
            block_bytes=settings.prefix_block_bytes,
        ),
    )
    health = HealthChecker(
        registry,
        session,
        interval_s=settings.health_interval_s,
        timeout_s=settings.health_timeout_s,
    )
    forwarder = Forwarder(
        registry,
        session,
        fresh_session=fresh_session,
        retries=settings.retries,
        headers_timeout_s=settings.headers_timeout_s,
        idle_timeout_s=settings.idle_timeout_s,
    )
    proxy = Proxy(
        registry,
        forwarder,
        inflight=Inflight(settings.max_concurrency),
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
    )
    checks = asyncio.get_running_loop().create_task(health.run(), name="health-checks")
    try:
        app = build_app(registry, proxy, api_keys=settings.api_keys)
        yield Gateway(app=app, registry=registry, health=health, proxy=proxy)
    finally:
        checks.cancel()
        try:
            await checks
        except asyncio.CancelledError:
            pass
        await session.close()
        await fresh_session.close()


def hypercorn_config(settings: Settings, *, bind: str | None = None) -> Config:
    config = Config()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [bind or f"{host}:{settings.port}"]
    config.accesslog = None
    # A Logger, not "-": hypercorn would add a handler of its own and every line would
    # appear twice, once in its format and once in ours.
    errorlog = logging.getLogger("hypercorn.error")
    errorlog.setLevel(settings.log_level.upper())
    config.errorlog = errorlog
    config.loglevel = settings.log_level.upper()
    # The backend's headers are what the client sees; hypercorn's banner is not one of them,
    # and its Date would duplicate the backend's (the gateway's own answers set their own).
    config.include_server_header = False
    config.include_date_header = False
    config.backlog = LISTEN_BACKLOG
    # Streams have had their drain (see `serve_gateway`) before hypercorn's grace begins.
    config.graceful_timeout = 1.0
    return config


async def serve_gateway(
    gateway: Gateway,
    settings: Settings,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]],
    sock: socket.socket | None = None,
) -> None:
    """Serve a running gateway until `shutdown_trigger` returns, then drain.

    Draining: /ready turns 503 and new requests get 503 at once, while the requests in
    flight get up to `drain_timeout_s` to finish. Only then does hypercorn stop, with a
    short grace of its own: its default 3 s would cut long generations off.
    `sock`, when given, is a bound, listening socket to serve on instead of host and port.
    """

    async def drain_then_stop() -> None:
        await shutdown_trigger()
        inflight = gateway.proxy.inflight
        inflight.draining = True
        log.info("draining: %d requests in flight", inflight.count)
        try:
            await asyncio.wait_for(inflight.wait_idle(), settings.drain_timeout_s)
        except TimeoutError:
            log.warning("drain timeout: cutting %d requests off", inflight.count)

    # Hypercorn takes ownership of a socket handed over as a descriptor.
    bind = f"fd://{sock.detach()}" if sock is not None else None
    await hypercorn_serve(
        gateway.app,  # type: ignore[arg-type]
        hypercorn_config(settings, bind=bind),
        shutdown_trigger=drain_then_stop,
    )


async def serve(settings: Settings, *, sock: socket.socket | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then drain; on `sock` if given, else on host and port."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with running(settings) as gateway:
        await serve_gateway(gateway, settings, shutdown_trigger=stop.wait, sock=sock)
