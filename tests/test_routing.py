"""Routing policies over real sockets: affinity, the load bound, replicas leaving and coming back,
least-loaded turns, in-flight counts after every kind of failure, state for observability."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import orjson
import pytest

from gateway.backends import Backend
from gateway.prefix_index import block_keys
from gateway.replicas import Registry
from gateway.routing import LeastLoaded, PrefixAffinity, RoundRobin, RoutingState, make_policy
from tests.conftest import RunningGateway, StartFake, StartGateway
from tests.fakes import FakeVllm, model_card
from tests.test_exchange import closed_port, pin_up
from tests.test_proxy import CHAT, assert_openai_error, chat

SHARED = [model_card("shared")]
SYSTEM = "You are a helpful assistant who answers in full sentences. " * 12


def conversation(user: int, turns: int, *, model: str = "shared", stream: bool = False) -> bytes:
    """Turn `turns` of user `user`'s chat: a shared system prompt, the user's own context,
    then each earlier question and answer, as a client resends them."""
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"I am user {user}. " + f"My notes, part {user}. " * 70},
    ]
    for turn in range(1, turns):
        messages.append({"role": "assistant", "content": f"Answer {turn} for {user}. " * 12})
        messages.append({"role": "user", "content": f"Question {turn + 1} from {user}?"})
    return orjson.dumps({"model": model, "messages": messages, "max_tokens": 16, "stream": stream})


async def post(
    client: aiohttp.ClientSession, gateway: RunningGateway, data: bytes, path: str = CHAT
) -> str:
    """Send one non-streaming request; the name of the fake that served it."""
    async with client.post(gateway.url + path, data=data) as response:
        assert response.status == 200, await response.read()
        served_by: str = (await response.json())["served_by"]
        return served_by


def replica_of(gateway: RunningGateway, fake: FakeVllm) -> object:
    return next(r for r in gateway.parts.registry.replicas if r.backend.url == fake.url)


async def start_pair(
    start_fake: StartFake, start_gateway: StartGateway, **env: str
) -> tuple[FakeVllm, FakeVllm, RunningGateway]:
    one = await start_fake("one", models=SHARED)
    two = await start_fake("two", models=SHARED)
    gateway = await start_gateway(one, two, GATEWAY_ROUTING="prefix", **env)
    return one, two, gateway


async def test_every_turn_of_a_conversation_goes_to_the_replica_that_served_the_first(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    _, _, gateway = await start_pair(start_fake, start_gateway)
    served: dict[int, list[str]] = {user: [] for user in range(6)}
    for turn in range(1, 5):
        for user in served:
            served[user].append(await post(client, gateway, conversation(user, turn)))
    assert all(len(set(names)) == 1 for names in served.values()), served
    # New conversations spread: the shared system prompt pinned no one.
    assert Counter(names[0] for names in served.values()) == {"one": 3, "two": 3}
    state = gateway.parts.registry.routing_state()
    assert (state.index_lookups, state.index_hits) == (24, 18)


async def test_round_robin_sends_the_turns_of_a_conversation_everywhere(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    one = await start_fake("one", models=SHARED)
    two = await start_fake("two", models=SHARED)
    gateway = await start_gateway(one, two)
    names = [await post(client, gateway, conversation(7, turn)) for turn in range(1, 5)]
    assert Counter(names) == {"one": 2, "two": 2}


async def test_a_prefix_every_replica_holds_does_not_pin_new_conversations(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gate = asyncio.Event()
    one = await start_fake("one", models=SHARED, gate=gate)
    two = await start_fake("two", models=SHARED, gate=gate)
    gateway = await start_gateway(one, two, GATEWAY_ROUTING="prefix")
    # A burst of first turns sharing the system prompt: past the load bound the others take
    # some, and from then on every replica holds the system prompt.
    held = [
        asyncio.create_task(client.post(gateway.url + CHAT, data=conversation(u, 1, stream=True)))
        for u in range(4)
    ]
    while len(one.seen) + len(two.seen) < 4:
        await asyncio.sleep(0.005)
    assert one.seen and two.seen
    gate.set()
    for task in held:
        response = await task
        await response.read()
        response.release()
    one.seen.clear()
    two.seen.clear()
    # New users one after another, nothing in flight: the shared prompt does not tell the
    # replicas apart, so they alternate rather than all going where the prompt was first seen.
    firsts = [await post(client, gateway, conversation(user, 1)) for user in range(10, 20)]
    assert Counter(firsts) == {"one": 5, "two": 5}
    seconds = [await post(client, gateway, conversation(user, 2)) for user in range(10, 20)]
    assert seconds == firsts


def knows_the_shared_prompt(gateway: RunningGateway) -> bool:
    """Whether the gateway's index has seen the system prompt on two replicas: a new
    conversation is then named by the shared blocks and one of its own."""
    keys = block_keys(conversation(999, 1), "shared", 256)
    anchor: int = gateway.parts.registry.policy.index.anchor(keys)  # type: ignore[attr-defined]
    return 1 < anchor < len(keys)


async def test_hashed_misses_keep_a_conversation_on_one_replica_across_gateway_processes(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    fakes = [await start_fake(name, models=SHARED) for name in ("a", "b", "c", "d")]
    # Two gateways, each with its own index, as two workers or two pods are.
    env = {"GATEWAY_ROUTING": "prefix", "GATEWAY_PREFIX_MISS": "hash"}
    gateways = [await start_gateway(*fakes, **env) for _ in range(2)]
    for gateway in gateways:
        # New conversations spread (by their whole prompt) until the system prompt has been
        # served by two replicas: from then on it names nobody.
        for user in range(100, 140):
            if knows_the_shared_prompt(gateway):
                break
            await post(client, gateway, conversation(user, 1))
        assert knows_the_shared_prompt(gateway)
    # Each process has seen other traffic too (its own turn-taking is its own).
    await post(client, gateways[0], conversation(200, 1))
    homes: dict[int, set[str]] = {user: set() for user in range(8)}
    for turn in range(1, 5):
        for user in homes:
            # Every turn reaches the other gateway than the turn before.
            gateway = gateways[(user + turn) % 2]
            homes[user].add(await post(client, gateway, conversation(user, turn)))
    assert all(len(served) == 1 for served in homes.values()), homes
    assert len(set.union(*homes.values())) > 1


async def test_hashed_misses_spread_new_conversations_after_a_prompt_seen_once(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    fakes = [await start_fake(name, models=SHARED) for name in ("a", "b", "c")]
    gateway = await start_gateway(*fakes, GATEWAY_ROUTING="prefix", GATEWAY_PREFIX_MISS="hash")
    # One after another, nothing in flight, so the load bound never steps in: hashing on
    # the system prompt alone would send every one of them where the first went.
    firsts = [await post(client, gateway, conversation(user, 1)) for user in range(12)]
    assert len(set(firsts)) > 1
    assert knows_the_shared_prompt(gateway)


@pytest.mark.parametrize("factor", ["1.25", "100"])
async def test_a_burst_of_one_prefix_stays_within_the_load_bound(
    start_fake: StartFake,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    factor: str,
) -> None:
    gate = asyncio.Event()
    fakes = [await start_fake(name, models=SHARED, gate=gate) for name in ("a", "b", "c")]
    gateway = await start_gateway(
        *fakes, GATEWAY_ROUTING="prefix", GATEWAY_PREFIX_LOAD_FACTOR=factor
    )
    registry = gateway.parts.registry
    # The conversation is known on one replica first.
    await post(client, gateway, conversation(1, 1))
    owner = next(fake for fake in fakes if fake.seen)
    for fake in fakes:
        fake.seen.clear()
    burst = 24
    peaks: dict[str, int] = Counter()

    async def one_request() -> None:
        data = conversation(1, 2, stream=True)
        async with client.post(gateway.url + CHAT, data=data) as response:
            assert response.status == 200
            await response.content.readany()
            # Every placement so far kept every replica within c x (average + 1).
            loads = [r.inflight for r in registry.replicas]
            bound = float(factor) * (sum(loads) / len(loads) + 1)
            assert max(loads) <= bound, (loads, bound)
            for replica in registry.replicas:
                peaks[replica.backend.url] = max(peaks[replica.backend.url], replica.inflight)
            await response.read()

    tasks = [asyncio.create_task(one_request()) for _ in range(burst)]
    while sum(len(fake.seen) for fake in fakes) < burst:
        await asyncio.sleep(0.005)
    counts = {fake.name: len(fake.seen) for fake in fakes}
    gate.set()
    await asyncio.gather(*tasks)
    if factor == "100":
        # No bound to speak of: affinity alone puts the whole burst where the prefix is.
        assert counts[owner.name] == burst
    else:
        assert max(counts.values()) <= 1.25 * (burst / 3 + 1), counts
        assert counts[owner.name] == max(counts.values())
        assert min(counts.values()) > 0
        assert gateway.parts.registry.routing_state().bound_spills > 0


async def test_index_stays_at_its_cap_under_a_flood_of_unique_prompts(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    _, _, gateway = await start_pair(start_fake, start_gateway, GATEWAY_PREFIX_INDEX_ENTRIES="40")
    policy = gateway.parts.registry.policy
    assert isinstance(policy, PrefixAffinity)
    for user in range(30):
        await post(client, gateway, conversation(1000 + user, 1))
        assert len(policy.index) <= 40
    state = gateway.parts.registry.routing_state()
    assert (state.index_entries, state.index_capacity) == (40, 40)


async def test_a_replica_going_down_mid_run_loses_its_conversations_to_the_others(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    # The refused tries below must not eject `one` as well (5 strikes, 30 s): this test is
    # about the health checks taking it out and back, and an ejection would outlast it.
    one, two, gateway = await start_pair(start_fake, start_gateway, GATEWAY_EJECT_FAILURES="1000")
    users = range(6)
    home = {user: await post(client, gateway, conversation(user, 1)) for user in users}
    assert set(home.values()) == {"one", "two"}
    await one.stop()
    # Before a health check notices: a refused connection is retried on the other replica.
    for turn in (2, 3):
        for user in users:
            assert await post(client, gateway, conversation(user, turn)) == "two"
    while replica_of(gateway, one).healthy:  # type: ignore[attr-defined]
        await gateway.wait_rounds(1)
    await one.start()
    while not replica_of(gateway, one).healthy:  # type: ignore[attr-defined]
        await gateway.wait_rounds(1)
    # Back up: the old conversations stay on `two`, which holds them now (the retries took
    # them over from `one`), and new conversations reach `one` again.
    for user in users:
        assert await post(client, gateway, conversation(user, 4)) == "two"
    newcomers = [await post(client, gateway, conversation(user, 1)) for user in range(50, 54)]
    assert "one" in newcomers


async def test_a_replica_that_comes_back_is_not_trusted_with_what_it_held_before(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gate = asyncio.Event()
    one, two, gateway = await start_pair(start_fake, start_gateway)
    users = [user for user in range(8)]
    homes = {user: await post(client, gateway, conversation(user, 1)) for user in users}
    user = next(u for u in users if homes[u] == "one")
    # `one` restarts: its cache is gone, and the next check sees it down, then up again.
    await one.stop()
    while replica_of(gateway, one).healthy:  # type: ignore[attr-defined]
        await gateway.wait_rounds(1)
    one.gate = gate
    await one.start()
    while not replica_of(gateway, one).healthy:  # type: ignore[attr-defined]
        await gateway.wait_rounds(1)
    # One request in flight on `one` leaves it within the load bound for the old
    # conversation; only forgetting the old epoch sends that conversation to the idle one.
    while True:
        busy = await client.post(gateway.url + CHAT, data=chat("shared", stream=True))
        if busy.headers["X-Served-By"] == "one":
            break
        await busy.read()
        busy.release()
    assert await post(client, gateway, conversation(user, 2)) == "two"
    gate.set()
    await busy.read()
    busy.release()


async def test_least_loaded_picks_the_fewest_in_flight_and_breaks_ties_in_turn(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gates = {name: asyncio.Event() for name in ("a", "b", "c")}
    fakes = {n: await start_fake(n, models=SHARED, gate=g) for n, g in gates.items()}
    gateway = await start_gateway(*fakes.values(), GATEWAY_ROUTING="least_loaded")
    held: list[aiohttp.ClientResponse] = []

    async def open_stream() -> str:
        response = await client.post(gateway.url + CHAT, data=chat("shared", stream=True))
        await response.content.readany()
        held.append(response)
        return response.headers["X-Served-By"]

    # Nothing in flight: a tie among all three, taken in turn.
    first = [await open_stream() for _ in range(3)]
    assert sorted(first) == ["a", "b", "c"]
    # `b` finishes its stream: it alone has the fewest in flight, whoever's turn it is.
    gates["b"].set()
    await held[first.index("b")].read()
    fakes["b"].gate = asyncio.Event()
    assert await open_stream() == "b"
    # All at one again: the tie goes to the next in turn after `b`.
    following = first[(first.index("b") + 1) % 3]
    assert await open_stream() == following
    for gate in gates.values():
        gate.set()
    fakes["b"].gate.set()  # type: ignore[union-attr]
    for response in held:
        await response.read()
        response.release()


async def test_adapters_are_routed_by_their_own_prefixes(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    cards = [model_card("base"), model_card("sql-lora", parent="base")]
    one = await start_fake("one", models=cards)
    two = await start_fake("two", models=cards)
    gateway = await start_gateway(one, two, GATEWAY_ROUTING="prefix")
    for model in ("sql-lora", "base"):
        names = [
            await post(client, gateway, conversation(user, turn, model=model))
            for turn in (1, 2, 3)
            for user in (1, 2)
        ]
        assert names[0::2] == [names[0]] * 3 and names[1::2] == [names[1]] * 3
        assert names[0] != names[1]


@pytest.mark.parametrize(
    ("path", "field"),
    [("/v1/embeddings", "input"), ("/v1/completions", "prompt"), ("/pooling", "input")],
)
async def test_other_routes_keep_their_prompts_together_too(
    start_fake: StartFake,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    path: str,
    field: str,
) -> None:
    _, _, gateway = await start_pair(start_fake, start_gateway)
    documents = [f"Document {n}: " + "some words of it. " * 40 for n in range(4)]
    bodies = [orjson.dumps({"model": "shared", field: text}) for text in documents]
    first = [await post(client, gateway, data, path) for data in bodies]
    again = [await post(client, gateway, data, path) for data in bodies]
    assert again == first
    assert Counter(first) == {"one": 2, "two": 2}
    # Fresh text every time: nothing to reuse, so it is spread as evenly as round-robin.
    fresh = [
        await post(client, gateway, orjson.dumps({"model": "shared", field: f"{n} " * 300}), path)
        for n in range(8)
    ]
    assert Counter(fresh) == {"one": 4, "two": 4}


POLICIES = ["round_robin", "least_loaded", "prefix"]


async def settled(gateway: RunningGateway) -> list[int]:
    await asyncio.wait_for(gateway.parts.proxy.inflight.wait_idle(), 5)
    return [replica.inflight for replica in gateway.parts.registry.replicas]


@pytest.mark.parametrize("policy", POLICIES)
async def test_in_flight_counts_return_to_zero_after_a_client_disconnect(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession, policy: str
) -> None:
    gate = asyncio.Event()
    fakes = [await start_fake(n, models=SHARED, gate=gate) for n in ("one", "two")]
    gateway = await start_gateway(*fakes, GATEWAY_ROUTING=policy)
    response = await client.post(gateway.url + CHAT, data=conversation(1, 2, stream=True))
    await response.content.readany()
    assert sum(r.inflight for r in gateway.parts.registry.replicas) == 1
    response.close()
    await asyncio.wait_for(asyncio.gather(*(f.aborted.wait() for f in fakes if f.seen)), 5)
    assert await settled(gateway) == [0, 0]


@pytest.mark.parametrize("policy", POLICIES)
async def test_in_flight_counts_return_to_zero_after_retries_and_connect_errors(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession, policy: str
) -> None:
    busy = await start_fake("busy", models=SHARED, status=503, error_body=b'{"error":{}}')
    good = await start_fake("good", models=SHARED)
    dead = f"http://127.0.0.1:{closed_port()}"
    gateway = await start_gateway(
        GATEWAY_MODELS=f"shared={dead}|{busy.url}|{good.url}",
        GATEWAY_HEALTH_FALL="1000",
        GATEWAY_EJECT_FAILURES="1000",
        GATEWAY_ROUTING=policy,
    )
    await pin_up(gateway, dead)
    for user in range(6):
        assert await post(client, gateway, conversation(user, 1)) == "good"
    assert await settled(gateway) == [0, 0, 0]
    # Nothing but failures: every replica refuses or is busy, the client gets the error.
    good.status, good.error_body = 503, b'{"error":{}}'
    async with client.post(gateway.url + CHAT, data=conversation(9, 1)) as response:
        assert response.status == 503
    assert await settled(gateway) == [0, 0, 0]


@pytest.mark.parametrize("policy", POLICIES)
async def test_in_flight_counts_return_to_zero_after_5xx_and_streams_cut_midway(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession, policy: str
) -> None:
    broken = await start_fake("broken", models=SHARED, status=500, error_body=b'{"error":{}}')
    dying = await start_fake("dying", models=SHARED, die_after=2)
    gateway = await start_gateway(broken, dying, GATEWAY_ROUTING=policy, GATEWAY_RETRIES="0")
    statuses = []
    for user in range(4):
        async with client.post(
            gateway.url + CHAT, data=conversation(user, 1, stream=True)
        ) as response:
            statuses.append(response.status)
            body = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in response.content.iter_any():
                    body += chunk
                # A 500 ends cleanly; the stream cut mid-way does not.
                assert response.status == 500
                raise aiohttp.ClientPayloadError("ended cleanly")
            if response.status == 200:
                assert b"BadGatewayError" in body and b"[DONE]" not in body
    assert Counter(statuses) == {200: 2, 500: 2}
    assert await settled(gateway) == [0, 0]


@pytest.mark.parametrize("policy", POLICIES)
async def test_in_flight_counts_return_to_zero_after_the_headers_timeout(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession, policy: str
) -> None:
    hung = await start_fake("hung", models=SHARED, hold_headers=asyncio.Event())
    gateway = await start_gateway(hung, GATEWAY_ROUTING=policy, GATEWAY_HEADERS_TIMEOUT_S="0.2")
    async with client.post(gateway.url + CHAT, data=conversation(1, 1)) as response:
        assert response.status == 504
        assert_openai_error(await response.read(), code="backend_timeout")
    assert await settled(gateway) == [0]


async def test_routing_state_shows_the_policy_its_index_and_each_replicas_load(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gate = asyncio.Event()
    one = await start_fake("one", models=SHARED, gate=gate)
    two = await start_fake("two", models=SHARED, gate=gate)
    gateway = await start_gateway(
        one, two, GATEWAY_ROUTING="prefix", GATEWAY_PREFIX_INDEX_ENTRIES="1000"
    )
    registry = gateway.parts.registry
    response = await client.post(gateway.url + CHAT, data=conversation(1, 3, stream=True))
    await response.content.readany()
    state = registry.routing_state()
    assert isinstance(state, RoutingState)
    served = response.headers["X-Served-By"]
    loads = {load.url: load.inflight for load in state.inflight}
    assert loads == {one.url: int(served == "one"), two.url: int(served == "two")}
    assert state.policy == "prefix" and state.index_capacity == 1000
    assert state.index_entries == len(block_keys(conversation(1, 3, stream=True), "shared", 256))
    assert (state.index_lookups, state.index_hits, state.index_hit_ratio) == (1, 0, 0.0)
    text = repr(registry.policy)
    assert text.startswith("<PrefixAffinity [c 1.5, blocks of 256 B, misses least loaded | index ")
    assert "0 hits of 1 lookups" in text
    assert "Routing: prefix" in repr(registry)
    gate.set()
    await response.read()
    response.release()


def test_policies_without_an_index_report_their_name_and_loads() -> None:
    registry = Registry(
        [Backend("http://10.0.0.1:1")], {}, fall=1, rise=1, retry_after_s=5, policy=LeastLoaded()
    )
    registry.replicas[0].inflight = 2
    state = registry.routing_state()
    assert state.policy == "least_loaded" and state.index_capacity == 0
    assert [(load.url, load.inflight) for load in state.inflight] == [("http://10.0.0.1:1", 2)]
    registry.replicas[0].inflight = 0
    assert repr(RoundRobin()) == "<RoundRobin>"


def test_misses_are_hashed_by_default_only_when_the_gateway_runs_several_workers() -> None:
    def hashed(miss: str, workers: int) -> bool:
        policy = make_policy(
            "prefix", index_entries=10, load_factor=1.5, block_bytes=256, miss=miss, workers=workers
        )
        assert isinstance(policy, PrefixAffinity)
        return policy.hash_misses

    assert (hashed("auto", 1), hashed("auto", 2)) == (False, True)
    assert (hashed("hash", 1), hashed("least_loaded", 4)) == (True, False)
