"""Wiring: build every long-lived object once, run the health checks, serve with hypercorn."""

from __future__ import annotations

import asyncio
import math
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config
from starlette.routing import Router

from gateway.app import build_app
from gateway.health import HealthChecker
from gateway.proxy import Proxy
from gateway.replicas import Registry
from gateway.settings import Settings
from gateway.upstream import create_session


@dataclass(frozen=True)
class Gateway:
    """The running gateway's parts, for the server and for tests that watch its state."""

    app: Router
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
        read_timeout_s=settings.read_timeout_s,
        keepalive_s=settings.upstream_keepalive_s,
    )
    registry = Registry(
        settings.backends,
        settings.pinned,
        fall=settings.health_fall,
        rise=settings.health_rise,
        retry_after_s=max(1, math.ceil(settings.health_interval_s)),
    )
    health = HealthChecker(
        registry,
        session,
        interval_s=settings.health_interval_s,
        timeout_s=settings.health_timeout_s,
    )
    proxy = Proxy(registry, session, max_body_bytes=settings.max_body_bytes)
    checks = asyncio.get_running_loop().create_task(health.run(), name="health-checks")
    try:
        yield Gateway(app=build_app(registry, proxy), registry=registry, health=health, proxy=proxy)
    finally:
        checks.cancel()
        try:
            await checks
        except asyncio.CancelledError:
            pass
        await session.close()


def hypercorn_config(settings: Settings, *, bind: str | None = None) -> Config:
    config = Config()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [bind or f"{host}:{settings.port}"]
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = settings.log_level.upper()
    # The backend's headers are what the client sees; hypercorn's banner is not one of them.
    config.include_server_header = False
    return config


async def serve(
    settings: Settings,
    *,
    bind: str | None = None,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Serve until `shutdown_trigger` returns (by default: SIGINT or SIGTERM)."""
    if shutdown_trigger is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        shutdown_trigger = stop.wait
    async with running(settings) as gateway:
        await hypercorn_serve(
            gateway.app,  # type: ignore[arg-type]
            hypercorn_config(settings, bind=bind),
            shutdown_trigger=shutdown_trigger,
        )
