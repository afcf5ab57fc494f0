"""What a benchmark run leaves behind: the machine's description, the markdown tables, the JSON
with every figure, the raw samples (git-ignored) and the PNG plots.

Figures of several rounds are combined by their median; errors and stalls are added up.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("vllm-gateway", "aiohttp", "hypercorn", "uvicorn", "httptools", "uvloop", "starlette")
_SUMMED = frozenset({"errors", "stalls"})


def machine(load_before: Sequence[float], *, waited_s: float = 0.0) -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "load_average_at_start": [round(x, 2) for x in load_before],
        "waited_for_load_s": waited_s,
        "uptime": uptime.strip(),
    }


def _median_tree(rounds: list[Any]) -> Any:
    """One value per leaf over the rounds: the median of numbers, the last of anything else."""
    first = rounds[-1]
    if isinstance(first, dict):
        keys = {k for r in rounds if isinstance(r, dict) for k in r}
        out = {}
        for key in sorted(keys):
            values = [r[key] for r in rounds if isinstance(r, dict) and key in r]
            if key in _SUMMED and all(isinstance(v, int) for v in values):
                out[key] = sum(values)
            else:
                out[key] = _median_tree(values)
        return out
    if all(isinstance(r, list) for r in rounds) and len({len(r) for r in rounds}) == 1:
        return [_median_tree(list(column)) for column in zip(*rounds, strict=True)]
    numbers = [r for r in rounds if isinstance(r, int | float) and not isinstance(r, bool)]
    if numbers and len(numbers) == len(rounds):
        middle = statistics.median(numbers)
        return round(middle, 4) if isinstance(middle, float) else middle
    return first


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return _median_tree(rounds) if rounds else {}


def _num(value: Any, digits: int = 1, *, thousands: bool = True) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not thousands:
        return f"{value:.{digits}f}"
    if isinstance(value, int) or (thousands and abs(value) >= 1000):
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _pair(stats: dict[str, Any] | None, a: str = "p50", b: str = "p99", digits: int = 2) -> str:
    if not stats:
        return "–"
    return f"{stats[a]:.{digits}f} / {stats[b]:.{digits}f}"


def _noise(figures: dict[str, Any], core: int | None) -> str:
    """How busy the proxy's core was with anything but the proxy (other tenants), at worst
    over the two load scenarios."""
    shares = []
    for scenario in ("saturation", "paced"):
        busy = figures.get(scenario, {}).get("core_busy")
        if core is not None and busy and core < len(busy):
            shares.append(busy[core] - (figures[scenario].get("proxy_cores") or 0.0))
    return f"{max(0.0, max(shares)) * 100:.0f}%" if shares else "–"


def _errors(figures: dict[str, Any]) -> int:
    return sum(int(s.get("errors") or 0) for s in figures.values() if isinstance(s, dict))


def markdown(result: dict[str, Any]) -> str:
    plan, runs = result["plan"], result["contenders"]
    ran = {name: r for name, r in runs.items() if r["status"] == "ran"}
    reduced = [name for name, r in ran.items() if r.get("reduced")]

    def label(name: str) -> str:
        return f"{name} *" if name in reduced else name

    m = result["machine"]
    load = " ".join(f"{x:.2f}" for x in m["load_average_at_start"])
    pkgs = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    lines = [
        f"# Benchmark: {result['mode']} mode, {result['started']}",
        "",
        f"`{result['command']}`: {plan['rounds']} round(s), contenders in the same order each "
        "round; figures are medians over the rounds. Each proxy runs alone, pinned with "
        f"`taskset -c {result['proxy_core']}`; the fake vLLM and the load generator share core "
        f"{result['load_core']}. CPU is the proxy's whole process tree, from /proc.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}; "
        f"{pkgs}. Load average at start: {load}"
        + (
            f" (after waiting {m['waited_for_load_s']:.0f} s for it to drop)."
            if m["waited_for_load_s"]
            else "."
        ),
        "",
        f"## Streaming cost (burst: {plan['burst_events']} events at once, "
        f"{plan['saturation_concurrency']} connections, {plan['saturation_s']:g} s; paced: "
        f"{plan['paced_streams']} streams of {plan['paced_events']} events "
        f"{plan['paced_interval_ms']:g} ms apart, ~{plan['paced_offered_eps']:,.0f} events/s "
        f"offered, {plan['paced_s']:g} s)",
        "",
        "| contender | burst req/s | CPU µs/request | paced events/s | CPU µs/event | "
        "proxy core share (paced) | gap p50 / p99 ms | stalls | errors | noise |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in ran.items():
        sat, paced = r["summary"].get("saturation", {}), r["summary"].get("paced", {})
        share = paced.get("proxy_cores")
        lines.append(
            f"| {label(name)} | {_num(sat.get('req_per_s'))} | {_num(sat.get('cpu_us_per_req'))} "
            f"| {_num(paced.get('events_per_s'))} | {_num(paced.get('cpu_us_per_event'))} "
            f"| {'–' if share is None else f'{share * 100:.0f}%'} "
            f"| {_pair(paced.get('gap_ms'))} | {_num(paced.get('stalls'))} "
            f"| {_errors(r['summary'])} | {_noise(r['summary'], result['proxy_core'])} |"
        )
    direct = ran.get("direct", {}).get("summary", {}).get("c1", {}).get("ttft_ms")
    lines += [
        "",
        f"## Time to first event: concurrency 1 ({plan['c1_events']}-event bursts, "
        f"{plan['c1_s']:g} s), and with the {plan['paced_streams']} paced streams, whose "
        "connections all open at once",
        "",
        "| contender | requests | TTFT p50 / p99 ms | added vs direct p50 / p99 µs "
        "| paced: TTFT p50 / p99 ms | paced: listen-queue overflows |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in ran.items():
        c1, paced = r["summary"].get("c1", {}), r["summary"].get("paced", {})
        ttft = c1.get("ttft_ms")
        added = "–"
        if ttft and direct and name != "direct":
            added = (
                f"+{(ttft['p50'] - direct['p50']) * 1000:,.0f} / "
                f"+{(ttft['p99'] - direct['p99']) * 1000:,.0f}"
            )
        lines.append(
            f"| {label(name)} | {_num(c1.get('requests_ok'))} | {_pair(ttft, digits=3)} "
            f"| {added} | {_pair(paced.get('ttft_ms'), digits=1)} "
            f"| {_num(paced.get('listen_overflows'))} |"
        )
    lines += [
        "",
        f"## {plan['hold_streams']:,} open slow streams (held {plan['hold_s']:g} s, then every "
        "client leaves at once)",
        "",
        "| contender | open | errors | RSS idle MiB | RSS KiB per stream | fds held | "
        "upstream closed (last abort after the clients left, s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in ran.items():
        h = r["summary"].get("hold", {})
        if not h:
            continue
        who = " (fake)" if h.get("measured") == "fake" else ""
        closed = h.get("upstream_last_abort_s")
        aborted = h.get("upstream_aborted")
        closed_text = "–" if closed is None else f"{closed:.3f}"
        if aborted is not None and aborted < h["opened"]:
            closed_text += f" ({aborted}/{h['opened']} closed)"
        lines.append(
            f"| {label(name)}{who} | {h['opened']:,}/{h['streams']:,} | {h['errors']} "
            f"| {_num(h.get('rss_mib_idle'))} | {_num(h.get('rss_kib_per_stream'))} "
            f"| {_num(h.get('fds_held_peak'))} | {closed_text} |"
        )
    notes = [
        "Noise: the share of the proxy's core busy with other processes during the load "
        "scenarios (from /proc/stat); figures taken with much of it are less reliable, the CPU "
        "µs columns least affected.",
    ]
    if reduced:
        notes.append(
            "\\* too slow for the full load, so it gets a reduced one: "
            f"{result['reduced_plan']['saturation_concurrency']} connections for the bursts, "
            f"{result['reduced_plan']['paced_streams']} paced streams, "
            f"{result['reduced_plan']['hold_streams']} held streams; its event counts are not "
            "checked (it re-encodes the stream)."
        )
    skipped = {n: r["reason"] for n, r in runs.items() if r["status"] != "ran"}
    lines += ["", "## Contenders", ""]
    for name, r in runs.items():
        version = f" {r['version']}" if r.get("version") else ""
        state = "" if r["status"] == "ran" else f" — **{r['status']}**: {r['reason']}"
        lines.append(f"- `{name}`{version}: {r['about']}{state}")
    if notes:
        lines += ["", *notes]
    if result.get("plots"):
        lines += ["", "## Distributions", ""]
        lines += [f"![{p['title']}]({p['file']})" for p in result["plots"]]
    elif result.get("plots_skipped"):
        lines += ["", f"Plots skipped: {result['plots_skipped']}"]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{n} ({why})" for n, why in skipped.items())]
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], raw: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latest.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "latest.raw.json").write_text(json.dumps(raw))
    path = out_dir / "latest.md"
    path.write_text(markdown(result))
    return path
