"""The load generator's hold mode: open K slow streams, hold them, close every client at once.

While the streams are held, the watched processes' RSS gives memory per stream; after the
close, polling the fake vLLM's ``/stats`` times how fast the proxy in between closed its
upstream streams (``streams_aborted`` and ``last_abort_unix``, a wall clock that both processes
share).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

try:
    from bench import proc_stats
    from bench.sse_client import (
        Client,
        Driver,
        Recorder,
        percentiles,
        raise_nofile_limit,
        watch,
    )
except ImportError:  # run as a script: bench/ itself is sys.path[0]
    import proc_stats  # type: ignore[import-not-found, no-redef]
    from sse_client import (  # type: ignore[import-not-found, no-redef]
        Client,
        Driver,
        Recorder,
        percentiles,
        raise_nofile_limit,
        watch,
    )

_now = time.perf_counter


@dataclass(frozen=True)
class HoldSpec:
    url: str  # where the streams go: the gateway, or the fake itself
    request: bytes  # one whole HTTP request asking for a slow, long stream
    streams: int
    hold_s: float
    stats_url: str | None  # the fake's /stats; None skips the upstream-close timing
    connect_parallel: int = 256  # a SYN flood would overflow the server's accept backlog
    open_timeout_s: float = 60.0
    close_timeout_s: float = 30.0
    progress: bool = False


class _HoldDriver(Driver):
    """Open streams stay open: a stream that ends before we close it is an error."""

    def __init__(self, rec: Recorder, request: bytes, streams: int, timeout_s: float) -> None:
        super().__init__(rec, request, expected_events=None, timeout_s=timeout_s)
        self.hold, self.want = True, streams
        self.opened = self.failed = 0
        self.closing = False
        self.all_open = asyncio.Event()

    def settle(self, *, opened: bool) -> None:
        if opened:
            self.opened += 1
        else:
            self.failed += 1
        if self.opened + self.failed >= self.want:
            self.all_open.set()

    def on_connected(self, conn: Client) -> None:
        super().on_connected(conn)
        conn.send(self.request)

    def on_first(self, conn: Client) -> None:
        self.rec.ttft.append(conn.t_first - conn.t_send)
        self.settle(opened=True)

    def on_done(self, conn: Client, done: bool, now: float) -> None:
        kind = f"status_{conn.status}" if conn.status != 200 else "ended_early"
        self.rec.error(kind, conn.err_body.decode(errors="replace") or f"after {conn.n} events")
        if not conn.t_first:
            self.settle(opened=False)
        cast(asyncio.Transport, conn.transport).close()

    def on_lost(self, conn: Client, kind: str, detail: str) -> None:
        if not self.closing:
            super().on_lost(conn, kind, detail)
            if not conn.t_first:
                self.settle(opened=False)


async def fetch_json(url: str, *, method: str = "GET", timeout_s: float = 5.0) -> Any:
    """One request on a fresh connection (for the fake's small Content-Length JSON bodies)."""
    parts = urlsplit(url)
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        try:
            writer.write(
                f"{method} {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                f"Connection: close\r\nContent-Length: 0\r\n\r\n".encode()
            )
            data = await reader.read()
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        status_line = head.split(b"\r\n", 1)[0]
        raise OSError(f"{url} answered {status_line!r}")
    return json.loads(body)


async def _stats_or_none(url: str | None) -> dict[str, Any] | None:
    if not url:
        return None
    try:
        return cast(dict[str, Any], await fetch_json(url))
    except (OSError, ValueError, TimeoutError):
        return None


async def _await_upstream_aborts(
    url: str | None, base: dict[str, Any] | None, count: int, closed_at: float, timeout_s: float
) -> dict[str, Any]:
    """Poll the fake until it has seen ``count`` more aborted streams than in ``base``;
    ``closed_at`` is the wall clock (``time.time()``) when the clients closed."""
    if not url or base is None:
        return {"upstream": f"no fake /stats at {url}"}
    start, stats = _now(), base
    target = base["streams_aborted"] + count
    while stats["streams_aborted"] < target and _now() - start < timeout_s:
        await asyncio.sleep(0.005)
        stats = await _stats_or_none(url) or stats
    aborted = stats["streams_aborted"] - base["streams_aborted"]
    last = stats["last_abort_unix"] - closed_at if aborted else None
    return {
        "upstream_aborted": aborted,
        "upstream_all_closed_s": round(_now() - start, 4) if aborted >= count else None,
        "upstream_last_abort_s": None if last is None else round(last, 4),
        "upstream_active_streams_after": stats["active_streams"],
    }


async def run_hold(spec: HoldSpec, *, pids: Sequence[int] = ()) -> dict[str, Any]:
    """Open the streams, hold them, close all clients at once, and summarise."""
    raise_nofile_limit()
    parts = urlsplit(spec.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    meter = proc_stats.Meter(pids)
    rec = Recorder()
    driver = _HoldDriver(rec, spec.request, spec.streams, spec.open_timeout_s)
    gate = asyncio.Semaphore(spec.connect_parallel)

    async def connect() -> None:
        async with gate:
            try:
                await loop.create_connection(lambda: Client(driver), host, port)
            except OSError as exc:
                rec.error("connect", repr(exc))
                driver.settle(opened=False)

    def label(elapsed: float) -> str:
        events = sum(c.n for c in driver.conns)
        opened = f"{driver.opened}/{spec.streams}"
        return f"[{elapsed:6.1f}s] open {opened} events {events} errors {rec.error_count}"

    monitor = asyncio.create_task(watch(driver, label, spec.progress))
    try:
        connecting = asyncio.gather(*(connect() for _ in range(spec.streams)))
        try:
            await asyncio.wait_for(driver.all_open.wait(), spec.open_timeout_s)
        except TimeoutError:
            rec.error("open_timeout", f"{driver.opened}/{spec.streams} open in time")
        await connecting
        open_s = _now() - rec.t0
        held = {pid: proc_stats.sample(pid) for pid in meter.pids}
        await asyncio.sleep(spec.hold_s)
        events_held = sum(c.n for c in driver.conns)
        base = await _stats_or_none(spec.stats_url)
        driver.closing = True
        closed_at_unix, closed_at = time.time(), _now()
        conns = list(driver.conns)
        for conn in conns:
            cast(asyncio.Transport, conn.transport).close()
        close_call_s = _now() - closed_at
        upstream = await _await_upstream_aborts(
            spec.stats_url, base, driver.opened, closed_at_unix, spec.close_timeout_s
        )
        await asyncio.gather(*(c.closed for c in conns))
    finally:
        monitor.cancel()
        if spec.progress:
            sys.stderr.write("\n")
    report = meter.report()
    for proc in report["processes"]:
        rss = held[proc["pid"]].rss_bytes
        proc["rss_mib_held"] = round(rss / 2**20, 2)
        per_stream = (rss - meter.before[proc["pid"]].rss_bytes) / max(driver.opened, 1)
        proc["rss_kib_per_stream"] = round(per_stream / 1024, 2)
    return {
        "mode": "hold",
        "url": spec.url,
        "streams": spec.streams,
        "opened": driver.opened,
        "open_s": round(open_s, 3),
        "ttft_ms": percentiles(rec.ttft),
        "hold_s": spec.hold_s,
        "events_held": events_held,
        "errors": rec.error_count,
        "error_kinds": rec.errors,
        "first_error": rec.first_error,
        "client_close_call_s": round(close_call_s, 4),
        **upstream,
        **report,
    }
