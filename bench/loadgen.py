"""A lean load generator for OpenAI-style SSE streams (one process, raw asyncio Protocols).

Each connection is a Protocol that parses the HTTP/1.1 response itself (chunked or
Content-Length), counts SSE events by their blank-line terminators and sends the next request
from ``data_received`` the moment the previous response ends: no task switch and no aiohttp on
the hot path, so one core drives thousands of streams a second.

* load mode: C keep-alive connections issue streams back to back for a duration or a count;
  reports TTFT, inter-event gaps, totals, req/s, events/s, errors and stalls.
* hold mode (``--open-streams K``): open K slow streams, hold them, close every client at once
  and poll the fake's ``/stats`` to time how fast the proxy in between closes its upstreams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

try:
    from bench import proc_stats
except ImportError:  # run as a script: bench/ itself is sys.path[0]
    import proc_stats  # type: ignore[import-not-found, no-redef]

_now = time.perf_counter
_DONE_TAIL = b"[DONE]\n\n"


@dataclass(frozen=True)
class LoadSpec:
    """What to send. ``events``/``interval_ms`` go in the body as the fake's per-request
    overrides (a proxy forwards the body untouched); ``events`` is then also the count every
    stream must carry."""

    url: str
    model: str
    endpoint: str = "/v1/chat/completions"
    concurrency: int = 16
    duration_s: float = 10.0
    requests: int = 0  # 0: no count limit, run for duration_s
    events: int | None = None
    interval_ms: float | None = None
    stall_ms: float | None = None  # default: 5 x interval_ms, or 50 ms for bursts
    timeout_s: float = 60.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    progress: bool = False

    def stall_threshold_s(self) -> float:
        if self.stall_ms is not None:
            return self.stall_ms / 1000
        return 5 * self.interval_ms / 1000 if self.interval_ms else 0.05

    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"only http://host:port URLs are supported, got {self.url!r}")
        return parts.hostname, parts.port or 80

    def request_bytes(self) -> bytes:
        body: dict[str, Any] = {"model": self.model, "stream": True, "max_tokens": 16}
        if self.endpoint.endswith("/chat/completions"):
            body["messages"] = [{"role": "user", "content": "Say hello."}]
        else:
            body["prompt"] = "Say hello."
        if self.events is not None:
            body["fake_events"] = body["max_tokens"] = self.events
        if self.interval_ms is not None:
            body["fake_interval_ms"] = self.interval_ms
        body.update(self.extra_body)
        data = json.dumps(body, separators=(",", ":")).encode()
        host = urlsplit(self.url).netloc
        return (f"POST {self.endpoint} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                ).encode() + data


class Recorder:
    """Samples of finished requests; times are in seconds, offsets from the run's start."""

    __slots__ = ("errors", "events", "events_total", "first_error", "gaps", "ok", "starts",
                 "t0", "total", "ttft")

    def __init__(self) -> None:
        self.t0 = _now()
        self.starts, self.ttft, self.total = array("d"), array("d"), array("d")
        self.events, self.gaps = array("l"), array("d")
        self.ok = self.events_total = 0
        self.errors: dict[str, int] = {}
        self.first_error = ""

    def error(self, kind: str, detail: str = "") -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if not self.first_error:
            self.first_error = f"{kind}: {detail}"[:300]

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def __repr__(self) -> str:
        return f"<Recorder [{self.ok} ok, {self.error_count} errors, {self.events_total} events]>"


