"""API keys: who gets in, what they get when refused, and what the backend sees."""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import StartFake, StartGateway
from tests.test_proxy import CHAT, assert_openai_error, chat


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", "Bearer ", "Basic a2V5LW9uZQ==", "bearer key-one-but-longer", "key-one"],
)
async def test_missing_or_bad_key_is_401_invalid_api_key_and_reaches_no_backend(
    authorization: str | None,
    start_fake: StartFake,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha, GATEWAY_API_KEYS="key-one,key-two")
    headers = {"Authorization": authorization} if authorization else {}
    for method, path in (("POST", CHAT), ("GET", "/v1/models"), ("POST", "/nowhere")):
        async with client.request(
            method, gateway.url + path, data=chat("alpha"), headers=headers
        ) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert_openai_error(await response.read(), code="invalid_api_key")
    assert alpha.seen == []


async def test_any_configured_key_is_accepted_and_never_forwarded(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha, GATEWAY_API_KEYS="key-one,key-two")
    for key in ("key-one", "key-two"):
        headers = {"Authorization": f"Bearer {key}"}
        async with client.post(gateway.url + CHAT, data=chat("alpha"), headers=headers) as response:
            assert response.status == 200
    assert all("Authorization" not in seen.headers for seen in alpha.seen)


async def test_probes_need_no_key(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(await start_fake("alpha"), GATEWAY_API_KEYS="key-one")
    for path in ("/health", "/ready"):
        async with client.get(gateway.url + path) as response:
            assert response.status == 200


async def test_keys_can_come_from_a_file(
    tmp_path: object,
    start_fake: StartFake,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
) -> None:
    from pathlib import Path

    key_file = Path(str(tmp_path)) / "keys"
    key_file.write_text("# team keys\nfile-key\n\nother-key\n")
    gateway = await start_gateway(await start_fake("alpha"), GATEWAY_API_KEYS=str(key_file))
    async with client.post(
        gateway.url + CHAT, data=chat("alpha"), headers={"Authorization": "Bearer other-key"}
    ) as response:
        assert response.status == 200
    async with client.post(
        gateway.url + CHAT, data=chat("alpha"), headers={"Authorization": "Bearer # team keys"}
    ) as response:
        assert response.status == 401


async def test_backend_key_is_sent_to_backends_on_requests_and_health_checks(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    alpha = await start_fake("alpha", required_key="backend-secret")
    gateway = await start_gateway(alpha, GATEWAY_BACKEND_API_KEY="backend-secret")
    async with client.post(
        gateway.url + CHAT, data=chat("alpha"), headers={"Authorization": "Bearer client"}
    ) as response:
        assert response.status == 200
    assert alpha.seen[0].headers["Authorization"] == "Bearer backend-secret"
