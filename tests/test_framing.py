"""Requests whose body length is ambiguous (Content-Length and Transfer-Encoding): refused."""

from __future__ import annotations

import asyncio

from tests.conftest import StartFake, StartGateway, open_raw
from tests.test_proxy import CHAT, chat


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := await reader.read(65536):
        data += chunk
    return data


async def test_content_length_with_transfer_encoding_is_400_and_the_connection_closes(
    start_fake: StartFake, start_gateway: StartGateway
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha)
    reader, writer = await open_raw(gateway.url)
    body = chat("alpha")
    # A front proxy going by Content-Length would take what follows the first 4 bytes of
    # the body for a request of its own: here, a second POST smuggled in behind it.
    smuggled = (
        b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: gw\r\nContent-Length: "
        + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip
    writer.write(
        b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n" + smuggled
    )  # fmt: skip
    await writer.drain()
    answer = await asyncio.wait_for(read_until_closed(reader), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert answer.count(b"HTTP/1.1 ") == 1, "the request behind it was not answered"
    assert alpha.seen == []
