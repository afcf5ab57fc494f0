"""Fault injection on the upstream leg: retries, ejection, timeouts, backends dying mid-stream.

Every test checks what the client saw and what the fake backends saw; the gateway fixture
checks on the way out that nothing is left in flight.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp
import orjson
import pytest

from gateway.exchange import complete_events
from tests.conftest import StartFake, StartGateway, open_raw
from tests.fakes import model_card, sse_events
from tests.test_proxy import CHAT, assert_openai_error, chat

SHARED = [model_card("shared")]
VLLM_503 = (
    b'{"error":{"message":"overloaded","type":"ServiceUnavailableError","param":null,"code":503}}'
)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def pin_up(gateway: object, *urls: str) -> None:
    """Mark pinned replicas up by hand, as if each had died just after a passed check."""
    registry = gateway.parts.registry  # type: ignore[attr-defined]
    for replica in registry.replicas:
        if replica.backend.url in urls:
            registry.record_pass(replica, [])


async def test_refused_connection_is_retried_on_another_replica_unseen_by_the_client(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    good = await start_fake("good", models=SHARED)
    dead = f"http://127.0.0.1:{closed_port()}"
    gateway = await start_gateway(
        GATEWAY_MODELS=f"shared={dead}|{good.url}", GATEWAY_HEALTH_FALL="1000"
    )
    await pin_up(gateway, dead)
    for _ in range(4):
        async with client.post(gateway.url + CHAT, data=chat("shared", stream=True)) as response:
            assert response.status == 200
            assert (await response.read()).endswith(b"data: [DONE]\n\n")
    assert len(good.seen) == 4


async def test_all_replicas_refusing_is_502_after_the_allowed_retries(
    start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    dead = [f"http://127.0.0.1:{closed_port()}" for _ in range(4)]
    gateway = await start_gateway(
        GATEWAY_MODELS="shared=" + "|".join(dead), GATEWAY_HEALTH_FALL="1000", GATEWAY_RETRIES="2"
    )
    await pin_up(gateway, *dead)
    async with client.post(gateway.url + CHAT, data=chat("shared")) as response:
        assert response.status == 502
        body = await response.read()
    assert_openai_error(body, code="backend_unreachable")
    assert b"127.0.0.1" not in body
    strikes = sorted(replica.strikes for replica in gateway.parts.registry.replicas)
    assert strikes == [0, 1, 1, 1], "one try and two retries, each on a different replica"


async def test_503_from_a_replica_is_retried_on_another(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    busy = await start_fake("busy", models=SHARED, status=503, error_body=VLLM_503)
    good = await start_fake("good", models=SHARED)
    gateway = await start_gateway(busy, good)
    for _ in range(2):
        async with client.post(gateway.url + CHAT, data=chat("shared")) as response:
            assert response.status == 200
            assert (await response.json())["served_by"] == "good"
    assert len(good.seen) == 2
    assert 1 <= len(busy.seen) <= 2


async def test_503_from_the_only_replica_reaches_the_client_unchanged(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    busy = await start_fake("busy", models=SHARED, status=503, error_body=VLLM_503)
    gateway = await start_gateway(busy)
    async with client.post(gateway.url + CHAT, data=chat("shared")) as response:
        assert response.status == 503
        assert await response.read() == VLLM_503
    assert len(busy.seen) == 1


async def test_400_is_passed_through_not_retried_and_not_a_failure(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    vllm_400 = (
        b'{"error":{"message":"bad","type":"BadRequestError","param":"max_tokens","code":400}}'
    )
    one = await start_fake("one", models=SHARED, status=400, error_body=vllm_400)
    two = await start_fake("two", models=SHARED, status=400, error_body=vllm_400)
    gateway = await start_gateway(one, two, GATEWAY_EJECT_FAILURES="1")
    for _ in range(4):
        async with client.post(gateway.url + CHAT, data=chat("shared")) as response:
            assert response.status == 400
            assert await response.read() == vllm_400
    assert (len(one.seen), len(two.seen)) == (2, 2)
    assert all(r.ejected_until == 0.0 for r in gateway.parts.registry.replicas)


async def test_pooled_connections_closed_by_the_backend_are_retried_on_fresh_ones(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    # Every request that arrives on a reused connection is closed unanswered, as when the
    # backend's keep-alive ran out just as the gateway reused the connection.
    only = await start_fake("only", drop_reused=True)
    # Checks far apart, so the only pooled connections are the first check's and our own.
    gateway = await start_gateway(only, GATEWAY_HEALTH_INTERVAL_S="60")
    for _ in range(3):
        async with client.post(gateway.url + CHAT, data=chat("only", stream=True)) as response:
            assert response.status == 200
            assert (await response.read()).endswith(b"data: [DONE]\n\n")
    assert only.dropped >= 2
    assert len(only.seen) == 3 + only.dropped
    # A stale pooled connection is not the replica's failure.
    assert gateway.parts.registry.replicas[0].strikes == 0


async def test_replica_failing_requests_is_ejected_then_probed_back(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    flaky = await start_fake("flaky", models=SHARED, status=500, error_body=b'{"error":{}}')
    good = await start_fake("good", models=SHARED)
    gateway = await start_gateway(
        flaky, good, GATEWAY_EJECT_FAILURES="2", GATEWAY_EJECT_BASE_S="0.3", GATEWAY_RETRIES="0"
    )
    statuses = []
    for _ in range(6):
        async with client.post(gateway.url + CHAT, data=chat("shared")) as response:
            statuses.append(response.status)
            await response.read()
    # Two 500s (no retry allowed for a 500), then the replica is out and `good` takes all.
    assert statuses.count(500) == 2
    assert len(flaky.seen) == 2
    flaky_replica = next(r for r in gateway.parts.registry.replicas if r.backend.url == flaky.url)
    assert flaky_replica.ejections == 1
    # Mended and past its backoff, it is let back by a passed check or a probe request.
    flaky.error_body = None
    flaky.status = 200
    while flaky_replica.ejected_until:
        await gateway.wait_rounds(1)
    served = []
    for _ in range(4):
        async with client.post(gateway.url + CHAT, data=chat("shared")) as response:
            served.append((await response.json())["served_by"])
    assert sorted(served) == ["flaky", "flaky", "good", "good"]


async def test_backend_hanging_before_headers_gets_504_within_the_headers_timeout(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    never = asyncio.Event()
    hung = await start_fake("hung", hold_headers=never)
    gateway = await start_gateway(hung, GATEWAY_HEADERS_TIMEOUT_S="0.3")
    async with client.post(gateway.url + CHAT, data=chat("hung", stream=True)) as response:
        assert response.status == 504
        assert_openai_error(await response.read(), code="backend_timeout")
    # A slow backend may be generating: it is not retried, and its request is closed.
    assert len(hung.seen) == 1
    await asyncio.wait_for(hung.aborted.wait(), 5)


async def test_backend_killed_after_k_events_ends_the_stream_with_an_error_event(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    events = sse_events("dying", 6)
    dying = await start_fake("dying", die_after=3)
    gateway = await start_gateway(dying)
    received = b""
    async with client.post(gateway.url + CHAT, data=chat("dying", stream=True)) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            while chunk := await response.content.readany():
                received += chunk
    assert received.startswith(b"".join(events[:3]))
    tail = received[len(b"".join(events[:3])) :]
    error = orjson.loads(tail.removeprefix(b"data: ").rstrip(b"\n"))["error"]
    assert error["code"] == 502 and error["message"]
    assert b"[DONE]" not in received and b'"finish_reason":"' not in received
    assert str(dying.port).encode() not in received


async def test_stream_cut_in_the_middle_of_an_event_sends_only_whole_events(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    events = sse_events("cut", 3)
    half = events[2][: len(events[2]) // 2]
    cut = await start_fake("cut", chunks=[events[0], events[1], half], die_after=3)
    gateway = await start_gateway(cut)
    received = b""
    async with client.post(gateway.url + CHAT, data=chat("cut", stream=True)) as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            while chunk := await response.content.readany():
                received += chunk
    whole = events[0] + events[1]
    assert received.startswith(whole)
    tail = received[len(whole) :]
    assert tail.startswith(b'data: {"error"') and tail.endswith(b"}}\n\n")
    assert tail.count(b"data:") == 1, "the half event never reaches the client"


async def test_slow_drip_below_the_idle_timeout_survives_past_many_timeouts(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    # Scaled down from "an event every few seconds for a minute": gaps of 0.15 s under an
    # idle timeout of 0.5 s, for 1.5 s in all (three idle timeouts' worth).
    drip = await start_fake("drip", chunks=sse_events("drip", 9), interval_s=0.15)
    gateway = await start_gateway(drip, GATEWAY_IDLE_TIMEOUT_S="0.5")
    async with client.post(gateway.url + CHAT, data=chat("drip", stream=True)) as response:
        assert await response.read() == b"".join(sse_events("drip", 9))


async def test_long_prefill_within_the_idle_timeout_is_served(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    slow = await start_fake("slow", first_delay_s=0.4)
    gateway = await start_gateway(slow, GATEWAY_IDLE_TIMEOUT_S="2")
    async with client.post(gateway.url + CHAT, data=chat("slow", stream=True)) as response:
        assert await response.read() == b"".join(sse_events("slow", 4))


async def test_long_prefill_past_the_idle_timeout_ends_with_a_timeout_event(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    slow = await start_fake("slow", first_delay_s=3)
    gateway = await start_gateway(slow, GATEWAY_IDLE_TIMEOUT_S="0.3")
    async with client.post(gateway.url + CHAT, data=chat("slow", stream=True)) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    await asyncio.wait_for(slow.aborted.wait(), 5)


async def test_idle_timeout_event_is_what_the_client_reads(
    start_fake: StartFake, start_gateway: StartGateway
) -> None:
    slow = await start_fake("slow", first_delay_s=3)
    gateway = await start_gateway(slow, GATEWAY_IDLE_TIMEOUT_S="0.3")
    reader, writer = await open_raw(gateway.url)
    body = chat("slow", stream=True)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    raw = await reader.read()  # until the gateway closes the connection
    writer.close()
    assert raw.startswith(b"HTTP/1.1 200")
    assert b'"code":504' in raw and b"idle timeout" in raw
    assert not raw.endswith(b"0\r\n\r\n"), "no terminating chunk: the stream ended abnormally"


async def test_health_flapping_does_not_kill_streams_in_flight(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gate = asyncio.Event()
    flappy = await start_fake("flappy", gate=gate)
    gateway = await start_gateway(flappy)
    async with client.post(gateway.url + CHAT, data=chat("flappy", stream=True)) as response:
        first = await response.content.readany()
        flappy.health_status = 503
        await gateway.wait_rounds(2)
        flappy.health_status = 200
        await gateway.wait_rounds(2)
        flappy.health_status = 503
        await gateway.wait_rounds(2)
        gate.set()
        rest = await response.content.read()
    assert first + rest == b"".join(sse_events("flappy", 4))


def test_complete_events_finds_the_last_event_boundary() -> None:
    assert complete_events(b"data: a\n\ndata: b\n\n") == 18
    assert complete_events(b"data: a\n\ndata: b") == 9
    assert complete_events(b"data: a\r\n\r\ndata: b") == 11
    assert complete_events(b"data: a") == 0
    assert complete_events(b"") == 0
    assert complete_events(b"data: a\r\rdata: b") == 9


async def test_slow_headers_within_the_headers_timeout_are_not_cut_by_the_idle_timeout(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    # A non-streaming answer comes only when the generation is done: its wait is timed by
    # the headers timeout, however short the idle timeout.
    hold = asyncio.Event()
    slow = await start_fake("slow", hold_headers=hold)
    gateway = await start_gateway(
        slow, GATEWAY_IDLE_TIMEOUT_S="0.1", GATEWAY_HEADERS_TIMEOUT_S="10"
    )
    request = asyncio.create_task(client.post(gateway.url + CHAT, data=chat("slow")))
    await slow.arrived.wait()
    await asyncio.sleep(0.4)  # the generation's length: four idle timeouts
    hold.set()
    async with await request as response:
        assert response.status == 200
        assert (await response.json())["served_by"] == "slow"


async def test_lone_replica_is_never_ejected_into_a_503(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    lone = await start_fake("lone", status=500, error_body=b'{"error":{"message":"oops"}}')
    gateway = await start_gateway(lone, GATEWAY_EJECT_FAILURES="2", GATEWAY_RETRIES="0")
    for _ in range(5):
        async with client.post(gateway.url + CHAT, data=chat("lone")) as response:
            assert response.status == 500, "the backend's own answer, not the gateway's 503"
            await response.read()
    assert len(lone.seen) == 5
    assert gateway.parts.registry.replicas[0].ejections >= 1


async def test_client_that_stops_reading_is_cut_off_as_its_own_fault_not_the_replicas(
    start_fake: StartFake,
    start_gateway: StartGateway,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Events far larger than every socket buffer between the fake and a client that reads
    # nothing: the gateway's send to that client blocks, while the backend has more to give.
    event = b"data: " + b"x" * (256 * 1024) + b"\n\n"
    alpha = await start_fake("alpha", chunks=[event] * 200)
    gateway = await start_gateway(alpha, GATEWAY_IDLE_TIMEOUT_S="0.5")
    host, port = gateway.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    body = chat("alpha", stream=True)
    writer.write(
        b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: gateway\r\nContent-Type: "
        b"application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    await writer.drain()
    with caplog.at_level(logging.WARNING, logger="gateway.exchange"):
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        # ...and read no more: the gateway cuts the client off and closes the upstream.
        await asyncio.wait_for(alpha.aborted.wait(), 30)
        await gateway.parts.proxy.inflight.wait_idle()
    writer.close()
    [replica] = gateway.parts.registry.replicas
    assert replica.strikes == 0 and not replica.ejected_until, "the replica was blamed"
    messages = [record.getMessage() for record in caplog.records]
    assert any("took no data for 0.5 s: cut off" in message for message in messages), messages
    assert not any("silent past the idle timeout" in message for message in messages)
