"""Lifecycle: graceful drain on shutdown, and the concurrency cap."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.conftest import StartFake, StartGateway
from tests.fakes import sse_events
from tests.test_proxy import CHAT, assert_openai_error, chat


async def test_shutdown_drains_streams_in_flight_and_refuses_new_requests(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gate = asyncio.Event()
    alpha = await start_fake("alpha", gate=gate)
    gateway = await start_gateway(alpha, GATEWAY_DRAIN_TIMEOUT_S="30")
    async with client.post(gateway.url + CHAT, data=chat("alpha", stream=True)) as stream:
        first = await stream.content.readany()
        gateway.stop.set()  # what SIGTERM does
        while not gateway.parts.proxy.inflight.draining:
            await asyncio.sleep(0)
        async with aiohttp.ClientSession() as fresh:
            async with fresh.get(gateway.url + "/ready") as response:
                assert response.status == 503
            async with fresh.post(gateway.url + CHAT, data=chat("alpha")) as response:
                assert response.status == 503
                assert response.headers["Retry-After"] == "1"
                assert_openai_error(await response.read(), code="shutting_down")
        assert not gateway.server.done()
        gate.set()
        rest = await stream.content.read()
    assert first + rest == b"".join(sse_events("alpha", 4))
    await asyncio.wait_for(gateway.server, 10)
    assert len(alpha.seen) == 1


async def test_drain_timeout_cuts_off_streams_that_outlast_it(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gate = asyncio.Event()
    alpha = await start_fake("alpha", gate=gate)
    gateway = await start_gateway(alpha, GATEWAY_DRAIN_TIMEOUT_S="0.2")
    async with client.post(gateway.url + CHAT, data=chat("alpha", stream=True)) as stream:
        await stream.content.readany()
        gateway.stop.set()
        await asyncio.wait_for(gateway.server, 10)
        try:
            rest = await stream.content.read()
        except aiohttp.ClientPayloadError:
            rest = b""
    assert b"[DONE]" not in rest
    await asyncio.wait_for(alpha.aborted.wait(), 5)


async def test_requests_past_the_concurrency_cap_get_429_at_once(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gate = asyncio.Event()
    alpha = await start_fake("alpha", gate=gate)
    gateway = await start_gateway(alpha, GATEWAY_MAX_CONCURRENCY="1")
    async with client.post(gateway.url + CHAT, data=chat("alpha", stream=True)) as stream:
        await stream.content.readany()
        async with client.post(gateway.url + CHAT, data=chat("alpha")) as response:
            assert response.status == 429
            assert_openai_error(await response.read(), code="too_many_requests")
        gate.set()
        await stream.read()
    assert len(alpha.seen) == 1
    async with client.post(gateway.url + CHAT, data=chat("alpha")) as response:
        assert response.status == 200
