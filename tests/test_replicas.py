"""Replicas over real sockets: round-robin, health fall and rise, discovery, availability."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import Counter

import aiohttp
import orjson

from gateway.backends import Backend
from gateway.replicas import Registry
from tests.conftest import StartFake, StartGateway
from tests.fakes import model_card
from tests.test_proxy import CHAT, assert_openai_error, chat


async def served_by(client: aiohttp.ClientSession, url: str, model: str, count: int) -> list[str]:
    names = []
    for _ in range(count):
        async with client.post(url + CHAT, data=chat(model, stream=True)) as response:
            assert response.status == 200
            names.append(response.headers["X-Served-By"])
            await response.read()
    return names


async def test_requests_alternate_over_two_replicas_of_a_model(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    one = await start_fake("one", models=[model_card("shared")])
    two = await start_fake("two", models=[model_card("shared")])
    gateway = await start_gateway(one, two)
    names = await served_by(client, gateway.url, "shared", 6)
    assert names in (["one", "two"] * 3, ["two", "one"] * 3)


async def test_round_robin_is_per_model(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    # Requests for another model between two requests for `shared` must not skew its turns.
    one = await start_fake("one", models=[model_card("shared"), model_card("solo")])
    two = await start_fake("two", models=[model_card("shared")])
    gateway = await start_gateway(one, two)
    names = []
    for _ in range(4):
        names += await served_by(client, gateway.url, "shared", 1)
        await served_by(client, gateway.url, "solo", 1)
    assert Counter(names) == {"one": 2, "two": 2}


async def test_replica_failing_health_stops_getting_traffic_and_comes_back(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    one = await start_fake("one", models=[model_card("shared")])
    two = await start_fake("two", models=[model_card("shared")])
    gateway = await start_gateway(one, two, GATEWAY_HEALTH_FALL="2", GATEWAY_HEALTH_RISE="2")

    two.health_status = 503
    await gateway.wait_rounds(2)
    assert await served_by(client, gateway.url, "shared", 4) == ["one"] * 4

    two.health_status = 200
    await gateway.wait_rounds(2)
    assert Counter(await served_by(client, gateway.url, "shared", 4)) == {"one": 2, "two": 2}


async def test_one_failed_check_below_fall_keeps_the_replica(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    one = await start_fake("one", models=[model_card("shared")])
    two = await start_fake("two", models=[model_card("shared")])
    gateway = await start_gateway(one, two, GATEWAY_HEALTH_FALL="1000")
    two.health_status = 500
    await gateway.wait_rounds(2)
    assert Counter(await served_by(client, gateway.url, "shared", 4)) == {"one": 2, "two": 2}


async def test_replica_whose_model_list_fails_is_not_routed(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    one = await start_fake("one", models=[model_card("shared")])
    two = await start_fake("two", models=[model_card("shared")])
    gateway = await start_gateway(one, two)
    two.models_status = 500
    await gateway.wait_rounds(2)
    assert await served_by(client, gateway.url, "shared", 3) == ["one"] * 3


async def test_replica_healthy_but_not_listing_the_model_is_not_routed(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    one = await start_fake("one", models=[model_card("shared")])
    two = await start_fake("two", models=[model_card("shared")])
    gateway = await start_gateway(one, two)
    two.models = [model_card("other")]
    await gateway.wait_rounds(2)
    assert await served_by(client, gateway.url, "shared", 3) == ["one"] * 3
    assert await served_by(client, gateway.url, "other", 1) == ["two"]


async def test_killed_replica_is_skipped_and_rejoins_when_restarted(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    one = await start_fake("one", models=[model_card("shared")])
    two = await start_fake("two", models=[model_card("shared")])
    gateway = await start_gateway(one, two)
    await two.stop()
    await gateway.wait_rounds(2)
    assert await served_by(client, gateway.url, "shared", 3) == ["one"] * 3
    await two.start()
    await gateway.wait_rounds(2)
    assert Counter(await served_by(client, gateway.url, "shared", 4)) == {"one": 2, "two": 2}


async def test_all_replicas_down_is_503_with_retry_after_at_once(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    one = await start_fake("one", models=[model_card("shared")])
    gateway = await start_gateway(one, GATEWAY_HEALTH_INTERVAL_S="0.02")
    one.health_status = 503
    await gateway.wait_rounds(2)
    async with client.post(gateway.url + CHAT, data=chat("shared")) as response:
        assert response.status == 503
        assert int(response.headers["Retry-After"]) >= 1
        body = await response.read()
    assert_openai_error(body, code="model_unavailable")
    assert str(one.port).encode() not in body
    assert one.seen == []


async def test_model_appearing_on_a_backend_at_runtime_is_routed_after_the_next_check(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    base = await start_fake("base")
    gateway = await start_gateway(base)
    async with client.post(gateway.url + CHAT, data=chat("my-lora")) as response:
        assert response.status == 404
    # A LoRA adapter loaded at runtime (vLLM's /v1/load_lora_adapter) appears in /v1/models.
    base.models = [model_card("base"), model_card("my-lora", parent="base")]
    await gateway.wait_rounds(2)
    assert await served_by(client, gateway.url, "my-lora", 1) == ["base"]
    base.models = [model_card("base")]
    await gateway.wait_rounds(2)
    async with client.post(gateway.url + CHAT, data=chat("my-lora")) as response:
        assert response.status == 404


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_backend_not_up_at_startup_answers_503_then_joins_when_it_comes_up(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    port = _free_port()
    gateway = await start_gateway(f"http://127.0.0.1:{port}")
    async with client.get(gateway.url + "/ready") as response:
        assert response.status == 503
    # The gateway cannot know yet which models the server will bring: "not yet", not "no".
    async with client.post(gateway.url + CHAT, data=chat("late")) as response:
        assert response.status == 503
        assert "Retry-After" in response.headers
        assert_openai_error(await response.read(), code="model_unavailable")
    late = await start_fake("late", port=port)
    await gateway.wait_rounds(2)
    assert await served_by(client, gateway.url, "late", 1) == ["late"]
    async with client.get(gateway.url + "/ready") as response:
        assert response.status == 200
    assert late.health_checks >= 1


async def test_pinned_model_is_routed_without_being_listed(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    hidden = await start_fake("hidden", models=[model_card("something-else")])
    gateway = await start_gateway(GATEWAY_MODELS=f"pinned={hidden.url}")
    assert await served_by(client, gateway.url, "pinned", 1) == ["hidden"]
    async with client.get(gateway.url + "/v1/models") as response:
        ids = [card["id"] for card in (await response.json())["data"]]
    assert sorted(ids) == ["pinned", "something-else"]


def test_registry_repr_shows_its_state() -> None:
    backends = [Backend("http://10.0.0.1:1"), Backend("http://10.0.0.2:2")]
    registry = Registry(backends, {}, fall=1, rise=1, retry_after_s=5)
    registry.record_pass(registry.replicas[0], [model_card("m")])
    assert (
        repr(registry) == "<Registry [Replicas: 1 up, 1 down | Models: 1 | Routing: round_robin]>"
    )
    assert "up" in repr(registry.replicas[0]) and "models m" in repr(registry.replicas[0])


def test_models_body_is_cached_and_rebuilt_only_on_change() -> None:
    registry = Registry([Backend("http://10.0.0.1:1")], {}, fall=1, rise=1, retry_after_s=5)
    replica = registry.replicas[0]
    registry.record_pass(replica, [model_card("m")])
    first = registry.models_body()
    registry.record_pass(replica, [model_card("m")])
    assert registry.models_body() is first
    registry.record_pass(replica, [model_card("m"), model_card("n")])
    assert [card["id"] for card in orjson.loads(registry.models_body())["data"]] == ["m", "n"]


async def test_backend_hanging_on_health_is_down_after_the_timeout_and_others_are_served(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    hung = await start_fake("hung", health_gate=release)
    fast = await start_fake("fast")
    gateway = await start_gateway(hung, fast, wait=False, GATEWAY_HEALTH_TIMEOUT_S="0.2")
    await gateway.wait_rounds(1)
    assert await served_by(client, gateway.url, "fast", 1) == ["fast"]
    async with client.post(gateway.url + CHAT, data=chat("hung")) as response:
        assert response.status == 503
    release.set()
    await gateway.wait_rounds(2)
    assert await served_by(client, gateway.url, "hung", 1) == ["hung"]


async def test_a_replica_too_busy_to_answer_checks_stays_while_it_answers_requests(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    busy = await start_fake("busy")
    gateway = await start_gateway(busy, GATEWAY_HEALTH_TIMEOUT_S="0.2")
    replica = gateway.parts.registry.replicas[0]
    # vLLM's API server, starved by its own engine, stops answering /health in time...
    busy.health_gate = asyncio.Event()

    async def keep_asking() -> None:
        while True:
            await served_by(client, gateway.url, "busy", 1)

    asker = asyncio.create_task(keep_asking())
    # ...yet it answers every request: each timed-out check counts as busy, not failed.
    await gateway.wait_rounds(3)
    assert replica.healthy and not asker.done()
    asker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asker
    # Answering nothing any more, a check that times out is a failure again.
    await gateway.wait_rounds(2)
    assert not replica.healthy
    async with client.post(gateway.url + CHAT, data=chat("busy")) as response:
        assert response.status == 503
    busy.health_gate.set()
