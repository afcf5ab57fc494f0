"""The gateway's own routes: /v1/models, /health, /ready."""

from __future__ import annotations

import aiohttp

from tests.conftest import StartFake, StartGateway
from tests.fakes import model_card


async def test_models_lists_the_union_of_healthy_backends_once_each_with_vllm_fields(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    lora = model_card("sql-lora", parent="llama")
    one = await start_fake("one", models=[model_card("llama", max_model_len=4096), lora])
    two = await start_fake("two", models=[model_card("llama", max_model_len=4096)])
    three = await start_fake("three", models=[model_card("qwen")])
    gateway = await start_gateway(one, two, three)
    async with client.get(gateway.url + "/v1/models") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json"
        listing = await response.json()
    assert listing["object"] == "list"
    cards = {card["id"]: card for card in listing["data"]}
    assert [card["id"] for card in listing["data"]] == ["llama", "sql-lora", "qwen"]
    assert cards["llama"] == model_card("llama", max_model_len=4096)
    assert cards["sql-lora"]["parent"] == "llama" and cards["sql-lora"]["root"] == "sql-lora"
    assert cards["qwen"]["max_model_len"] == 2048


async def test_models_leaves_out_a_backend_that_is_down(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    one = await start_fake("one")
    two = await start_fake("two")
    gateway = await start_gateway(one, two)
    two.health_status = 503
    await gateway.wait_rounds(2)
    async with client.get(gateway.url + "/v1/models") as response:
        ids = [card["id"] for card in (await response.json())["data"]]
    assert ids == ["one"]


async def test_health_is_200_even_with_no_backend_up(
    start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway("http://127.0.0.1:9")
    async with client.get(gateway.url + "/health") as response:
        assert response.status == 200
    async with client.get(gateway.url + "/v1/models") as response:
        assert (await response.json()) == {"object": "list", "data": []}


async def test_ready_follows_whether_any_model_has_a_healthy_replica(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    one = await start_fake("one")
    gateway = await start_gateway(one)
    async with client.get(gateway.url + "/ready") as response:
        assert response.status == 200
    one.health_status = 503
    await gateway.wait_rounds(2)
    async with client.get(gateway.url + "/ready") as response:
        assert response.status == 503
    one.health_status = 200
    await gateway.wait_rounds(2)
    async with client.get(gateway.url + "/ready") as response:
        assert response.status == 200


async def test_post_to_models_is_405(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(await start_fake("one"))
    async with client.post(gateway.url + "/v1/models", data=b"{}") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET, HEAD"
        assert (await response.json())["error"]["code"] == "method_not_allowed"
