"""The server around the app: graceful drain, the concurrency cap, the guards on requests'
heads, and HTTP/2 (hypercorn's alone)."""

from __future__ import annotations

import asyncio

import aiohttp
import h2.connection
import h2.events
import pytest

from tests.conftest import StartFake, StartGateway, open_raw
from tests.fakes import sse_events
from tests.test_framing import read_until_closed
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


async def test_a_head_sent_a_byte_at_a_time_is_cut_off(
    start_fake: StartFake, start_gateway: StartGateway
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha)
    reader, writer = await open_raw(gateway.url)
    writer.write(b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: gw\r\n")

    async def trickle() -> None:
        # Slowloris: one header line every half second, for a minute, never the blank line.
        for index in range(120):
            writer.write(b"X-Slow-%d: 1\r\n" % index)
            await writer.drain()
            await asyncio.sleep(0.5)  # the client's pace, part of the scenario

    sender = asyncio.create_task(trickle())
    try:
        answer = await read_until_closed(reader)
    except ConnectionResetError:
        answer = b""
    assert not sender.done(), "the server waited for the whole head"
    sender.cancel()
    writer.close()
    assert not answer.startswith(b"HTTP/1.1 2")
    assert alpha.seen == []


async def test_a_head_past_16_kib_is_refused_and_the_connection_closes(
    start_fake: StartFake, start_gateway: StartGateway
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha)
    reader, writer = await open_raw(gateway.url)
    writer.write(b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: gw\r\n")
    writer.write(b"X-Big: " + b"x" * 20_000 + b"\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(read_until_closed(reader), 10)
    writer.close()
    status = int(answer.split(b" ", 2)[1])
    assert 400 <= status < 500
    assert alpha.seen == []


def _h2_request(path: str, body: bytes) -> tuple[h2.connection.H2Connection, bytes]:
    """An h2c connection preface with one POST on stream 1: the bytes to send."""
    connection = h2.connection.H2Connection()
    connection.initiate_connection()
    connection.send_headers(
        1,
        [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", "gw")],
    )
    connection.send_data(1, body, end_stream=True)
    return connection, connection.data_to_send()


async def test_http2_with_prior_knowledge_streams_under_hypercorn_and_is_refused_by_uvicorn(
    server: str, start_fake: StartFake, start_gateway: StartGateway
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha)
    reader, writer = await open_raw(gateway.url)
    connection, preface = _h2_request(CHAT, chat("alpha", stream=True))
    writer.write(preface)
    if server == "uvicorn":
        # HTTP/1.1 only: the preface is a bad HTTP/1.1 request.
        answer = await asyncio.wait_for(read_until_closed(reader), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 400 ")
        assert alpha.seen == []
        return
    body = b""
    ended = False
    while not ended:
        data = await asyncio.wait_for(reader.read(65536), 10)
        assert data, "hypercorn closed the h2 connection"
        for event in connection.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                body += event.data
                connection.acknowledge_received_data(event.flow_controlled_length, 1)
            elif isinstance(event, h2.events.StreamEnded):
                ended = True
        writer.write(connection.data_to_send())
    writer.close()
    assert body == b"".join(sse_events("alpha", 4))


@pytest.mark.parametrize("server", ["hypercorn"])  # uvicorn: HTTP/1.1 only (above)
async def test_an_http2_stream_reset_by_its_client_closes_the_upstream_request(
    start_fake: StartFake, start_gateway: StartGateway
) -> None:
    gate = asyncio.Event()
    alpha = await start_fake("alpha", gate=gate)
    gateway = await start_gateway(alpha)
    reader, writer = await open_raw(gateway.url)
    connection, preface = _h2_request(CHAT, chat("alpha", stream=True))
    writer.write(preface)
    first = False
    while not first:
        data = await asyncio.wait_for(reader.read(65536), 10)
        assert data
        first = any(isinstance(e, h2.events.DataReceived) for e in connection.receive_data(data))
    connection.reset_stream(1)
    writer.write(connection.data_to_send())
    await asyncio.wait_for(alpha.aborted.wait(), 5)
    assert not gate.is_set()
    writer.close()


async def health_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


async def test_an_idle_connection_closes_after_the_keepalive_setting(
    start_fake: StartFake, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(await start_fake("alpha"), GATEWAY_KEEPALIVE_S="1")
    reader, writer = await open_raw(gateway.url)
    assert (await health_over(reader, writer)).startswith(b"HTTP/1.1 200")
    # The default (5 s) would outlast this wait.
    assert await asyncio.wait_for(reader.read(), 4) == b""
    writer.close()


async def test_a_longer_keepalive_serves_a_connection_idle_past_the_default(
    start_fake: StartFake, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(await start_fake("alpha"), GATEWAY_KEEPALIVE_S="30")
    reader, writer = await open_raw(gateway.url)
    assert (await health_over(reader, writer)).startswith(b"HTTP/1.1 200")
    # A pooled connection left idle longer than the default 5 s, as a balancer's would be.
    await asyncio.sleep(6)  # the client's idle time, part of the scenario
    assert (await health_over(reader, writer)).startswith(b"HTTP/1.1 200")
    writer.close()
