"""The four scenarios every contender goes through, in this order, and the figures each keeps.

1. saturation: 16-event bursts from many connections: req/s and the proxy's CPU per request.
2. paced: 64-event streams, 10 ms apart, ~24,000 events/s offered: CPU per event, gaps, stalls.
3. concurrency 1: one request at a time: time to the first event (TTFT).
4. hold: K slow streams held open, then every client leaves: RSS per stream, fds, errors, and
   how soon the fake sees its upstream streams closed.

The load generator runs in this process (pinned with the fake vLLM, away from the proxy);
the proxy's CPU, RSS and fds come from /proc through ``proc_stats``.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import proc_stats
from bench.contenders import Target
from bench.hold_streams import HoldSpec, fetch_json, run_hold
from bench.loadgen import LoadSpec, run_load

SCENARIOS = ("saturation", "paced", "c1", "hold")


@dataclass(frozen=True)
class Plan:
    """How long and how hard each scenario runs; durations in seconds."""

    saturation_s: float
    paced_s: float
    c1_s: float
    hold_streams: int
    hold_s: float
    rounds: int = 1
    warmup_s: float = 1.0
    saturation_concurrency: int = 32
    burst_events: int = 16
    # The fake sends a stream's first event at once and the others one interval apart, so a
    # stream carries events / ((events - 1) x interval) events/s: ~101.6/s for 64 events
    # 10 ms apart, and 236 streams offer ~24,000 events/s.
    paced_streams: int = 236
    paced_events: int = 64
    paced_interval_ms: float = 10.0
    c1_events: int = 16
    hold_close_timeout_s: float = 5.0

    def paced_offered_eps(self) -> float:
        seconds = (self.paced_events - 1) * self.paced_interval_ms / 1000
        return self.paced_streams * self.paced_events / seconds if seconds else 0.0

    def for_contender(self, *, reduced: bool) -> Plan:
        """A slow contender (LiteLLM) gets a load it can carry: what it does with 24,000
        events/s or thousands of streams would be queueing, not a figure."""
        if not reduced:
            return self
        return replace(
            self,
            saturation_concurrency=8,
            paced_streams=min(self.paced_streams, 16),
            hold_streams=min(self.hold_streams, 100),
        )


@dataclass(frozen=True)
class Bench:
    """What every scenario needs: the fake vLLM (URL and pid) and where the load goes."""

    target: Target
    fake_url: str
    fake_pid: int
    model: str
    check_events: bool = True  # False: the proxy re-encodes the stream, count not checked
    progress: bool = False

    def pids(self) -> list[int]:
        return [self.target.pid, self.fake_pid] if self.target.pid else [self.fake_pid]

    def spec(self, *, events: int, interval_ms: float, **fields: Any) -> LoadSpec:
        pacing: dict[str, Any] = {"events": events, "interval_ms": interval_ms}
        if not self.check_events:  # the fake still gets its pacing, through the body
            fields["extra_body"] = {"fake_events": events, "fake_interval_ms": interval_ms}
            fields["stall_ms"] = 5 * interval_ms if interval_ms else 50.0
            pacing = {}
        return LoadSpec(
            url=self.target.url, model=self.model, progress=self.progress, **pacing, **fields
        )


def _cpu(summary: dict[str, Any], bench: Bench) -> dict[str, Any]:
    """The proxy's and the fake's CPU figures of one load run."""
    procs = {p["pid"]: p for p in summary["processes"]}
    fake = procs[bench.fake_pid]
    out: dict[str, Any] = {
        "fake_cores": fake["cpu_cores"],
        "loadgen_cores": summary["loadgen_cpu_cores"],
    }
    if bench.target.pid:
        proxy = procs[bench.target.pid]
        out.update(proxy_cpu_s=proxy["cpu_s"], proxy_cores=proxy["cpu_cores"])
        out.update(proxy_rss_mib=proxy["rss_mib_after"], proxy_processes=proxy["processes"])
    return out


def _per(cpu_s: float | None, count: int) -> float | None:
    return round(cpu_s * 1e6 / count, 2) if cpu_s is not None and count else None


def core_ticks() -> list[tuple[int, int]]:
    """(busy, total) clock ticks of each core since boot, from /proc/stat."""
    ticks = []
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                fields = [int(x) for x in line.split()[1:]]
                idle = fields[3] + fields[4]  # idle + iowait
                ticks.append((sum(fields) - idle, sum(fields)))
    return ticks


def core_busy(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[float]:
    """Busy share of each core between two ``core_ticks()`` readings."""
    return [
        round((b1 - b0) / (t1 - t0), 3) if t1 > t0 else 0.0
        for (b0, t0), (b1, t1) in zip(before, after, strict=True)
    ]


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full (all
    sockets: a server whose accept backlog is too short for a burst of connects shows here,
    and its clients wait for SYN retransmits, 1 s then 3 s then 7 s)."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return int(row.get("ListenOverflows", 0))
    return 0


async def _load(spec: LoadSpec, bench: Bench) -> tuple[dict[str, Any], dict[str, Any]]:
    """One load run: its summary (with each core's busy share: on the proxy's core, what is
    not the proxy's own is other tenants' noise) and its raw samples."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.json"
        ticks, overflows = core_ticks(), listen_overflows()
        summary = await run_load(spec, pids=bench.pids(), samples_path=str(path))
        summary["core_busy"] = core_busy(ticks, core_ticks())
        summary["listen_overflows"] = listen_overflows() - overflows
        raw = json.loads(path.read_text())
    return summary, raw


