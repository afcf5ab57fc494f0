"""Backends by host name: one replica per address, re-resolved every round; the startup window."""

from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp
import orjson
import pytest

from tests.conftest import StartFake, StartGateway
from tests.fakes import FakeVllm
from tests.test_proxy import CHAT, chat

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


def free_port_on_every_host() -> int:
    """A port free on each of HOSTS, as a StatefulSet's pods all listen on the same one."""
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind((HOSTS[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in HOSTS[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every loopback address")


class Dns:
    """The answers the test gives for the name, changed as the test goes."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.asked = 0

    async def resolve(self, host: str, port: int) -> list[str]:
        assert host == "vllm.test"
        self.asked += 1
        return list(self.addresses)


async def test_a_name_with_three_addresses_is_three_replicas_then_two_losing_no_request(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    port = free_port_on_every_host()
    fakes: list[FakeVllm] = [await start_fake("m", host=host, port=port) for host in HOSTS]
    dns = Dns(list(HOSTS))
    gateway = await start_gateway(f"http://vllm.test:{port}", resolve=dns.resolve)
    assert sorted(r.backend.url for r in gateway.parts.registry.replicas) == [
        f"http://{host}:{port}" for host in HOSTS
    ]
    for _ in range(6):
        async with client.post(gateway.url + CHAT, data=chat("m")) as response:
            assert response.status == 200
    assert [len(fake.seen) for fake in fakes] == [2, 2, 2]

    # A stream is in flight on the third pod when the name stops listing it.
    leaving = fakes[2]
    leaving.gate = asyncio.Event()
    leaving.arrived.clear()
    streams = []
    while not leaving.arrived.is_set():
        response = await client.post(gateway.url + CHAT, data=chat("m", stream=True))
        await response.content.readuntil(b"\n\n")
        streams.append(response)
    [gone] = [r for r in gateway.parts.registry.replicas if r.backend.url == leaving.url]
    assert gone.inflight == 1
    dns.addresses = list(HOSTS[:2])
    await gateway.wait_rounds(2)  # the round under way may have resolved before the change
    assert sorted(r.backend.url for r in gateway.parts.registry.replicas) == [
        f"http://{host}:{port}" for host in HOSTS[:2]
    ]
    seen_before = len(leaving.seen)
    for _ in range(4):
        async with client.post(gateway.url + CHAT, data=chat("m")) as response:
            assert response.status == 200
    assert len(leaving.seen) == seen_before, "a replica that left discovery got a request"

    # The stream on the replica that left finishes whole: nothing in flight is lost.
    leaving.gate.set()
    for response in streams:
        body = await response.read()
        assert body.rstrip().endswith(b"data: [DONE]")
        response.release()
    await gateway.parts.proxy.inflight.wait_idle()
    assert gone.inflight == 0


async def test_a_dns_failure_keeps_the_replicas_of_the_last_answer(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    fake = await start_fake("m")
    answers: list[str] | None = ["127.0.0.1"]

    async def resolve(host: str, port: int) -> list[str]:
        if answers is None:
            raise OSError("Temporary failure in name resolution")
        return answers

    gateway = await start_gateway(f"http://vllm.test:{fake.port}", resolve=resolve)
    answers = None
    await gateway.wait_rounds(2)
    async with client.post(gateway.url + CHAT, data=chat("m")) as response:
        assert response.status == 200


async def test_unknown_model_is_503_while_a_backend_may_still_be_loading(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    alpha = await start_fake("alpha")
    # Nothing listens on port 9: a backend that never comes up, within the default window.
    gateway = await start_gateway(alpha, "http://127.0.0.1:9")
    async with client.post(gateway.url + CHAT, data=chat("beta")) as response:
        assert response.status == 503
        assert response.headers["Retry-After"]
        assert orjson.loads(await response.read())["error"]["code"] == "model_unavailable"


async def test_past_the_startup_window_an_unknown_model_is_404_and_the_log_names_the_backend(
    start_fake: StartFake,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alpha = await start_fake("alpha")
    with caplog.at_level(logging.WARNING, logger="gateway.health"):
        gateway = await start_gateway(alpha, "http://127.0.0.1:9", GATEWAY_STARTUP_WINDOW_S="0.001")
    async with client.post(gateway.url + CHAT, data=chat("beta")) as response:
        assert response.status == 404
        assert orjson.loads(await response.read())["error"]["code"] == "model_not_found"
    assert any(
        "http://127.0.0.1:9 never answered" in record.getMessage() for record in caplog.records
    )
    assert gateway.parts.registry.never_answered() == ["http://127.0.0.1:9"]
