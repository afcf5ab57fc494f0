"""Where a proxy's CPU goes: py-spy samples under load, added up by the package they land in.

    python bench/cpu_profile.py                              # gateway and bare-hypercorn, burst
    python bench/cpu_profile.py --contenders gateway --scenario paced --seconds 20

Each contender runs pinned to core 0 in front of the fake vLLM (core 1, with this process as
the load generator), exactly as in ``run.py``. While the load runs, py-spy samples the
contender's process tree; each sample is charged to the package of its innermost Python
frame. At a rate of R samples per second a sample stands for 1/R s of the proxy's time, so
samples x 1/R / requests is microseconds per request (per event for ``paced``).

py-spy sees Python frames only. Time in C code called from Python (a socket write, the JSON
parser) is charged to the calling frame; time in the event loop itself (uvloop's C loop:
epoll, callbacks between Python frames) lands on the frame that runs the loop, shown as
"event loop (native)". Comparing the gateway with the bare proxy under the same server tells
the gateway's own cost apart from the server's and aiohttp's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import contenders as cs  # noqa: E402
from bench.loadgen import LoadSpec, run_load  # noqa: E402
from bench.run import FULL, MODEL, fake_vllm, in_front_of_fake  # noqa: E402

# Innermost-frame file prefix -> the share it is reported under.
GROUPS: tuple[tuple[str, str], ...] = (
    ("asyncio/runners.py", "event loop (native)"),
    ("hypercorn/", "server: hypercorn + h11"),
    ("h11/", "server: hypercorn + h11"),
    ("uvicorn/", "server: uvicorn"),
    ("httptools/", "server: uvicorn"),
    # The guards gateway/uvicorn_server.py adds to uvicorn's protocol are server code.
    ("gateway/uvicorn_server.py", "server: uvicorn"),
    # Granian's Rust thread has no Python frames: py-spy sees only its Python side.
    ("granian/", "server: granian (Python side)"),
    ("granian_asgi.py", "server: granian (Python side)"),
    ("aiohttp/", "upstream client: aiohttp"),
    ("multidict/", "upstream client: aiohttp"),
    ("yarl/", "upstream client: aiohttp"),
    ("propcache/", "upstream client: aiohttp"),
    ("asyncio/", "asyncio (tasks, queues, streams)"),
    ("gateway/", "the gateway's own code"),
    ("bare_proxy.py", "the bare proxy's own code"),
    ("starlette/", "the gateway's own code"),
    ("orjson/", "the gateway's own code"),
)
OTHER = "other (stdlib, typing, logging)"


@dataclass(frozen=True)
class Profile:
    contender: str
    scenario: str
    units: int  # requests (burst) or events (paced) served while sampling
    unit: str
    rate_hz: int
    samples: collections.Counter[str]  # innermost frame -> samples

    def per_unit_us(self, samples: int) -> float:
        return samples * 1e6 / self.rate_hz / max(self.units, 1)

    def by_group(self) -> dict[str, float]:
        groups: collections.Counter[str] = collections.Counter()
        for frame, n in self.samples.items():
            groups[group_of(frame)] += n
        return {name: self.per_unit_us(n) for name, n in groups.most_common()}


def group_of(frame: str) -> str:
    """The share a frame such as ``send (aiohttp/client.py:12)`` is reported under."""
    location = frame.rpartition("(")[2]
    for prefix, name in GROUPS:
        if prefix in location:
            return name
    return OTHER


def innermost_frames(collapsed: Iterable[str]) -> collections.Counter[str]:
    """py-spy's raw (collapsed) output, one ``frame;frame;... count`` line per stack, as
    samples per innermost frame. The ``process N:...`` roots that --subprocesses adds are
    not frames."""
    counts: collections.Counter[str] = collections.Counter()
    for line in collapsed:
        stack, _, count = line.rstrip().rpartition(" ")
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")]
        if frames and count.isdigit():
            counts[frames[-1]] += int(count)
    return counts


def py_spy() -> str | None:
    """py-spy from this virtualenv (``make bench`` installs it there), else from PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def spec_for(url: str, scenario: str, seconds: float) -> LoadSpec:
    """The load of run.py's saturation (burst) or paced scenario, for `seconds`."""
    plan = FULL
    if scenario == "paced":
        return LoadSpec(
            url=url,
            model=MODEL,
            concurrency=plan.paced_streams,
            duration_s=seconds,
            events=plan.paced_events,
            interval_ms=plan.paced_interval_ms,
        )
    return LoadSpec(
        url=url,
        model=MODEL,
        concurrency=plan.saturation_concurrency,
        duration_s=seconds,
        events=plan.burst_events,
        interval_ms=0,
    )


