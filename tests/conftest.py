"""Fixtures: fake vLLM servers and the gateway in its real server, each on a free port.

Every test that starts the gateway runs once per server (GATEWAY_SERVER): hypercorn, the
default, and uvicorn. Its id says which: `test_x[hypercorn]`, `test_x[uvicorn]`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import uvloop

from gateway.health import Resolver, resolve_host
from gateway.server import Gateway, running, serve_gateway
from gateway.settings import SERVERS, Settings
from tests.fakes import FakeVllm

# Fast checks, so that tests waiting on health rounds wait a few milliseconds.
TEST_ENV = {
    "GATEWAY_HEALTH_INTERVAL_S": "0.02",
    "GATEWAY_HEALTH_TIMEOUT_S": "2",
    "GATEWAY_HEALTH_FALL": "1",
    "GATEWAY_HEALTH_RISE": "1",
    "GATEWAY_LOG_LEVEL": "warning",
    "GATEWAY_DRAIN_TIMEOUT_S": "2",
    # The access log's own tests turn it on (tests/test_accesslog.py).
    "GATEWAY_ACCESS_LOG": "off",
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    # The gateway runs on uvloop in production; so does every test.
    return {"uvloop": uvloop.new_event_loop}


@dataclass
class RunningGateway:
    url: str
    parts: Gateway
    # Set to begin the shutdown (as SIGTERM does); `server` ends when the drain is over.
    stop: asyncio.Event
    server: asyncio.Task[None]

    async def wait_rounds(self, count: int = 1) -> None:
        await self.parts.health.wait_rounds(count)


async def open_raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP connection to `http://host:port`, for bytes no client library would send."""
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


@asynccontextmanager
async def gateway_on_free_port(
    settings: Settings, *, resolve: Resolver = resolve_host
) -> AsyncIterator[RunningGateway]:
    """The gateway in its real server (settings.server) on a free port, on this test's loop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    # Connections queue in the backlog until the server accepts: the URL is usable at once.
    async with running(settings, resolve=resolve) as parts:
        stop = asyncio.Event()
        server = asyncio.create_task(
            serve_gateway(parts, settings, shutdown_trigger=stop.wait, sock=sock)
        )
        try:
            yield RunningGateway(f"http://127.0.0.1:{port}", parts, stop, server)
            # Every test leaves nothing in flight: no request is lost or leaked.
            await asyncio.wait_for(parts.proxy.inflight.wait_idle(), 5)
            assert parts.proxy.inflight.count == 0
            leaked = [r for r in parts.registry.replicas if r.inflight != 0]
            assert not leaked, f"in-flight counts leaked: {leaked}"
        finally:
            stop.set()
            await server


StartGateway = Callable[..., Awaitable[RunningGateway]]
StartFake = Callable[..., Awaitable[FakeVllm]]


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as exit_stack:
        yield exit_stack


@pytest.fixture
def start_fake(stack: AsyncExitStack) -> StartFake:
    async def start(name: str, **options: Any) -> FakeVllm:
        fake = FakeVllm(name, **options)
        await fake.start()
        stack.push_async_callback(fake.stop)
        return fake

    return start


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> str:
    """The GATEWAY_SERVER a test's gateway runs under: each test runs under every one."""
    return str(request.param)


@pytest.fixture
def start_gateway(stack: AsyncExitStack, server: str) -> StartGateway:
    async def start(
        *backends: FakeVllm | str,
        wait: bool = True,
        resolve: Resolver = resolve_host,
        **env: str,
    ) -> RunningGateway:
        environ = TEST_ENV | {"GATEWAY_SERVER": server}
        urls = [b.url if isinstance(b, FakeVllm) else b for b in backends]
        if urls:
            environ["GATEWAY_BACKENDS"] = ",".join(urls)
        environ.update(env)
        gateway = await stack.enter_async_context(
            gateway_on_free_port(Settings.from_environ(environ), resolve=resolve)
        )
        if wait:
            await gateway.wait_rounds(1)
        return gateway

    return start


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
