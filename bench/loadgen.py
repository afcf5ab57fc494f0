"""A lean load generator for OpenAI-style SSE streams: one process, one core, raw asyncio
Protocols over keep-alive connections (the client itself lives in ``sse_client``).

* load mode (here): C connections issue streams back to back for a duration or a count;
  reports TTFT, inter-event gaps, totals, req/s, events/s, errors and stalls.
* hold mode (``--open-streams K``, in ``hold_streams``): open K slow streams, hold them, close
  every client at once and time how fast the proxy in between closes its upstreams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

try:
    from bench import proc_stats
    from bench.hold_streams import HoldSpec, run_hold
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
    from hold_streams import HoldSpec, run_hold  # type: ignore[import-not-found, no-redef]
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
        return (
            f"POST {self.endpoint} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        ).encode() + data


class _LoadDriver(Driver):
    """Keeps every connection busy until the duration or the request budget is spent."""

    def __init__(self, spec: LoadSpec, rec: Recorder) -> None:
        super().__init__(
            rec, spec.request_bytes(), expected_events=spec.events, timeout_s=spec.timeout_s
        )
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


def _write_samples(rec: Recorder, path: str) -> None:
    with open(path, "w") as f:
        json.dump(
            {
                "start_s": list(rec.starts),
                "ttft_s": list(rec.ttft),
                "total_s": list(rec.total),
                "events": list(rec.events),
                "gap_s": list(rec.gaps),
            },
            f,
        )


async def run_load(
    spec: LoadSpec, *, pids: Sequence[int] = (), samples_path: str | None = None
) -> dict[str, Any]:
    """Run load mode and return the JSON summary."""
    raise_nofile_limit()
    host, port = spec.host_port()
    loop = asyncio.get_running_loop()
    meter = proc_stats.Meter(pids)
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
        return (
            f"[{elapsed:6.1f}s{goal}] {rec.ok} ok {rec.ok / elapsed:8.0f} req/s "
            f"{rec.events_total / elapsed:9.0f} ev/s  errors {rec.error_count}"
        )

    monitor = asyncio.create_task(watch(driver, label, spec.progress))
    try:
        await asyncio.gather(*(slot() for _ in range(spec.concurrency)))
    finally:
        monitor.cancel()
        if spec.progress:
            sys.stderr.write("\n")
    elapsed = _now() - rec.t0
    stall = spec.stall_threshold_s()
    summary = {
        "mode": "load",
        "url": spec.url,
        "model": spec.model,
        "endpoint": spec.endpoint,
        "concurrency": spec.concurrency,
        "elapsed_s": round(elapsed, 3),
        "requests": rec.ok + rec.error_count,
        "requests_ok": rec.ok,
        "req_per_s": round(rec.ok / elapsed, 1),
        "events": rec.events_total,
        "events_per_s": round(rec.events_total / elapsed, 1),
        "errors": rec.error_count,
        "error_kinds": rec.errors,
        "first_error": rec.first_error,
        "ttft_ms": percentiles(rec.ttft),
        "gap_ms": percentiles(rec.gaps),
        "total_ms": percentiles(rec.total),
        "stall_threshold_ms": round(stall * 1000, 3),
        "stalls": sum(1 for g in rec.gaps if g > stall),
        **meter.report(),
    }
    if samples_path:
        await asyncio.to_thread(_write_samples, rec, samples_path)
    return summary


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
    p.add_argument(
        "--pid",
        type=int,
        action="append",
        default=[],
        help="measure CPU/RSS/fds of this process tree (repeatable)",
    )
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
        args.endpoint, args.endpoint
    )
    hold = args.open_streams > 0
    if hold:  # slow endless streams unless told otherwise
        args.events = 10**9 if args.events is None else args.events
        args.interval_ms = 1000.0 if args.interval_ms is None else args.interval_ms
    long_run = args.hold > 3 if hold else (not args.requests and args.duration > 3)
    spec = LoadSpec(
        url=args.url.rstrip("/"),
        model=args.model,
        endpoint=endpoint,
        concurrency=args.concurrency,
        duration_s=args.duration,
        requests=args.requests,
        events=args.events,
        interval_ms=args.interval_ms,
        stall_ms=args.stall_ms,
        timeout_s=args.timeout,
        extra_body=json.loads(args.body_extra),
        progress=args.progress == "on" or (args.progress == "auto" and long_run),
    )
    if hold:
        hold_spec = HoldSpec(
            url=spec.url,
            request=spec.request_bytes(),
            streams=args.open_streams,
            hold_s=args.hold,
            stats_url=args.stats_url or spec.url + "/stats",
            connect_parallel=args.connect_parallel,
            progress=spec.progress,
        )
        summary = await run_hold(hold_spec, pids=args.pid)
        return {"mode": summary.pop("mode"), "model": spec.model, **summary}
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
