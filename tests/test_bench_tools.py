"""Smoke tests of the benchmark tools in bench/: they count right, not how fast anything is."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench import fake_vllm, hold_streams, loadgen, proc_stats

BENCH = Path(__file__).resolve().parent.parent / "bench"
MODEL = "bench-model"


@pytest.fixture
async def fake() -> AsyncIterator[fake_vllm.FakeVllm]:
    async with await fake_vllm.serve(models=(MODEL,), events=16) as server:
        yield server


async def test_fake_cli_announces_its_port_and_lists_its_model() -> None:
    """The CLI prints its real URL once listening and serves vLLM's /v1/models shape."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(BENCH / "fake_vllm.py"),
        "--port",
        "0",
        "--model",
        MODEL,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        url = line.split(" on ", 1)[1].strip()
        models = await hold_streams.fetch_json(url + "/v1/models")
        assert models["object"] == "list"
        (model,) = models["data"]
        assert model["id"] == model["root"] == MODEL
        assert (model["object"], model["owned_by"], model["parent"]) == ("model", "vllm", None)
        assert model["max_model_len"] > 0
    finally:
        proc.terminate()
        await proc.communicate()


async def test_loadgen_direct_counts_every_event(fake: fake_vllm.FakeVllm) -> None:
    """Concurrency 4 for ~1 s against the fake: no errors, and events = requests x 16."""
    spec = loadgen.LoadSpec(url=fake.url, model=MODEL, concurrency=4, duration_s=1.0)
    summary = await loadgen.run_load(spec)
    assert summary["errors"] == 0, summary["first_error"]
    assert summary["requests_ok"] > 0
    assert summary["events"] == summary["requests_ok"] * 16
    assert fake.stats.streams_completed == summary["requests_ok"]
    assert fake.stats.open_connections == 0


async def test_loadgen_records_one_gap_between_each_pair_of_paced_events(
    fake: fake_vllm.FakeVllm, tmp_path: Path
) -> None:
    """Per-request overrides reach the fake, and the raw samples hold n-1 gaps per stream."""
    spec = loadgen.LoadSpec(
        url=fake.url, model=MODEL, concurrency=2, requests=6, events=3, interval_ms=2.0
    )
    samples = tmp_path / "samples.json"
    summary = await loadgen.run_load(spec, samples_path=str(samples))
    assert summary["errors"] == 0, summary["first_error"]
    raw = json.loads(samples.read_text())
    assert raw["events"] == [3] * 6
    assert len(raw["gap_s"]) == 6 * 2
    assert len(raw["ttft_s"]) == len(raw["total_s"]) == 6


async def test_loadgen_counts_error_statuses(fake: fake_vllm.FakeVllm) -> None:
    """A model the fake does not serve is a 404 per request, and keep-alive survives it."""
    spec = loadgen.LoadSpec(url=fake.url, model="no-such-model", concurrency=1, requests=3)
    summary = await loadgen.run_load(spec)
    assert summary["error_kinds"] == {"status_404": 3}
    assert "does not exist" in summary["first_error"]
    assert fake.stats.connections_total == 1


async def _rechunking_server(body_piece: int) -> asyncio.Server:
    """Answers every request with a 3-event SSE body cut into tiny chunks that split events."""
    sse = b"".join(b'data: {"n": %d}\n\n' % i for i in range(3)) + b"data: [DONE]\n\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"
                    b"content-type: text/event-stream\r\n\r\n"
                )
                for at in range(0, len(sse), body_piece):
                    piece = sse[at : at + body_piece]
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize("piece", [1, 7, 1000])
async def test_loadgen_counts_events_split_across_chunks(piece: int) -> None:
    """Events cut at any byte (a proxy re-chunking the stream) are counted once each."""
    server = await _rechunking_server(piece)
    async with server:
        port = server.sockets[0].getsockname()[1]
        spec = loadgen.LoadSpec(
            url=f"http://127.0.0.1:{port}", model=MODEL, concurrency=1, requests=4, events=3
        )
        summary = await loadgen.run_load(spec)
    assert summary["errors"] == 0, summary["first_error"]
    assert summary["events"] == 12


async def test_hold_mode_sees_every_upstream_stream_aborted(fake: fake_vllm.FakeVllm) -> None:
    """K=20 slow streams open, then all clients close: the fake counts 20 aborted streams."""
    request = loadgen.LoadSpec(
        url=fake.url, model=MODEL, events=10**9, interval_ms=1000.0
    ).request_bytes()
    spec = hold_streams.HoldSpec(
        url=fake.url, request=request, streams=20, hold_s=0.0, stats_url=fake.url + "/stats"
    )
    report = await hold_streams.run_hold(spec)
    assert report["errors"] == 0, report["first_error"]
    assert report["opened"] == 20
    assert report["upstream_aborted"] == 20
    assert report["upstream_active_streams_after"] == 0
    assert fake.stats.streams_aborted == 20


async def test_proc_stats_sums_cpu_over_a_process_tree() -> None:
    """A parent that only waits still shows CPU: its busy child is counted in its tree."""
    parent = (
        "import subprocess, sys; "
        "child = subprocess.Popen([sys.executable, '-c', 'while True: pass']); "
        "print(child.pid, flush=True); child.wait()"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", parent, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    child = int(await asyncio.wait_for(proc.stdout.readline(), 20))
    try:
        first = proc_stats.sample(proc.pid)
        assert child in first.pids
        later = first
        while proc_stats.cpu_seconds(first, later) <= 0:  # ordered by the child's progress
            await asyncio.sleep(0.01)
            later = proc_stats.sample(proc.pid)
        assert later.rss_bytes > 0 and later.fds > 0
        assert proc_stats.cpu_share(first, later) > 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        proc.kill()
        await proc.communicate()  # drains the pipe too: uvloop warns about an unread one


def test_no_bench_module_shadows_the_standard_library() -> None:
    """bench/ scripts run with bench/ first on sys.path: a bench/profile.py once hid the
    stdlib `profile` from torch inside `python bench/tiny_models.py`, failing every e2e test."""
    names = {path.stem for path in BENCH.glob("*.py")}
    assert not names & set(sys.stdlib_module_names)
