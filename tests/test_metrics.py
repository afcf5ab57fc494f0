"""GET /metrics and GET /replicas: what an operator scrapes and reads, after real requests."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from gateway.metrics import TTFT_BUCKETS
from tests.conftest import RunningGateway, StartFake, StartGateway
from tests.fakes import FakeVllm
from tests.test_proxy import CHAT, chat
from tests.test_routing import SHARED, conversation, post

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: aiohttp.ClientSession, url: str, **headers: str) -> Samples:
    async with client.get(url + "/metrics", headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def requests(samples: Samples, **labels: str) -> float:
    """The sum of vllm_gateway_requests_total over the series that match `labels`."""
    return sum(
        count
        for (name, series), count in samples.items()
        if name == "vllm_gateway_requests_total" and set(labels.items()) <= set(series)
    )


async def closed_stream(client: aiohttp.ClientSession, gateway: RunningGateway, fake: FakeVllm):
    """A stream its client leaves after the first chunk; returns once the upstream closed."""
    fake.gate = asyncio.Event()
    async with client.post(gateway.url + CHAT, data=chat(fake.name, stream=True)) as response:
        await response.content.readuntil(b"\n\n")
    await asyncio.wait_for(fake.aborted.wait(), 5)
    await gateway.parts.proxy.inflight.wait_idle()
    fake.gate = None


async def test_counters_and_histograms_move_with_real_requests(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha)
    before = await scrape(client, gateway.url)
    build = [series for name, series in before if name == "vllm_gateway_build_info"]
    assert build and ("version", __version__) in build[0]
    assert requests(before) == 0

    async with client.post(gateway.url + CHAT, data=chat("alpha", stream=True)) as response:
        assert response.status == 200
        await response.read()
    async with client.post(gateway.url + CHAT, data=chat("alpha")) as response:
        await response.read()
    async with client.post(gateway.url + CHAT, data=chat("no-such-model")) as response:
        assert response.status == 404
    await closed_stream(client, gateway, alpha)
    await gateway.parts.proxy.inflight.wait_idle()

    after = await scrape(client, gateway.url)
    route = {"model": "alpha", "route": CHAT}
    assert requests(after, **route, code="200", outcome="ok") == 2
    assert requests(after, **route, code="200", outcome="client_closed") == 1
    # An unknown model is one fixed label value, whatever the client sent.
    assert requests(after, model="_other", route=CHAT, code="404", outcome="rejected") == 1
    assert not any("no-such-model" in str(series) for _, series in after)
    # Three answers began (two whole, one cut off): three first bytes, four durations.
    ttfb = "vllm_gateway_time_to_first_byte_seconds"
    assert value(after, f"{ttfb}_count", model="alpha") == 3
    assert value(after, f"{ttfb}_bucket", model="alpha", le="+Inf") == 3
    buckets = [value(after, f"{ttfb}_bucket", model="alpha", le=str(b)) for b in TTFT_BUCKETS]
    assert buckets == sorted(buckets) and buckets[-1] == 3, "cumulative, every one counted"
    assert 0 < value(after, f"{ttfb}_sum", model="alpha") < 3 * TTFT_BUCKETS[-1]
    assert value(after, "vllm_gateway_request_duration_seconds_count", model="alpha") == 3
    assert value(after, "vllm_gateway_request_duration_seconds_count", model="_other") == 1
    assert value(after, "vllm_gateway_replica_up", replica=alpha.url) == 1
    assert value(after, "vllm_gateway_replica_requests_in_flight", replica=alpha.url) == 0
    assert value(after, "vllm_gateway_requests_in_flight") == 0
    assert value(after, "vllm_gateway_health_checks_total", result="pass") >= 1


async def test_retries_upstream_errors_and_ejections_are_counted_by_kind(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    live = await start_fake("m")
    dead = await start_fake("m")
    # One round of checks, then none for the test's length: the dead replica stays in
    # rotation, so only real traffic finds it out.
    gateway = await start_gateway(
        live, dead, GATEWAY_EJECT_FAILURES="1", GATEWAY_HEALTH_INTERVAL_S="600"
    )
    await dead.stop()
    served = 0
    for _ in range(2):
        async with client.post(gateway.url + CHAT, data=chat("m")) as response:
            assert response.status == 200
            served += 1
    samples = await scrape(client, gateway.url)
    assert served == 2
    assert value(samples, "vllm_gateway_retries_total", reason="connect") >= 1
    assert value(samples, "vllm_gateway_upstream_errors_total", kind="connect") >= 1
    assert value(samples, "vllm_gateway_replica_ejections_total", replica=dead.url) == 1
    assert requests(samples, model="m", outcome="ok") == 2


async def test_backend_5xx_is_an_upstream_error_with_its_code(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    broken = await start_fake("m", status=500, error_body=b'{"error": "boom"}')
    gateway = await start_gateway(broken)
    async with client.post(gateway.url + CHAT, data=chat("m")) as response:
        assert response.status == 500
    await gateway.parts.proxy.inflight.wait_idle()
    samples = await scrape(client, gateway.url)
    assert requests(samples, model="m", code="500", outcome="upstream_error") == 1
    assert value(samples, "vllm_gateway_upstream_errors_total", kind="5xx") == 1


async def test_metrics_and_replicas_need_a_key_when_keys_are_set(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha, GATEWAY_API_KEYS="sesame")
    for path in ("/metrics", "/replicas"):
        async with client.get(gateway.url + path) as response:
            assert response.status == 401
    samples = await scrape(client, gateway.url, Authorization="Bearer sesame")
    assert requests(samples, route="/metrics", code="401", outcome="rejected") == 1
    assert requests(samples, route="/replicas", code="401", outcome="rejected") == 1


async def test_replicas_view_shows_each_backend_state_models_and_load(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    alpha = await start_fake("alpha")
    alpha.gate = asyncio.Event()
    gateway = await start_gateway(alpha, "http://127.0.0.1:9")  # nothing listens on port 9
    async with client.post(gateway.url + CHAT, data=chat("alpha", stream=True)) as stream:
        await stream.content.readuntil(b"\n\n")
        async with client.get(gateway.url + "/replicas") as response:
            assert response.status == 200
            view = orjson.loads(await response.read())
        alpha.gate.set()
        await stream.read()
    by_url = {replica["url"]: replica for replica in view["replicas"]}
    assert by_url[alpha.url]["state"] == "up"
    assert by_url[alpha.url]["models"] == ["alpha"]
    assert by_url[alpha.url]["in_flight"] == 1
    assert by_url["http://127.0.0.1:9"]["state"] == "never_up"
    assert view["never_answered"] == ["http://127.0.0.1:9"]
    assert view["in_flight"] == 1


async def test_metrics_forget_a_replica_that_left_discovery(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    first = await start_fake("m")
    second = await start_fake("m", host="127.0.0.2", port=first.port)
    addresses = ["127.0.0.1", "127.0.0.2"]

    async def resolve(host: str, port: int) -> list[str]:
        return list(addresses)

    gateway = await start_gateway(f"http://vllm.test:{first.port}", resolve=resolve)
    samples = await scrape(client, gateway.url)
    assert value(samples, "vllm_gateway_replica_up", replica=second.url) == 1
    addresses.pop()
    await gateway.wait_rounds(2)  # the round under way may have resolved before the change
    samples = await scrape(client, gateway.url)
    assert value(samples, "vllm_gateway_replica_up", replica=first.url) == 1
    assert ("vllm_gateway_replica_up", (("replica", second.url),)) not in samples


async def test_the_routing_policy_and_its_prefix_index_show_in_metrics_and_replicas(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    one = await start_fake("one", models=SHARED)
    two = await start_fake("two", models=SHARED)
    gateway = await start_gateway(
        one, two, GATEWAY_ROUTING="prefix", GATEWAY_PREFIX_INDEX_ENTRIES="500"
    )
    # A new conversation (a lookup, no hit), then its next turn (a hit, same replica).
    homes = [await post(client, gateway, conversation(7, turn)) for turn in (1, 2)]
    assert homes[0] == homes[1]
    samples = await scrape(client, gateway.url)
    async with client.get(gateway.url + "/replicas") as response:
        routing = orjson.loads(await response.read())["routing"]
    entries = len(gateway.parts.registry.policy.index)  # type: ignore[attr-defined]
    assert entries > 0
    assert value(samples, "vllm_gateway_routing_policy_info", policy="prefix") == 1
    assert value(samples, "vllm_gateway_prefix_index_entries") == entries
    assert value(samples, "vllm_gateway_prefix_index_capacity") == 500
    assert value(samples, "vllm_gateway_prefix_index_lookups_total") == 2
    assert value(samples, "vllm_gateway_prefix_index_hits_total") == 1
    assert value(samples, "vllm_gateway_prefix_load_bound_spills_total") == 0
    assert routing == {
        "policy": "prefix",
        "prefix_index": {
            "entries": entries,
            "capacity": 500,
            "lookups": 2,
            "hits": 1,
            "hit_ratio": 0.5,
            "load_bound_spills": 0,
        },
    }
    # A second scrape adds nothing that did not happen since the first.
    again = await scrape(client, gateway.url)
    assert value(again, "vllm_gateway_prefix_index_lookups_total") == 2


async def test_a_policy_without_an_index_shows_its_name_only(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(await start_fake("alpha"), GATEWAY_ROUTING="least_loaded")
    samples = await scrape(client, gateway.url)
    assert value(samples, "vllm_gateway_routing_policy_info", policy="least_loaded") == 1
    assert value(samples, "vllm_gateway_routing_policy_info", policy="round_robin") == 0
    async with client.get(gateway.url + "/replicas") as response:
        assert orjson.loads(await response.read())["routing"] == {"policy": "least_loaded"}
