"""The proxied routes, over real sockets: routing, streaming, errors, disconnects, headers."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import orjson
import pytest

from tests.conftest import StartFake, StartGateway, open_raw
from tests.fakes import sse_events

CHAT = "/v1/chat/completions"


def chat(model: str, *, stream: bool = False) -> bytes:
    return orjson.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    )


def assert_openai_error(body: bytes, *, code: str | None = None) -> dict[str, object]:
    document = orjson.loads(body)
    error = document["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


async def test_requests_route_by_model_to_the_server_that_serves_it(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    alpha = await start_fake("alpha")
    beta = await start_fake("beta")
    gateway = await start_gateway(alpha, beta)
    for model in ("alpha", "beta", "alpha"):
        async with client.post(gateway.url + CHAT, data=chat(model)) as response:
            assert response.status == 200
            assert (await response.json())["served_by"] == model
    assert [orjson.loads(s.body)["model"] for s in alpha.seen] == ["alpha", "alpha"]
    assert [orjson.loads(s.body)["model"] for s in beta.seen] == ["beta"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/score",
        "/v1/rerank",
        "/v2/rerank",
        "/classify",
        "/pooling",
        "/tokenize",
        "/detokenize",
    ],
)
async def test_every_listed_route_reaches_the_backend_on_the_same_path(
    path: str, start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha)
    async with client.post(gateway.url + path, data=b'{"model": "alpha"}') as response:
        assert response.status == 200
    assert [seen.path for seen in alpha.seen] == [path]


async def test_body_goes_upstream_byte_for_byte(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha)
    # Odd spacing, key order, unicode escapes and a trailing newline must all survive.
    body = (
        b'{ "stream":false,"messages":[{"role":"user","content":"h\\u00e9 \xc3\xa9"}],'
        b'  "model" :"alpha"}\n'
    )
    async with client.post(gateway.url + CHAT, data=body) as response:
        assert response.status == 200
    assert alpha.seen[0].body == body


async def test_first_chunk_reaches_the_client_while_the_backend_holds_the_rest(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gate = asyncio.Event()
    alpha = await start_fake("alpha", gate=gate)
    gateway = await start_gateway(alpha)
    events = sse_events("alpha", 4)
    async with client.post(gateway.url + CHAT, data=chat("alpha", stream=True)) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["X-Accel-Buffering"] == "no"
        first = await response.content.readany()
        assert first == events[0]
        assert not gate.is_set()
        gate.set()
        rest = await response.content.read()
    assert first + rest == b"".join(events)


async def test_stream_bytes_pass_through_unchanged_however_the_backend_splits_them(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    payload = b"".join(sse_events("alpha", 20))
    payload += b": keep-alive comment\r\n\r\nevent: x\ndata: \xf0\x9f\x98\x80 multi-byte\n\n"
    # Split mid-event and mid-UTF-8 sequence: the gateway must not care.
    chunks = [payload[i : i + 37] for i in range(0, len(payload), 37)]
    alpha = await start_fake("alpha", chunks=chunks)
    gateway = await start_gateway(alpha)
    async with client.post(gateway.url + CHAT, data=chat("alpha", stream=True)) as response:
        assert response.status == 200
        received = await response.read()
    assert received == payload


async def test_backend_error_answer_reaches_the_client_unchanged(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    vllm_400 = (
        b'{"error":{"message":"max_tokens must be at least 1, got -1.",'
        b'"type":"BadRequestError","param":"max_tokens","code":400}}'
    )
    alpha = await start_fake("alpha", status=400, error_body=vllm_400)
    gateway = await start_gateway(alpha)
    async with client.post(gateway.url + CHAT, data=chat("alpha")) as response:
        assert response.status == 400
        assert await response.read() == vllm_400
    assert len(alpha.seen) == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"", None),
        (b'["model", "alpha"]', None),
        (b'{"messages": []}', "model"),
        (b'{"model": 7}', "model"),
        (b'{"model": null}', "model"),
    ],
)
async def test_bad_bodies_get_400_and_never_reach_a_backend(
    body: bytes,
    param: str | None,
    start_fake: StartFake,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha)
    async with client.post(gateway.url + CHAT, data=body) as response:
        assert response.status == 400
        error = assert_openai_error(await response.read())
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert alpha.seen == []


async def test_unknown_model_is_404_model_not_found(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha)
    async with client.post(gateway.url + CHAT, data=chat("gamma")) as response:
        assert response.status == 404
        error = assert_openai_error(await response.read(), code="model_not_found")
    assert "gamma" in str(error["message"])
    assert alpha.seen == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions/"),
        ("POST", "/v1/other"),
        ("GET", "/server_info"),
        ("POST", "/"),
    ],
)
async def test_routes_outside_the_list_are_404_and_never_reach_a_backend(
    method: str,
    path: str,
    start_fake: StartFake,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha)
    async with client.request(method, gateway.url + path, data=chat("alpha")) as response:
        assert response.status == 404
        assert_openai_error(await response.read(), code="not_found")
    assert alpha.seen == []


async def test_get_on_a_proxied_route_is_405_with_allow(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha)
    async with client.get(gateway.url + CHAT) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert_openai_error(await response.read())


async def test_body_over_the_limit_with_content_length_is_413_before_any_upstream_request(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha, GATEWAY_MAX_BODY_BYTES="1000")
    body = b'{"model": "alpha", "prompt": "' + b"x" * 2000 + b'"}'
    async with client.post(gateway.url + CHAT, data=body) as response:
        assert response.status == 413
        assert_openai_error(await response.read(), code="request_too_large")
    assert alpha.seen == []


async def test_chunked_body_over_the_limit_is_413_before_any_upstream_request(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha, GATEWAY_MAX_BODY_BYTES="1000")

    async def body() -> object:
        yield b'{"model": "alpha", "prompt": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    async with client.post(gateway.url + CHAT, data=body()) as response:
        assert response.status == 413
        assert_openai_error(await response.read(), code="request_too_large")
    assert alpha.seen == []


async def test_a_refused_body_still_arriving_is_answered_at_once_and_the_connection_closed(
    start_fake: StartFake, start_gateway: StartGateway
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha, GATEWAY_MAX_BODY_BYTES="1000")
    reader, writer = await open_raw(gateway.url)
    size = 64 * 1024 * 1024
    writer.write(
        b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: gw\r\nContent-Length: "
        + str(size).encode() + b"\r\n\r\n"
    )  # fmt: skip

    async def send_body() -> bool:
        try:
            for _ in range(size // 65536):
                writer.write(b"x" * 65536)
                await writer.drain()
        except ConnectionError:
            return False  # the server closed the connection
        return True

    sender = asyncio.create_task(send_body())
    answer = b""
    try:
        while chunk := await reader.read(65536):
            answer += chunk
    except ConnectionError:
        pass  # closed with the unread body in its buffer: the kernel resets
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert not await sender, "the server read the whole refused body"
    writer.close()
    assert alpha.seen == []


async def test_chunked_body_under_the_limit_is_forwarded_whole(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha, GATEWAY_MAX_BODY_BYTES="1000")

    async def body() -> object:
        yield b'{"model": '
        yield b'"alpha", "prompt": "split"}'

    async with client.post(gateway.url + CHAT, data=body()) as response:
        assert response.status == 200
    assert alpha.seen[0].body == b'{"model": "alpha", "prompt": "split"}'


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_backend_is_502_without_its_address(
    start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    port = _closed_port()
    # Pinned, so the route exists although the server never answers a health check...
    gateway = await start_gateway(
        GATEWAY_MODELS=f"alpha=http://127.0.0.1:{port}", GATEWAY_HEALTH_FALL="1000"
    )
    # ... and marked up by hand, as if it had died just after its last passed check.
    replica = gateway.parts.registry.replicas[0]
    gateway.parts.registry.record_pass(replica, [])
    async with client.post(gateway.url + CHAT, data=chat("alpha")) as response:
        assert response.status == 502
        body = await response.read()
    assert_openai_error(body, code="backend_unreachable")
    assert str(port).encode() not in body and b"127.0.0.1" not in body


async def test_backend_silent_past_the_headers_timeout_is_504_without_its_address(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    never = asyncio.Event()
    alpha = await start_fake("alpha", hold_headers=never)
    gateway = await start_gateway(alpha, GATEWAY_HEADERS_TIMEOUT_S="0.2")
    async with client.post(gateway.url + CHAT, data=chat("alpha")) as response:
        assert response.status == 504
        body = await response.read()
    assert_openai_error(body, code="backend_timeout")
    assert str(alpha.port).encode() not in body
    await asyncio.wait_for(alpha.aborted.wait(), 5)


async def test_backend_dying_mid_stream_ends_the_client_stream_abnormally(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gate = asyncio.Event()
    alpha = await start_fake("alpha", gate=gate)
    gateway = await start_gateway(alpha)
    async with client.post(gateway.url + CHAT, data=chat("alpha", stream=True)) as response:
        assert await response.content.readany() == sse_events("alpha", 4)[0]
        await alpha.stop()
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.content.read()
    await asyncio.wait_for(gateway.parts.proxy.inflight.wait_idle(), 5)


async def _client_leaves(gateway_url: str, body: bytes, *, after_first_chunk: bool) -> None:
    """Send a request over a raw socket and close it, as a client that gives up would."""
    reader, writer = await open_raw(gateway_url)
    writer.write(
        b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    await writer.drain()
    if after_first_chunk:
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        await reader.readuntil(b"\n\n")
    writer.close()
    await writer.wait_closed()


async def test_client_leaving_mid_stream_closes_the_upstream_request(
    start_fake: StartFake, start_gateway: StartGateway
) -> None:
    gate = asyncio.Event()
    alpha = await start_fake("alpha", gate=gate)
    gateway = await start_gateway(alpha)
    await _client_leaves(gateway.url, chat("alpha", stream=True), after_first_chunk=True)
    await asyncio.wait_for(alpha.aborted.wait(), 5)
    assert not gate.is_set()
    await asyncio.wait_for(gateway.parts.proxy.inflight.wait_idle(), 5)


async def test_client_leaving_before_the_response_starts_closes_the_upstream_request(
    start_fake: StartFake, start_gateway: StartGateway
) -> None:
    hold = asyncio.Event()
    alpha = await start_fake("alpha", hold_headers=hold)
    gateway = await start_gateway(alpha)
    task = asyncio.create_task(
        _client_leaves(gateway.url, chat("alpha", stream=True), after_first_chunk=False)
    )
    await asyncio.wait_for(alpha.arrived.wait(), 5)
    await task
    await asyncio.wait_for(alpha.aborted.wait(), 5)
    await asyncio.wait_for(gateway.parts.proxy.inflight.wait_idle(), 5)


async def test_client_leaving_a_non_streaming_request_closes_the_upstream_request(
    start_fake: StartFake, start_gateway: StartGateway
) -> None:
    hold = asyncio.Event()
    alpha = await start_fake("alpha", hold_headers=hold)
    gateway = await start_gateway(alpha)
    await _client_leaves(gateway.url, chat("alpha"), after_first_chunk=False)
    await asyncio.wait_for(alpha.aborted.wait(), 5)
    await asyncio.wait_for(gateway.parts.proxy.inflight.wait_idle(), 5)


async def test_hop_by_hop_headers_are_dropped_and_end_to_end_headers_pass(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha)
    headers = {
        "Connection": "keep-alive, X-Conn-Only",
        "X-Conn-Only": "secret",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic abc",
        "X-Request-Id": "req-123",
        "Authorization": "Bearer client-key",
        "Content-Type": "application/json",
    }
    async with client.post(
        gateway.url + CHAT, data=chat("alpha", stream=True), headers=headers
    ) as response:
        assert response.status == 200
        assert response.headers["X-Served-By"] == "alpha"
        assert "Server" not in response.headers
        await response.read()
    seen = {name.lower(): value for name, value in alpha.seen[0].headers.items()}
    assert seen["x-request-id"] == "req-123"
    assert "authorization" not in seen
    assert seen["content-type"] == "application/json"
    for dropped in ("x-conn-only", "keep-alive", "proxy-authorization"):
        assert dropped not in seen
    assert seen["host"] == f"127.0.0.1:{alpha.port}"


async def test_query_string_is_forwarded(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha)
    async with client.post(gateway.url + CHAT + "?trace=1&x=a%20b", data=chat("alpha")) as response:
        assert response.status == 200
    assert alpha.seen[0].query == "trace=1&x=a%20b"


async def test_request_without_an_id_gets_one_that_the_backend_and_client_share(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha)
    ids = []
    for _ in range(2):
        async with client.post(gateway.url + CHAT, data=chat("alpha", stream=True)) as response:
            ids.append(response.headers["X-Request-Id"])
            await response.read()
    assert ids[0] != ids[1]
    assert [seen.headers["X-Request-Id"] for seen in alpha.seen] == ids


async def test_body_trickling_in_past_the_body_timeout_is_408_and_reaches_no_backend(
    start_fake: StartFake, start_gateway: StartGateway
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha, GATEWAY_BODY_TIMEOUT_S="0.3")
    reader, writer = await open_raw(gateway.url)
    body = chat("alpha")
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
    )

    async def trickle() -> None:
        for byte in body:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)  # the client's pace, part of the scenario

    sender = asyncio.create_task(trickle())
    status_line = await reader.readline()
    sender.cancel()
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 408")
    assert alpha.seen == []


async def test_every_answer_has_exactly_one_date_header(
    start_fake: StartFake, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha)
    for method, path, body in (
        ("POST", CHAT, chat("alpha", stream=True)),
        ("POST", CHAT, chat("alpha")),
        ("POST", CHAT, chat("nope")),
        ("GET", "/v1/models", b""),
        ("GET", "/nowhere", b""),
    ):
        async with client.request(method, gateway.url + path, data=body) as response:
            assert len(response.headers.getall("Date")) == 1, (method, path)
            await response.read()


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5",
    ],
)
async def test_content_length_with_transfer_encoding_is_400_and_the_connection_closes(
    framing: bytes, start_fake: StartFake, start_gateway: StartGateway
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha)
    reader, writer = await open_raw(gateway.url)
    body = chat("alpha")
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    # A smuggler's second request rides behind the first on the same connection.
    follower = b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: g\r\nContent-Length: 2\r\n\r\n{}"
    writer.write(
        b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: gateway\r\n" + framing + b"\r\n"
        b"Content-Type: application/json\r\n\r\n" + chunked + follower
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)  # to EOF: the gateway closes
    writer.close()
    head, _, rest = answer.partition(b"\r\n\r\n")
    # Refused by the gateway under hypercorn, by uvicorn's own parser under uvicorn.
    assert head.startswith(b"HTTP/1.1 400")
    assert b"connection: close" in head.lower()
    assert b"HTTP/1.1" not in rest, "a second answer: the follower was read as a request"
    assert alpha.seen == []