class Client(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    __slots__ = ("chunked", "closed", "driver", "err_body", "gaps", "head", "in_flight",
                 "keep_alive", "left", "n", "pending", "status", "t_first", "t_last", "t_send",
                 "tail", "transport")

    def __init__(self, driver: _Driver) -> None:
        self.driver = driver
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.in_flight = False
        self.keep_alive = True
        self.t_send = self.t_first = self.t_last = 0.0
        self.gaps: list[float] = []

    def send(self, request: bytes) -> None:
        self.in_flight, self.head, self.status = True, bytearray(), 0
        self.left, self.chunked, self.pending = 0, False, b""
        self.t_first = self.t_last = 0.0
        self.n, self.gaps, self.tail, self.err_body = 0, [], b"", b""
        self.t_send = _now()
        cast(asyncio.Transport, self.transport).write(request)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport
        self.driver.on_connected(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.in_flight:
            self.in_flight = False
            if self.status and self.left == -3:  # body delimited by close: this is its end
                self._complete(_now())
            else:
                self.driver.on_lost(self, "truncated" if self.status == 200 else "disconnect",
                                    repr(exc))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        now = _now()
        if not self.in_flight:
            return  # bytes after a timeout abort, or a server talking out of turn
        if not self.status:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            data = bytes(self.head[end + 4:])
            self._parse_head(bytes(self.head[:end]))
        if self._feed(data, now):
            self._complete(now)

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.status = int(lines[0][9:12])
        self.keep_alive = lines[0].startswith(b"HTTP/1.1")
        length = -3  # no framing header: the body runs until the server closes
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value:
                self.chunked, length = True, 0
            elif name == b"content-length" and not self.chunked:
                length = int(value)
            elif name == b"connection":
                self.keep_alive = value == b"keep-alive" or (self.keep_alive and value != b"close")
        if self.status in (204, 304):
            length = 0
        if length == -3:
            self.keep_alive = False
        self.left = length

    def _feed(self, data: bytes, now: float) -> bool:
        """Consume body bytes; True once the response is complete."""
        if not self.chunked:
            if self.left == -3:
                self._payload(data, now)
                return False
            take = data[:self.left]
            if take:
                self._payload(take, now)
            self.left -= len(take)
            return self.left == 0
        # Chunked: left > 0 bytes of chunk data due; 0 a size line; -1 the CRLF after data;
        # -2 the trailer section after the last chunk. The payload of one read is handled
        # as one piece: its events all arrived at the same instant anyway.
        if self.pending:
            data, self.pending = self.pending + data, b""
        pos, end, parts, complete = 0, len(data), [], False
        while pos < end:
            left = self.left
            if left > 0:
                stop = min(pos + left, end)
                parts.append(data[pos:stop])
                left -= stop - pos
                pos = stop
                if end - pos >= 2 and not left:
                    pos, left = pos + 2, 0
                    self.left = 0
                else:
                    self.left = left or -1
            elif left == 0:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    break
                try:
                    size = int(data[pos:eol], 16)
                except ValueError:  # a chunk extension: "1a;name=value"
                    size = int(data[pos:eol].split(b";", 1)[0], 16)
                pos, self.left = eol + 2, size or -2
            elif left == -1:
                if end - pos < 2:
                    break
                pos, self.left = pos + 2, 0
            else:
                complete = data.startswith(b"\r\n", pos) or data.find(b"\r\n\r\n", pos) >= 0
                break
        if parts:
            self._payload(parts[0] if len(parts) == 1 else b"".join(parts), now)
        if not complete:
            self.pending = data[pos:]
        return complete

    def _payload(self, chunk: bytes, now: float) -> None:
        if self.status != 200:
            self.err_body = (self.err_body + chunk)[:300]
            return
        if not self.t_first and b"data:" in chunk:
            self.t_first = now
            self.driver.on_first(self)
        # An event ends with a blank line; one split across two reads is caught by the tail.
        k = chunk.count(b"\n\n") + (chunk[:1] == b"\n" and self.tail[-1:] == b"\n"
                                    and self.tail[-2:] != b"\n\n")
        if k:
            # Events that arrive in one read are 0 s apart: that is what the client saw.
            if self.t_last:
                self.gaps.append(now - self.t_last)
            if k > 1:
                self.gaps += [0.0] * (k - 1)
            self.n += k
            self.t_last = now
        self.tail = (self.tail + chunk)[-16:]

    def _complete(self, now: float) -> None:
        self.in_flight = False
        done = self.tail.endswith(_DONE_TAIL)
        if done:
            self.n -= 1
            if self.gaps:
                self.gaps.pop()  # the gap before [DONE] is not a token gap
        self.driver.on_done(self, done, now)


class _Driver:
    """Decides what each connection does next and records what it got."""

    def __init__(self, spec: LoadSpec, rec: Recorder) -> None:
        self.spec, self.rec = spec, rec
        self.hold = False  # held streams are open on purpose: the timeout spares them
        self.request = spec.request_bytes()
        self.conns: set[Client] = set()

    def on_connected(self, conn: Client) -> None:
        self.conns.add(conn)

    def on_first(self, conn: Client) -> None:
        pass

    def on_done(self, conn: Client, done: bool, now: float) -> None:
        rec = self.rec
        if conn.status != 200:
            rec.error(f"status_{conn.status}", conn.err_body.decode(errors="replace"))
            return
        rec.events_total += conn.n
        expected = self.spec.events
        if not done:
            rec.error("truncated", f"no [DONE] after {conn.n} events")
        elif expected is not None and conn.n != expected:
            rec.error("event_count", f"{conn.n} events, expected {expected}")
        else:
            rec.ok += 1
            rec.starts.append(conn.t_send - rec.t0)
            rec.ttft.append(conn.t_first - conn.t_send)
            rec.total.append(now - conn.t_send)
            rec.events.append(conn.n)
            rec.gaps.extend(conn.gaps)

    def on_lost(self, conn: Client, kind: str, detail: str) -> None:
        self.rec.error(kind, detail)

    def sweep(self, now: float) -> None:
        """Abort requests older than the timeout (called about 4 times a second)."""
        for conn in list(self.conns):
            if conn.closed.done():
                self.conns.discard(conn)
            elif (conn.in_flight and now - conn.t_send > self.spec.timeout_s
                  and not (self.hold and conn.t_first)):
                conn.in_flight = False
                self.rec.error("timeout", f"no complete response in {self.spec.timeout_s}s")
                cast(asyncio.Transport, conn.transport).abort()


class _LoadDriver(_Driver):
    def __init__(self, spec: LoadSpec, rec: Recorder) -> None:
        super().__init__(spec, rec)
        self.issued = 0
        self.budget = spec.requests or sys.maxsize
        self.deadline = rec.t0 + spec.duration_s if not spec.requests else float("inf")

    def want_more(self) -> bool:
        return self.issued < self.budget and _now() < self.deadline

    def _next(self, conn: Client) -> None:
        if conn.keep_alive and self.want_more():
            self.issued += 1
            conn.send(self.request)
        else:
            cast(asyncio.Transport, conn.transport).close()

    def on_connected(self, conn: Client) -> None:
        super().on_connected(conn)
        self._next(conn)

    def on_done(self, conn: Client, done: bool, now: float) -> None:
        super().on_done(conn, done, now)
        self._next(conn)


def percentiles(values: Sequence[float], scale: float = 1000.0) -> dict[str, float]:
    """p50/p90/p99/max/mean (nearest rank), scaled (default: seconds to ms)."""
    if not values:
        return {}
    s = sorted(values)

    def rank(p: float) -> float:
        return round(s[min(len(s) - 1, int(p * len(s)))] * scale, 3)

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": round(s[-1] * scale, 3),
            "mean": round(sum(s) / len(s) * scale, 3)}


def raise_nofile_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard one: thousands of streams need the fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class _Meter:
    """Own CPU and the watched process trees, sampled at the start and the end of a phase."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.cpu0, self.wall0 = time.process_time(), _now()
        self.before = {pid: proc_stats.sample(pid) for pid in self.pids}

    def report(self) -> dict[str, Any]:
        cpu, wall = time.process_time() - self.cpu0, _now() - self.wall0
        return {"loadgen_cpu_s": round(cpu, 3), "loadgen_cpu_cores": round(cpu / wall, 3),
                "processes": [proc_stats.describe(self.before[p], proc_stats.sample(p))
                              for p in self.pids]}


async def _monitor(driver: _Driver, label: Callable[[float], str], progress: bool) -> None:
    last = 0.0
    while True:
        await asyncio.sleep(0.25)
        now = _now()
        driver.sweep(now)
        if progress and now - last >= 1.0:
            last = now
            sys.stderr.write(f"\r{label(now - driver.rec.t0):<79}")
            sys.stderr.flush()


def _write_samples(rec: Recorder, path: str) -> None:
    with open(path, "w") as f:
        json.dump({"start_s": list(rec.starts), "ttft_s": list(rec.ttft),
                   "total_s": list(rec.total), "events": list(rec.events),
                   "gap_s": list(rec.gaps)}, f)


async def run_load(spec: LoadSpec, *, pids: Sequence[int] = (), samples_path: str | None = None
                   ) -> dict[str, Any]:
    """Run load mode and return the JSON summary."""
    raise_nofile_limit()
    host, port = spec.host_port()
    loop = asyncio.get_running_loop()
    meter = _Meter(pids)
    rec = Recorder()
    driver = _LoadDriver(spec, rec)

    async def slot() -> None:
        while driver.want_more():
            try:
                _, conn = await loop.create_connection(lambda: Client(driver), host, port)
            except OSError as exc:
                rec.error("connect", repr(exc))
                await asyncio.sleep(0.05)  # back off instead of spinning on a refused port
                continue
            await conn.closed

    def label(elapsed: float) -> str:
        goal = f"/{spec.requests} req" if spec.requests else f"/{spec.duration_s:.0f}s"
        return (f"[{elapsed:6.1f}s{goal}] {rec.ok} ok {rec.ok / elapsed:8.0f} req/s "
                f"{rec.events_total / elapsed:9.0f} ev/s  errors {rec.error_count}")

    monitor = asyncio.create_task(_monitor(driver, label, spec.progress))
    try:
        await asyncio.gather(*(slot() for _ in range(spec.concurrency)))
    finally:
        monitor.cancel()
        if spec.progress:
            sys.stderr.write("\n")
    elapsed = _now() - rec.t0
    stall = spec.stall_threshold_s()
    summary = {
        "mode": "load", "url": spec.url, "model": spec.model, "endpoint": spec.endpoint,
        "concurrency": spec.concurrency, "elapsed_s": round(elapsed, 3),
        "requests": rec.ok + rec.error_count, "requests_ok": rec.ok,
        "req_per_s": round(rec.ok / elapsed, 1), "events": rec.events_total,
        "events_per_s": round(rec.events_total / elapsed, 1),
        "errors": rec.error_count, "error_kinds": rec.errors, "first_error": rec.first_error,
        "ttft_ms": percentiles(rec.ttft), "gap_ms": percentiles(rec.gaps),
        "total_ms": percentiles(rec.total), "stall_threshold_ms": round(stall * 1000, 3),
        "stalls": sum(1 for g in rec.gaps if g > stall), **meter.report()}
    if samples_path:
        await asyncio.to_thread(_write_samples, rec, samples_path)
    return summary


class _HoldDriver(_Driver):
    """Open streams stay open: a stream that ends before we close it is an error."""

    def __init__(self, spec: LoadSpec, rec: Recorder, streams: int) -> None:
        super().__init__(spec, rec)
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
            writer.write(f"{method} {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                         f"Connection: close\r\nContent-Length: 0\r\n\r\n".encode())
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


async def _await_upstream_aborts(url: str | None, base: dict[str, Any] | None, count: int,
                                 closed_at_unix: float, timeout_s: float) -> dict[str, Any]:
    """Poll the fake until it has seen ``count`` more aborted streams than in ``base``."""
    if not url or base is None:
        return {"upstream": "no /stats at --stats-url"}
    start, stats = _now(), base
    target = base["streams_aborted"] + count
    while stats["streams_aborted"] < target and _now() - start < timeout_s:
        await asyncio.sleep(0.005)
        stats = await _stats_or_none(url) or stats
    aborted = stats["streams_aborted"] - base["streams_aborted"]
    return {"upstream_aborted": aborted,
            "upstream_all_closed_s": round(_now() - start, 4) if aborted >= count else None,
            "upstream_last_abort_s": round(stats["last_abort_unix"] - closed_at_unix, 4)
            if aborted else None,
            "upstream_active_streams_after": stats["active_streams"]}


async def run_hold(spec: LoadSpec, *, streams: int, hold_s: float, stats_url: str | None,
                   pids: Sequence[int] = (), connect_parallel: int = 256,
                   open_timeout_s: float = 60.0) -> dict[str, Any]:
    """Open ``streams`` streams, hold them ``hold_s``, close all clients at once; summarise."""
    raise_nofile_limit()
    host, port = spec.host_port()
    loop = asyncio.get_running_loop()
    meter = _Meter(pids)
    rec = Recorder()
    driver = _HoldDriver(spec, rec, streams)
    gate = asyncio.Semaphore(connect_parallel)  # a SYN flood would overflow the accept backlog

    async def connect() -> None:
        async with gate:
            try:
                await loop.create_connection(lambda: Client(driver), host, port)
            except OSError as exc:
                rec.error("connect", repr(exc))
                driver.settle(opened=False)

    def label(elapsed: float) -> str:
        return (f"[{elapsed:6.1f}s] open {driver.opened}/{streams} "
                f"events {sum(c.n for c in driver.conns)} errors {rec.error_count}")

    monitor = asyncio.create_task(_monitor(driver, label, spec.progress))
    try:
        connecting = asyncio.gather(*(connect() for _ in range(streams)))
        try:
            await asyncio.wait_for(driver.all_open.wait(), open_timeout_s)
        except TimeoutError:
            rec.error("open_timeout", f"{driver.opened}/{streams} open after {open_timeout_s}s")
        await connecting
        open_s = _now() - rec.t0
        held = {pid: proc_stats.sample(pid) for pid in meter.pids}
        await asyncio.sleep(hold_s)
        events_held = sum(c.n for c in driver.conns)
        base = await _stats_or_none(stats_url)
        driver.closing = True
        closed_at_unix, closed_at = time.time(), _now()
        conns = list(driver.conns)
        for conn in conns:
            cast(asyncio.Transport, conn.transport).close()
        close_call_s = _now() - closed_at
        upstream = await _await_upstream_aborts(stats_url, base, driver.opened, closed_at_unix,
                                                spec.timeout_s)
        await asyncio.gather(*(c.closed for c in conns))
    finally:
        monitor.cancel()
        if spec.progress:
            sys.stderr.write("\n")
    report = meter.report()
    for proc in report["processes"]:
        rss = held[proc["pid"]].rss_bytes
        proc["rss_mib_held"] = round(rss / 2**20, 2)
        per = (rss - meter.before[proc["pid"]].rss_bytes) / max(driver.opened, 1)
        proc["rss_kib_per_stream"] = round(per / 1024, 2)
    return {"mode": "hold", "url": spec.url, "model": spec.model, "streams": streams,
            "opened": driver.opened, "open_s": round(open_s, 3), "ttft_ms": percentiles(rec.ttft),
            "hold_s": hold_s, "events_held": events_held, "errors": rec.error_count,
            "error_kinds": rec.errors, "first_error": rec.first_error,
            "client_close_call_s": round(close_call_s, 4), **upstream, **report}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="gateway or fake base URL, http://host:port")
    p.add_argument("--model", required=True)
    p.add_argument("--endpoint", default="chat", help="chat, completions, or a path")
    p.add_argument("-c", "--concurrency", type=int, default=16)
    p.add_argument("-d", "--duration", type=float, default=10.0, help="seconds (load mode)")
    p.add_argument("-n", "--requests", type=int, default=0, help="stop after N (overrides -d)")
    p.add_argument("--events", type=int, help="fake_events per stream, also checked")
    p.add_argument("--interval-ms", type=float, help="fake_interval_ms between events")
    p.add_argument("--stall-ms", type=float, help="gap counted as a stall (5 x interval)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request seconds")
    p.add_argument("--body-extra", default="{}", help="JSON object merged into every body")
    p.add_argument("--samples", help="write raw per-request samples (JSON) to this file")
    p.add_argument("--pid", type=int, action="append", default=[],
                   help="measure CPU/RSS/fds of this process tree (repeatable)")
    p.add_argument("--out", help="also write the JSON summary to this file")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--open-streams", type=int, default=0, metavar="K", help="hold mode")
    p.add_argument("--hold", type=float, default=5.0, help="seconds to hold (hold mode)")
    p.add_argument("--stats-url", help="fake's /stats (hold mode; default URL/stats)")
    p.add_argument("--connect-parallel", type=int, default=256)
    p.add_argument("--no-uvloop", action="store_true")
    return p.parse_args(argv)


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    endpoint = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}.get(
        args.endpoint, args.endpoint)
    hold = args.open_streams > 0
    if hold:  # slow endless streams unless told otherwise
        args.events = 10**9 if args.events is None else args.events
        args.interval_ms = 1000.0 if args.interval_ms is None else args.interval_ms
    long_run = args.hold > 3 if hold else (not args.requests and args.duration > 3)
    spec = LoadSpec(url=args.url.rstrip("/"), model=args.model, endpoint=endpoint,
                    concurrency=args.concurrency, duration_s=args.duration,
                    requests=args.requests, events=args.events, interval_ms=args.interval_ms,
                    stall_ms=args.stall_ms, timeout_s=args.timeout,
                    extra_body=json.loads(args.body_extra),
                    progress=args.progress == "on" or (args.progress == "auto" and long_run))
    if hold:
        return await run_hold(spec, streams=args.open_streams, hold_s=args.hold,
                              stats_url=args.stats_url or spec.url + "/stats", pids=args.pid,
                              connect_parallel=args.connect_parallel)
    return await run_load(spec, pids=args.pid, samples_path=args.samples)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if not args.no_uvloop:
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            print("uvloop not installed, using the default loop", file=sys.stderr)
    with asyncio.Runner(loop_factory=factory) as runner:
        summary = runner.run(_main(args))
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    sys.exit(1 if summary["errors"] else 0)


if __name__ == "__main__":
    main()