def _common(summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "elapsed_s": summary["elapsed_s"],
        "requests_ok": summary["requests_ok"],
        "req_per_s": summary["req_per_s"],
        "events": summary["events"],
        "events_per_s": summary["events_per_s"],
        "errors": summary["errors"],
        "error_kinds": summary["error_kinds"],
        "first_error": summary["first_error"],
        "ttft_ms": summary["ttft_ms"],
        "core_busy": summary["core_busy"],
        "listen_overflows": summary["listen_overflows"],
    }


async def warmup(bench: Bench, plan: Plan) -> None:
    """Open pools and warm caches; nothing is kept."""
    spec = bench.spec(
        concurrency=plan.saturation_concurrency,
        duration_s=plan.warmup_s,
        events=plan.burst_events,
        interval_ms=0,
    )
    await run_load(spec)


async def saturation(bench: Bench, plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = bench.spec(
        concurrency=plan.saturation_concurrency,
        duration_s=plan.saturation_s,
        events=plan.burst_events,
        interval_ms=0,
    )
    summary, _ = await _load(spec, bench)
    out = {**_common(summary), "concurrency": spec.concurrency, **_cpu(summary, bench)}
    out["cpu_us_per_req"] = _per(out.get("proxy_cpu_s"), summary["requests_ok"])
    return out, {}


async def paced(bench: Bench, plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = bench.spec(
        concurrency=plan.paced_streams,
        duration_s=plan.paced_s,
        events=plan.paced_events,
        interval_ms=plan.paced_interval_ms,
    )
    summary, raw = await _load(spec, bench)
    out = {**_common(summary), "streams": spec.concurrency, **_cpu(summary, bench)}
    out["cpu_us_per_event"] = _per(out.get("proxy_cpu_s"), summary["events"])
    out.update(gap_ms=summary["gap_ms"], stalls=summary["stalls"])
    out["stall_threshold_ms"] = summary["stall_threshold_ms"]
    return out, {"gap_s": raw["gap_s"], "ttft_s": raw["ttft_s"]}


async def concurrency_one(bench: Bench, plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = bench.spec(concurrency=1, duration_s=plan.c1_s, events=plan.c1_events, interval_ms=0)
    summary, raw = await _load(spec, bench)
    out = {**_common(summary), "total_ms": summary["total_ms"], **_cpu(summary, bench)}
    return out, {"ttft_s": raw["ttft_s"]}


async def _peak_sampler(pid: int, peak: dict[str, int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        now = await asyncio.to_thread(proc_stats.sample, pid)
        peak["fds"] = max(peak.get("fds", 0), now.fds)
        peak["rss_bytes"] = max(peak.get("rss_bytes", 0), now.rss_bytes)
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            pass


async def hold(bench: Bench, plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    request = bench.spec(events=10**9, interval_ms=1000.0).request_bytes()
    spec = HoldSpec(
        url=bench.target.url,
        request=request,
        streams=plan.hold_streams,
        hold_s=plan.hold_s,
        stats_url=bench.fake_url + "/stats",
        progress=bench.progress,
        close_timeout_s=plan.hold_close_timeout_s,
    )
    watched = bench.target.pid or bench.fake_pid
    peak: dict[str, int] = {}
    stop = asyncio.Event()
    sampler = asyncio.create_task(_peak_sampler(watched, peak, stop))
    try:
        report = await run_hold(spec, pids=[watched])
    finally:
        stop.set()
        await sampler
    (proc,) = report["processes"]
    out = {
        "streams": spec.streams,
        "opened": report["opened"],
        "open_s": report["open_s"],
        "errors": report["errors"],
        "error_kinds": report["error_kinds"],
        "first_error": report["first_error"],
        "ttft_ms": report["ttft_ms"],
        "measured": "proxy" if bench.target.pid else "fake",
        "rss_mib_idle": proc["rss_mib_before"],
        "rss_mib_held": proc["rss_mib_held"],
        "rss_kib_per_stream": proc["rss_kib_per_stream"],
        "fds_held_peak": peak.get("fds"),
        "upstream_aborted": report.get("upstream_aborted"),
        "upstream_all_closed_s": report.get("upstream_all_closed_s"),
        "upstream_last_abort_s": report.get("upstream_last_abort_s"),
        "upstream_active_after": report.get("upstream_active_streams_after"),
    }
    return out, {}


RUNNERS = {
    "saturation": saturation,
    "paced": paced,
    "c1": concurrency_one,
    "hold": hold,
}


async def settle(fake_url: str, *, timeout_s: float = 15.0) -> int:
    """Wait until the fake streams nothing (a proxy's leftovers must not load the next run);
    returns the streams still active at the timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        stats = await fetch_json(fake_url + "/stats")
        if not stats["active_streams"] or loop.time() > deadline:
            return int(stats["active_streams"])
        await asyncio.sleep(0.05)