async def profile_one(
    contender: cs.Contender,
    *,
    scenario: str,
    seconds: float,
    rate_hz: int,
    workdir: Path,
    spy_path: str,
) -> Profile:
    async with fake_vllm(1) as (fake_url, _fake_pid):
        async with in_front_of_fake(contender, fake_url, workdir=workdir, core=0) as target:
            await run_load(spec_for(target.url, scenario, 1.0))  # warm pools and caches
            out = workdir / f"{contender.name}.{scenario}.collapsed"
            # Sampling starts after the load and stops before it ends: every sample is
            # taken under full load.
            spy = await asyncio.create_subprocess_exec(
                spy_path, "record", "--pid", str(target.pid), "--subprocesses",
                "--nonblocking", "--format", "raw", "--rate", str(rate_hz),
                "--duration", str(int(seconds)), "--output", str(out),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            load = asyncio.create_task(run_load(spec_for(target.url, scenario, seconds + 2.0)))
            _, err = await spy.communicate()
            summary = await load
            if spy.returncode != 0 or not out.exists():
                raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
    # The load ran 2 s longer than the sampling: scale its count to the sampled window.
    key = "events" if scenario == "paced" else "requests_ok"
    units = round(summary[key] * int(seconds) / summary["elapsed_s"])
    return Profile(
        contender=contender.name,
        scenario=scenario,
        units=units,
        unit="event" if scenario == "paced" else "request",
        rate_hz=rate_hz,
        samples=innermost_frames(out.read_text().splitlines()),
    )


def table(profiles: list[Profile]) -> str:
    unit = profiles[0].unit
    groups = {p.contender: p.by_group() for p in profiles}
    names: list[str] = []
    for figures in groups.values():
        names.extend(name for name in figures if name not in names)
    head = "| µs per " + unit + " | " + " | ".join(p.contender for p in profiles) + " |"
    lines = [head, "|---|" + "---:|" * len(profiles)]
    for name in names:
        cells = " | ".join(f"{groups[p.contender].get(name, 0.0):.1f}" for p in profiles)
        lines.append(f"| {name} | {cells} |")
    totals = " | ".join(f"**{sum(groups[p.contender].values()):.1f}**" for p in profiles)
    lines.append(f"| **sampled total** | {totals} |")
    return "\n".join(lines)


def top_frames(profile: Profile, count: int) -> str:
    lines = [f"Top {count} frames of `{profile.contender}` (µs per {profile.unit}):", ""]
    for frame, n in profile.samples.most_common(count):
        lines.append(f"- {profile.per_unit_us(n):6.1f}  `{frame}`")
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contenders", default="gateway,bare-hypercorn")
    parser.add_argument("--scenario", choices=("burst", "paced"), default="burst")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--rate", type=int, default=1000, help="samples per second")
    parser.add_argument("--top", type=int, default=15, help="frames listed per contender")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    spy_path = py_spy()
    if spy_path is None:
        print("py-spy is not installed (bench/requirements.txt)", file=sys.stderr)
        return 2
    chosen = cs.by_name(args.contenders.split(","))
    profiles: list[Profile] = []
    with tempfile.TemporaryDirectory() as tmp:
        for contender in chosen:
            reason = contender.missing()
            if reason or isinstance(contender, cs.Direct):
                print(f"skipping {contender.name}: {reason or 'no proxy process'}", file=sys.stderr)
                continue
            print(
                f"profiling {contender.name} ({args.scenario}, {args.seconds:g} s)", file=sys.stderr
            )
            profiles.append(
                asyncio.run(
                    profile_one(
                        contender,
                        scenario=args.scenario,
                        seconds=args.seconds,
                        rate_hz=args.rate,
                        workdir=Path(tmp),
                        spy_path=spy_path,
                    )
                )
            )
    if not profiles:
        return 1
    print(table(profiles))
    for profile in profiles:
        print()
        print(top_frames(profile, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
