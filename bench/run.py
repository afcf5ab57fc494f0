"""One command for the whole benchmark: every available contender through the same scenarios,
then a markdown table, a JSON file with every figure and PNG plots in bench/results/.

    python bench/run.py --quick                      # < 5 minutes, K=1000 held streams
    python bench/run.py                              # full: longer runs, K=5000, 3 rounds
    python bench/run.py --contenders direct,gateway --rounds 2

Each proxy runs alone on one core (``taskset -c 0``); the fake vLLM and this process, which
is the load generator, share the other one. Contenders that are not installed (nginx,
vllm-router, LiteLLM: ``make bench-deps``) or that fail to start are skipped and listed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import shlex
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import contenders as cs  # noqa: E402
from bench import plots, report, scenarios  # noqa: E402
from bench.loadgen import LoadSpec  # noqa: E402
from bench.scenarios import Plan  # noqa: E402

MODEL = "bench-model"
RESULTS = Path(__file__).resolve().parent / "results"
QUICK = Plan(saturation_s=4, paced_s=5, c1_s=3, hold_streams=1000, hold_s=2, rounds=1)
FULL = Plan(saturation_s=10, paced_s=15, c1_s=10, hold_streams=5000, hold_s=5, rounds=3)


@dataclass
class Options:
    plan: Plan
    mode: str = "quick"
    contenders: list[cs.Contender] = field(default_factory=lambda: list(cs.ALL))
    out_dir: Path = RESULTS
    proxy_core: int | None = 0  # None: no pinning (one core, or a test)
    load_core: int | None = 1
    draw: bool = True
    max_load: float | None = 1.5  # above it, wait once before starting
    load_wait_s: float = 60.0
    progress: bool = False
    command: str = "bench/run.py"
    log: Callable[[str], None] = field(default=lambda text: print(text, file=sys.stderr))


@contextlib.asynccontextmanager
async def fake_vllm(core: int | None) -> AsyncIterator[tuple[str, int]]:
    """The fake vLLM as its own process: (URL, pid)."""
    argv = cs.pinned(
        [sys.executable, str(cs.BENCH / "fake_vllm.py"), "--port", "0", "--model", MODEL], core
    )
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        if " on " not in line:
            raise RuntimeError(f"fake_vllm did not start: {line!r}")
        yield line.split(" on ", 1)[1].strip(), proc.pid
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.communicate()


def in_front_of_fake(
    contender: cs.Contender, fake_url: str, *, workdir: Path, core: int | None
) -> contextlib.AbstractAsyncContextManager[cs.Target]:
    """`contender` started in front of the fake, once a one-event stream came through it."""
    probe = LoadSpec(url=fake_url, model=MODEL, events=1, interval_ms=0).request_bytes()
    return cs.start(
        contender,
        upstream=fake_url,
        model=MODEL,
        probe_request=probe,
        workdir=workdir,
        core=core,
    )


async def _wait_for_quiet(options: Options) -> tuple[tuple[float, float, float], float]:
    load = os.getloadavg()
    if options.max_load is None or load[0] <= options.max_load:
        return load, 0.0
    options.log(
        f"load average {load[0]:.2f} > {options.max_load}: waiting {options.load_wait_s:.0f} s "
        "once before starting"
    )
    await asyncio.sleep(options.load_wait_s)
    return os.getloadavg(), options.load_wait_s


async def _one_contender(
    contender: cs.Contender, options: Options, fake_url: str, fake_pid: int, workdir: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start one contender, run every scenario through it, stop it."""
    plan = options.plan.for_contender(reduced=contender.reduced)
    figures: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    async with in_front_of_fake(
        contender, fake_url, workdir=workdir, core=options.proxy_core
    ) as target:
        bench = scenarios.Bench(
            target,
            fake_url,
            fake_pid,
            MODEL,
            check_events=not contender.rewrites_events,
            progress=options.progress,
        )
        await scenarios.warmup(bench, plan)
        for name in scenarios.SCENARIOS:
            await scenarios.settle(fake_url)
            options.log(f"  {contender.name}: {name}")
            figures[name], raw[name] = await scenarios.RUNNERS[name](bench, plan)
            if figures[name].get("errors"):
                options.log(f"    {figures[name]['errors']} errors: {figures[name]['first_error']}")
    left = await scenarios.settle(fake_url)
    if left:
        options.log(f"  {contender.name}: {left} upstream streams still open after it stopped")
    return figures, raw


