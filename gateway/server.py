"""Wiring: build every long-lived object once, run the health checks, serve with hypercorn
(or uvicorn, GATEWAY_SERVER=uvicorn: gateway/uvicorn_server.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from gateway.accesslog import AccessLog
from gateway.app import build_app
from gateway.exchange import Forwarder
from gateway.framing import RefuseAmbiguousLength
from gateway.health import HealthChecker, Resolver, resolve_host
from gateway.logs import LineWriter
from gateway.metrics import Metrics
from gateway.observe import Observer
from gateway.proxy import PROXIED_PATHS, Inflight, Proxy
from gateway.replicas import Registry
from gateway.routing import make_policy
from gateway.settings import Settings
from gateway.status import replicas_view
from gateway.types import ASGIApp
from gateway.upstream import create_session

log = logging.getLogger("gateway.server")

# Hypercorn's default listen backlog of 100 overflows when a few hundred clients connect at
# once (a load balancer opening its pool, a burst of streams): the kernel then drops their
# SYNs and each retries after a second. The kernel caps this at net.core.somaxconn.
LISTEN_BACKLOG = 4096

# The `route` label of the metrics: every path the gateway answers itself or proxies.
ROUTES = (*PROXIED_PATHS, "/v1/models", "/health", "/ready", "/metrics", "/replicas")


@dataclass(frozen=True)
class Gateway:
    """The running gateway's parts, for the server and for tests that watch its state."""

    app: ASGIApp
    registry: Registry
    health: HealthChecker
    proxy: Proxy
    metrics: Metrics
    writer: LineWriter


@asynccontextmanager
async def running(
    settings: Settings,
    *,
    writer: LineWriter | None = None,
    metrics_dir: str = "",
    resolve: Resolver = resolve_host,
) -> AsyncIterator[Gateway]:
    """The gateway with its session open and its health checks running on this loop.

    Startup does not wait for any backend: vLLM takes minutes to load, and a model whose
    servers are not up yet answers 503 until they are (for `startup_window_s` at most).
    `writer` carries the access log (one is made if none is given); `metrics_dir` is the
    multi-process metrics directory of a worker among several; `resolve` turns backend host
    names into addresses (tests pass their own).
    """
    own_writer = writer is None
    line_writer = LineWriter() if writer is None else writer
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
        startup_window_s=settings.startup_window_s,
        policy=make_policy(
            settings.routing,
            index_entries=settings.prefix_index_entries,
            load_factor=settings.prefix_load_factor,
            block_bytes=settings.prefix_block_bytes,
            miss=settings.prefix_miss,
            workers=settings.workers,
        ),
    )
    metrics = Metrics(routes=ROUTES, known_model=registry.knows, multiprocess_dir=metrics_dir)
    inflight = Inflight(settings.max_concurrency)
    dropped = 0

    def refresh() -> None:
        nonlocal dropped
        metrics.refresh(registry, inflight.count)
        if line_writer.dropped > dropped:
            metrics.log_lines_dropped(line_writer.dropped - dropped)
            dropped = line_writer.dropped

    health = HealthChecker(
        registry,
        session,
        interval_s=settings.health_interval_s,
        timeout_s=settings.health_timeout_s,
        metrics=metrics,
        on_round=refresh,
        resolve=resolve,
    )
    forwarder = Forwarder(
        registry,
        session,
        fresh_session=fresh_session,
        metrics=metrics,
        retries=settings.retries,
        headers_timeout_s=settings.headers_timeout_s,
        idle_timeout_s=settings.idle_timeout_s,
    )
    access_log = AccessLog(line_writer, form=settings.log_format) if settings.access_log else None
    observer = Observer(metrics, access_log)
    proxy = Proxy(
        registry,
        forwarder,
        observer=observer,
        inflight=inflight,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
    )
    checks = asyncio.get_running_loop().create_task(health.run(), name="health-checks")
    try:
        app = build_app(
            registry,
            proxy,
            api_keys=settings.api_keys,
            observer=observer,
            metrics=metrics,
            refresh_metrics=refresh,
            replicas_view=lambda: replicas_view(registry, inflight),
        )
        if settings.server == "hypercorn":
            # uvicorn's parser refuses these requests itself: no check per request there.
            app = RefuseAmbiguousLength(app)
        yield Gateway(
            app=app,
            registry=registry,
            health=health,
            proxy=proxy,
            metrics=metrics,
            writer=line_writer,
        )
    finally:
        checks.cancel()
        try:
            await checks
        except asyncio.CancelledError:
            pass
        refresh()  # a stopping worker's last counts reach the shared metrics
        await session.close()
        await fresh_session.close()
        if own_writer:
            line_writer.close()


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
    # Hypercorn's one idle timer runs from a connection's last answer (or its opening) until
    # a whole request head is in: the keep-alive and the slow-head limit at once.
    config.keep_alive_timeout = settings.keepalive_s
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
    flight get up to `drain_timeout_s` to finish. Only then does the server stop, with a
    short grace of its own: hypercorn's default 3 s would cut long generations off.
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

    if settings.server == "uvicorn":
        # Imported only when chosen: uvicorn is an optional extra.
        from gateway.uvicorn_server import serve_uvicorn

        await serve_uvicorn(
            gateway.app,
            sock=sock or listening_socket(settings.host, settings.port),
            backlog=LISTEN_BACKLOG,
            log_level=settings.log_level,
            keepalive_s=settings.keepalive_s,
            drain=drain_then_stop,
        )
        return
    # Hypercorn takes ownership of a socket handed over as a descriptor.
    bind = f"fd://{sock.detach()}" if sock is not None else None
    await hypercorn_serve(
        gateway.app,  # type: ignore[arg-type]
        hypercorn_config(settings, bind=bind),
        shutdown_trigger=drain_then_stop,
    )


def listening_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A socket listening on host:port, as hypercorn opens its own; with `reuse_port`, one of
    several on the same port (workers.py), the kernel choosing one for each connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


async def serve(
    settings: Settings,
    *,
    writer: LineWriter,
    sock: socket.socket | None = None,
    metrics_dir: str = "",
) -> None:
    """Serve until SIGINT or SIGTERM, then drain; on `sock` if given, else on host and port."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with running(settings, writer=writer, metrics_dir=metrics_dir) as gateway:
        # Serve once every backend has been checked once: a round ends within the health
        # timeout whether the backends answer or not. A worker started (or restarted) beside
        # others would otherwise answer "no healthy replica" for a pinned model meanwhile;
        # this way connections wait in its socket's queue (a single process listens after).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2 * settings.health_timeout_s + 1):
                await gateway.health.first_round()
        await serve_gateway(gateway, settings, shutdown_trigger=stop.wait, sock=sock)
