"""The access log: one line per request when it ends, in text and in JSON, cut-off streams too."""

from __future__ import annotations

import asyncio
import os
import re
import time

import aiohttp
import orjson
import pytest

from gateway.accesslog import Renderer
from gateway.logs import LineWriter
from gateway.observe import RequestRecord
from tests.conftest import RunningGateway, StartFake, StartGateway
from tests.test_proxy import CHAT, chat

TRACE = "0af7651916cd43dd8448eb211c80319c"
TEXT_LINE = re.compile(r"^\S+ INFO gateway\.access: (.*)$")
TOKEN = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse(line: str, form: str) -> dict[str, object]:
    if form == "json":
        document = orjson.loads(line)
        assert document["logger"] == "gateway.access" and document["level"] == "info"
        return dict(document)
    match = TEXT_LINE.match(line)
    assert match, line
    fields: dict[str, object] = {}
    for name, raw in TOKEN.findall(match[1]):
        fields[name] = orjson.loads(raw) if raw.startswith('"') else raw
    return fields


async def access_lines(
    gateway: RunningGateway, capfd: pytest.CaptureFixture[str], form: str
) -> list[dict[str, object]]:
    # Every request has ended (its line is queued before the in-flight count drops), then the
    # writer's queue goes out now rather than at its next tick.
    await gateway.parts.proxy.inflight.wait_idle()
    gateway.parts.writer.flush()
    out = capfd.readouterr().out
    return [parse(line, form) for line in out.splitlines() if "gateway.access" in line]


@pytest.mark.parametrize("form", ["text", "json"])
async def test_one_line_per_request_for_a_stream_a_dropped_stream_and_a_404(
    form: str,
    capfd: pytest.CaptureFixture[str],
    start_fake: StartFake,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
) -> None:
    alpha = await start_fake("alpha")
    gateway = await start_gateway(alpha, GATEWAY_ACCESS_LOG="on", GATEWAY_LOG_FORMAT=form)
    headers = {
        "traceparent": f"00-{TRACE}-b7ad6b7169203331-01",
        "Authorization": "Bearer secret-token",
        "X-Request-Id": "req-1",
    }
    async with client.post(
        gateway.url + CHAT, data=chat("alpha", stream=True), headers=headers
    ) as response:
        body = await response.read()

    alpha.gate = asyncio.Event()
    async with client.post(gateway.url + CHAT, data=chat("alpha", stream=True)) as response:
        await response.content.readuntil(b"\n\n")
    await asyncio.wait_for(alpha.aborted.wait(), 5)

    async with client.post(gateway.url + CHAT, data=chat("nope")) as response:
        assert response.status == 404

    lines = await access_lines(gateway, capfd, form)
    assert len(lines) == 3, lines
    done, dropped, missing = lines
    assert done["request_id"] == "req-1" and done["trace_id"] == TRACE
    assert done["method"] == "POST" and done["path"] == CHAT and done["model"] == "alpha"
    assert str(done["stream"]) in ("true", "True") and done["replica"] == alpha.url
    assert str(done["status"]) == "200" and done["outcome"] == "ok"
    assert str(done["attempts"]) == "1"
    assert int(str(done["bytes_out"])) == len(body) and int(str(done["bytes_in"])) > 0
    assert float(str(done["ttfb_ms"])) <= float(str(done["duration_ms"]))
    assert str(done["client"]).startswith("127.0.0.1:")
    assert dropped["outcome"] == "client_closed" and str(dropped["status"]) == "200"
    assert int(str(dropped["bytes_out"])) > 0
    assert str(missing["status"]) == "404" and missing["outcome"] == "rejected"
    assert missing["model"] == "nope" and missing["replica"] in ("-", "")
    for line in lines:
        assert "secret-token" not in str(line) and "messages" not in str(line)


def test_a_crafted_model_name_cannot_forge_a_text_line() -> None:
    record = RequestRecord("POST", CHAT, ("127.0.0.1", 1), time.monotonic())
    record.model = 'x\nINFO gateway.access: status=200 "'
    record.ended = record.started
    line = Renderer("text").text(record)
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    fields = parse(line.decode().rstrip("\n"), "text")
    assert fields["model"] == record.model


def test_a_stuck_output_drops_and_counts_lines_past_the_cap_and_never_blocks() -> None:
    read_end, write_end = os.pipe()
    writer = LineWriter(cap=4)
    try:
        # A line larger than the pipe holds: the writer's thread blocks on it, as on a
        # stalled log reader. The first byte arriving says the thread took it.
        writer.put(write_end, bytes, b"x" * (4 * 1024 * 1024))
        assert os.read(read_end, 1) == b"x"
        for _ in range(10):
            writer.put(write_end, bytes, b"line\n")  # returns at once: the caller never waits
        assert writer.dropped == 6
        assert repr(writer) == "<LineWriter [4 queued, 6 dropped]>"
    finally:
        os.close(read_end)  # the blocked write fails, and the thread can stop
        writer.close()
        os.close(write_end)


@pytest.mark.parametrize("quiet_polls", [0, 1000])
def test_lines_reach_the_output_whether_the_writer_is_awake_or_asleep(quiet_polls: int) -> None:
    read_end, write_end = os.pipe()
    # 0: the writer goes to sleep whenever its queue is empty, so every line must wake it;
    # 1000: it stays awake, polling, for the whole test.
    writer = LineWriter(quiet_polls=quiet_polls)
    try:
        for index in range(6):
            line = f"line {index}\n".encode()
            writer.put(write_end, bytes, line)
            assert os.read(read_end, 64) == line
    finally:
        writer.close()
        os.close(read_end)
        os.close(write_end)