async def run(options: Options) -> dict[str, Any]:
    """Run the benchmark and write its results; returns the result document."""
    load, waited = await _wait_for_quiet(options)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.monotonic()
    runs: dict[str, dict[str, Any]] = {}
    for c in options.contenders:
        reason = c.missing()
        runs[c.name] = {
            "about": c.about,
            "version": c.version() if not reason else "",
            "status": "skipped" if reason else "ran",
            "reason": reason or "",
            "reduced": c.reduced,
            "rounds": [],
        }
        if reason:
            options.log(f"skipping {c.name}: {reason}")
    raw: dict[str, list[dict[str, Any]]] = {c.name: [] for c in options.contenders}
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        async with fake_vllm(options.load_core) as (fake_url, fake_pid):
            for round_no in range(options.plan.rounds):
                for c in options.contenders:
                    entry = runs[c.name]
                    if entry["status"] != "ran":
                        continue
                    options.log(f"round {round_no + 1}/{options.plan.rounds}: {c.name}")
                    entry.setdefault("load_average_before", []).append(round(os.getloadavg()[0], 2))
                    workdir = Path(tmp) / f"{c.name}-{round_no}"
                    try:
                        figures, samples = await _one_contender(
                            c, options, fake_url, fake_pid, workdir
                        )
                    except cs.StartFailed as exc:
                        entry.update(status="failed to start", reason=str(exc))
                        options.log(f"  {c.name} failed to start: {exc}")
                        continue
                    entry["rounds"].append(figures)
                    raw[c.name].append(samples)
    for entry in runs.values():
        entry["summary"] = report.combine(entry["rounds"])
    result: dict[str, Any] = {
        "mode": options.mode,
        "started": started,
        "duration_s": round(time.monotonic() - t0, 1),
        "command": options.command,
        "proxy_core": options.proxy_core,
        "load_core": options.load_core,
        "machine": report.machine(load, waited_s=waited),
        "plan": {**asdict(options.plan), "paced_offered_eps": options.plan.paced_offered_eps()},
        "reduced_plan": asdict(options.plan.for_contender(reduced=True)),
        "contenders": runs,
        "skipped": {n: r["reason"] for n, r in runs.items() if r["status"] != "ran"},
    }
    raw = {name: rounds for name, rounds in raw.items() if rounds}
    if options.draw:
        why_not = plots.available()
        if why_not:
            result["plots_skipped"] = why_not
        else:
            result["plots"] = plots.draw(raw, options.out_dir, result["plan"])
    report.write(result, raw, options.out_dir)
    return result


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs, K=1000 (< 5 minutes)")
    p.add_argument("--contenders", help="comma-separated subset, in order (default: all)")
    p.add_argument("--rounds", type=int, help="alternating rounds (quick 1, full 3)")
    p.add_argument("--hold-streams", type=int, help="K open streams (quick 1000, full 5000)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--max-load", type=float, default=1.5, help="wait once above this load")
    p.add_argument("--progress", action="store_true", help="loadgen progress lines")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = replace(plan, rounds=args.rounds)
    if args.hold_streams:
        plan = replace(plan, hold_streams=args.hold_streams)
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    options = Options(
        plan=plan,
        mode="quick" if args.quick else "full",
        contenders=cs.by_name(args.contenders.split(",") if args.contenders else None),
        out_dir=args.out_dir,
        proxy_core=0 if pin else None,
        load_core=1 if pin else None,
        draw=not args.no_plots,
        max_load=args.max_load,
        progress=args.progress,
        command="python bench/run.py " + shlex.join(sys.argv[1:] if argv is None else argv),
    )
    if pin:  # this process is the load generator: it shares the fake's core
        os.sched_setaffinity(0, {1})
    import uvloop

    result = uvloop.run(run(options))
    print(report.markdown(result))
    options.log(f"wrote {options.out_dir}/latest.md, latest.json, plots ({result['duration_s']} s)")
    ran = [r for r in result["contenders"].values() if r["status"] == "ran"]
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
