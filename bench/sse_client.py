"""The hot path of the load generator: an HTTP/1.1 client Protocol that reads SSE streams.

A ``Client`` is one keep-alive connection carrying one request at a time. It parses the
response itself (chunked or Content-Length), counts SSE events by their blank-line terminators
and hands each finished response to its ``Driver``, which may send the next request right there
in ``data_received``: no task switch and no aiohttp, so one core drives thousands of streams a
second. Times come from ``time.perf_counter`` (uvloop's ``loop.time()`` ticks in whole ms).
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from typing import cast

_now = time.perf_counter
_DONE_TAIL = b"[DONE]\n\n"


def parse_head(head: bytes) -> tuple[int, bool, int, bool]:
    """(status, chunked, body length, keep-alive) of a response head; a length of 0 with
    chunked means "read chunks", -3 means "until the server closes"."""
    lines = head.split(b"\r\n")
    status, chunked, length = int(lines[0][9:12]), False, -3
    keep_alive = lines[0].startswith(b"HTTP/1.1")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"transfer-encoding" and b"chunked" in value:
            chunked, length = True, 0
        elif name == b"content-length" and not chunked:
            length = int(value)
        elif name == b"connection":
            keep_alive = value == b"keep-alive" or (keep_alive and value != b"close")
    if status in (204, 304):
        length = 0
    return status, chunked, length, keep_alive and length != -3


class Recorder:
    """Samples of finished requests; times are in seconds, offsets from the run's start."""

    __slots__ = (
        "errors",
        "events",
        "events_total",
        "first_error",
        "gaps",
        "ok",
        "starts",
        "t0",
        "total",
        "ttft",
    )

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

    __slots__ = (
        "chunked",
        "closed",
        "driver",
        "err_body",
        "gaps",
        "head",
        "in_flight",
        "keep_alive",
        "left",
        "n",
        "pending",
        "status",
        "t_first",
        "t_last",
        "t_send",
        "tail",
        "transport",
    )

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.in_flight = False
        self.keep_alive = True
        self.t_send = self.t_first = self.t_last = 0.0
        self.gaps: list[float] = []

    def send(self, request: bytes) -> None:
        self.in_flight, self.head, self.status = True, b"", 0
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
                self.driver.on_lost(
                    self, "truncated" if self.status == 200 else "disconnect", repr(exc)
                )
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        now = _now()
        if not self.in_flight:
            return  # bytes after a timeout abort, or a server talking out of turn
        if not self.status:
            if self.head:
                data = self.head + data
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.head = data
                return
            head, data = data[:end], data[end + 4 :]
            heads = self.driver.heads  # a server repeats the same head: parse it once
            parsed = heads.get(head)
            if parsed is None:
                parsed = parse_head(head)
                if len(heads) < 256:
                    heads[head] = parsed
            self.status, self.chunked, self.left, self.keep_alive = parsed
        if self._feed(data, now):
            self._complete(now)

    def _feed(self, data: bytes, now: float) -> bool:
        """Consume body bytes; True once the response is complete."""
        if not self.chunked:
            if self.left == -3:
                self._payload(data, now)
                return False
            take = data[: self.left]
            if take:
                self._payload(take, now)
            self.left -= len(take)
            return self.left == 0
        # Chunked: left > 0 bytes of chunk data due; 0 a size line; -1 the CRLF after data;
        # -2 the trailer section after the last chunk. The payload of one read is handled
        # as one piece: its events all arrived at the same instant anyway.
        if self.pending:
            data, self.pending = self.pending + data, b""
        pos, end, parts, complete, left = 0, len(data), [], False, self.left
        while pos < end:
            if left == 0:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    break
                try:
                    size = int(data[pos:eol], 16)
                except ValueError:  # a chunk extension: "1a;name=value"
                    size = int(data[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                stop = pos + size
                if not size:
                    left = -2
                elif stop + 2 <= end:  # the whole chunk is here: the common case
                    parts.append(data[pos:stop])
                    pos = stop + 2
                else:
                    left = size
            elif left > 0:
                stop = min(pos + left, end)
                parts.append(data[pos:stop])
                left -= stop - pos
                pos = stop
                if not left:
                    left = -1
            elif left == -1:
                if end - pos < 2:
                    break
                pos, left = pos + 2, 0
            else:
                complete = data.startswith(b"\r\n", pos) or data.find(b"\r\n\r\n", pos) >= 0
                break
        self.left = left
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
        k = chunk.count(b"\n\n") + (
            chunk[:1] == b"\n" and self.tail[-1:] == b"\n" and self.tail[-2:] != b"\n\n"
        )
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


class Driver:
    """Decides what each connection does next and records what it got. The base class records
    into ``rec`` and leaves connections idle; subclasses send requests."""

    def __init__(
        self, rec: Recorder, request: bytes, *, expected_events: int | None, timeout_s: float
    ) -> None:
        self.rec, self.request = rec, request
        self.expected_events, self.timeout_s = expected_events, timeout_s
        self.hold = False  # held streams are open on purpose: the timeout spares them
        self.conns: set[Client] = set()
        self.heads: dict[bytes, tuple[int, bool, int, bool]] = {}

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
        expected = self.expected_events
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
        """Abort requests older than the timeout (called a few times a second)."""
        for conn in list(self.conns):
            if conn.closed.done():
                self.conns.discard(conn)
            elif (
                conn.in_flight
                and now - conn.t_send > self.timeout_s
                and not (self.hold and conn.t_first)
            ):
                conn.in_flight = False
                self.rec.error("timeout", f"no complete response in {self.timeout_s}s")
                cast(asyncio.Transport, conn.transport).abort()

    def __repr__(self) -> str:
        busy = sum(1 for c in self.conns if c.in_flight)
        return f"<{type(self).__name__} [{len(self.conns)} connections, {busy} busy] {self.rec!r}>"


def percentiles(values: Sequence[float], scale: float = 1000.0) -> dict[str, float]:
    """p50/p90/p99/max/mean (nearest rank), scaled (default: seconds to ms)."""
    if not values:
        return {}
    s = sorted(values)

    def rank(p: float) -> float:
        return round(s[min(len(s) - 1, int(p * len(s)))] * scale, 3)

    return {
        "p50": rank(0.5),
        "p90": rank(0.9),
        "p99": rank(0.99),
        "max": round(s[-1] * scale, 3),
        "mean": round(sum(s) / len(s) * scale, 3),
    }


def raise_nofile_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard one: thousands of streams need the fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def watch(driver: Driver, label: Callable[[float], str], progress: bool) -> None:
    """Sweep timed-out requests; with ``progress``, print ``label(elapsed)`` every second."""
    last = 0.0
    while True:
        await asyncio.sleep(0.25)
        now = _now()
        driver.sweep(now)
        if progress and now - last >= 1.0:
            last = now
            sys.stderr.write(f"\r{label(now - driver.rec.t0):<79}")
            sys.stderr.flush()
