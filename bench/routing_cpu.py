"""What prefix routing costs the gateway: CPU per request on the burst benchmark, prefix
against round_robin, with request bodies of 4 KB and 200 KB.

    python bench/routing_cpu.py                          # 3 alternating rounds, medians
    python bench/routing_cpu.py --sizes 4096 --rounds 5 --seconds 6

The burst scenario of run.py (16-event streams back to back on 32 connections) through the
gateway pinned alone on core 0, in front of two replicas of the fake vLLM (one process on
core 1, with this process as the load generator). The body is a chat request whose system
message is padded to the size asked; every request is the same, so under `prefix` they share
every block: each is hashed, looked up and recorded (the load bound spreads them). CPU per
request is the gateway's CPU time (all threads, from /proc) over the requests served, after
a one-second warm-up. The policies run one after the other in each round, in an order that
rotates round by round; this VM's speed drifts by 20-40% over minutes, so each policy is
compared with round_robin of the same round (the median of those ratios) as well as by the
medians of all rounds.

Drift of that size hides a cost of a few percent, so `--profile` also samples the gateway
with py-spy during every measured run (as cpu_profile.py does) and charges to routing the
samples whose innermost frame is in gateway/routing.py or gateway/prefix_index.py (C calls
they make, such as hashing, count for them): µs of routing per request, measured in the same
run as the whole, which drift cannot skew.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import contenders as cs  # noqa: E402
from bench import routing_bench as rb  # noqa: E402
from bench.cpu_profile import innermost_frames, py_spy  # noqa: E402
from bench.loadgen import LoadSpec, run_load  # noqa: E402

MODEL = "bench-model"
RESULTS = Path(__file__).resolve().parent / "results"


def padded_body(size: int) -> dict[str, Any]:
    """extra_body for LoadSpec making the whole JSON body `size` bytes."""
    padded = {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi."}]}
    spec = LoadSpec(url="http://x:1", model=MODEL, events=16, interval_ms=0, extra_body=padded)
    empty = len(spec.request_bytes().split(b"\r\n\r\n", 1)[1])
    filler = "You are a careful assistant. " * (size // 29 + 1)
    padded["messages"][0]["content"] = filler[: max(0, size - empty)]
    return padded


async def start_fakes(core: int | None) -> tuple[asyncio.subprocess.Process, list[str]]:
    argv = cs.pinned(
        [
            sys.executable,
            str(cs.BENCH / "fake_vllm.py"),
            "--port",
            "0",
            "--model",
            MODEL,
            "--replicas",
            "2",
        ],
        core,
    )
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    urls = []
    for _ in range(2):
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        urls.append(line.split(" on ", 1)[1].strip())
    return proc, urls


ROUTING_FILES = ("gateway/routing.py", "gateway/prefix_index.py")
RATE_HZ = 1000


async def sampled(pid: int, seconds: float, out: Path) -> asyncio.subprocess.Process:
    spy = py_spy()
    if spy is None:
        raise SystemExit("--profile needs py-spy (bench/requirements.txt)")
    return await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(pid), "--nonblocking", "--format", "raw",
        "--rate", str(RATE_HZ), "--duration", str(int(seconds)), "--output", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def measure(
    policy: str,
    size: int,
    replicas: list[str],
    *,
    seconds: float,
    workdir: Path,
    core: int | None,
    profile: bool,
) -> dict[str, Any]:
    contender = rb.RoutedGateway(policy)
    extra = padded_body(size)
    async with cs.start(
        contender,
        upstream="|".join(replicas),
        model=MODEL,
        probe_request=rb.chat_probe(replicas[0], MODEL),
        workdir=workdir,
        core=core,
    ) as target:
        assert target.pid is not None

        def spec(duration: float) -> LoadSpec:
            return LoadSpec(
                url=target.url,
                model=MODEL,
                concurrency=32,
                duration_s=duration,
                events=16,
                interval_ms=0,
                extra_body=extra,
            )

        await run_load(spec(1.0))  # warm-up: connection pools, the index
        if not profile:
            summary = await run_load(spec(seconds), pids=[target.pid])
        else:
            # The load outlasts the sampling by a second, so every sample is under load.
            out = workdir / "spy.collapsed"
            spy = await sampled(target.pid, seconds, out)
            load = asyncio.create_task(run_load(spec(seconds + 1.0), pids=[target.pid]))
            await spy.wait()
            summary = await load
            samples = innermost_frames(out.read_text().splitlines())
    body_bytes = len(spec(1.0).request_bytes().split(b"\r\n\r\n", 1)[1])
    proc = next(p for p in summary["processes"] if p["pid"] == target.pid)
    requests = summary["requests_ok"]
    sampling: dict[str, Any] = {}
    if profile:
        # Requests served during the sampled window, from the load's own rate.
        served = summary["requests_ok"] * int(seconds) / summary["elapsed_s"]
        routing = sum(n for f, n in samples.items() if any(p in f for p in ROUTING_FILES))
        sampling = {
            "sampled_us_per_req": round(sum(samples.values()) * 1e6 / RATE_HZ / served, 1),
            "routing_us_per_req": round(routing * 1e6 / RATE_HZ / served, 1),
        }
    return {
        **sampling,
        "policy": policy,
        "body_bytes": body_bytes,
        "requests": requests,
        "errors": summary["errors"],
        "req_per_s": summary["req_per_s"],
        "gateway_cpu_s": proc["cpu_s"],
        "cpu_us_per_req": round(proc["cpu_s"] * 1e6 / requests, 1) if requests else None,
    }


async def main_async(args: argparse.Namespace) -> int:
    cores = os.cpu_count() or 1
    gateway_core, load_core = (0, 1) if cores >= 2 else (None, None)
    if load_core is not None:
        os.sched_setaffinity(0, {load_core})
    load = await rb.wait_quiet()
    sizes = [int(s) for s in args.sizes.split(",")]
    policies = [p for p in args.policies.split(",") if p]
    runs: list[dict[str, Any]] = []
    proc, replicas = await start_fakes(load_core)
    try:
        with tempfile.TemporaryDirectory(prefix="routing-cpu-") as tmp:
            for number in range(args.rounds):
                for size in sizes:
                    turn = number % len(policies)
                    for policy in policies[turn:] + policies[:turn]:
                        run = await measure(
                            policy,
                            size,
                            replicas,
                            seconds=args.seconds,
                            workdir=Path(tmp),
                            core=gateway_core,
                            profile=args.profile,
                        )
                        run["round"] = number + 1
                        runs.append(run)
                        print(json.dumps(run), file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        await proc.communicate()
    rows = []
    summary: dict[str, Any] = {}
    for size in sizes:
        body = next(r["body_bytes"] for r in runs if size_of(r, size))
        base = {
            r["round"]: r["cpu_us_per_req"]
            for r in runs
            if r["policy"] == "round_robin" and size_of(r, size)
        }
        for policy in policies:
            mine = [r for r in runs if r["policy"] == policy and size_of(r, size)]
            median = statistics.median(r["cpu_us_per_req"] for r in mine)
            paired = statistics.median(r["cpu_us_per_req"] / base[r["round"]] for r in mine)
            figures: dict[str, Any] = {
                "body_bytes": body,
                "median_us": median,
                "paired_ratio": round(paired, 3),
            }
            row = [f"{body:,}", policy, f"{median:.0f}", f"{paired:.3f}x"]
            if args.profile:
                whole = statistics.median(r["sampled_us_per_req"] for r in mine)
                routing = statistics.median(r["routing_us_per_req"] for r in mine)
                figures.update(sampled_us=whole, routing_us=routing)
                row += [f"{routing:.1f} of {whole:.0f}"]
            summary[f"{size} {policy}"] = figures
            rows.append(row)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = "\n".join(
        [
            f"# Prefix routing's CPU cost ({when})",
            "",
            f"`{' '.join(sys.argv)}`: gateway CPU µs per 16-event request, medians of "
            f"{args.rounds} rounds of {args.seconds:g} s; the ratio is the median over rounds "
            f"of the policy's figure over round_robin's in the same round. "
            f"Load average at start: {load[0]:.2f}.",
            "",
            rb.markdown_table(
                ["body bytes", "policy", "µs per request", "over round_robin (paired)"]
                + (["sampled µs in routing code, of all"] if args.profile else []),
                rows,
            ),
        ]
    )
    print(report)
    out = Path(args.out_dir)
    (out / "routing_cpu.md").write_text(report + "\n")
    rb.write_json(out / "routing_cpu.json", {"runs": runs, "medians": summary})
    return 0


def size_of(run: dict[str, Any], size: int) -> bool:
    return abs(run["body_bytes"] - size) <= 64


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,204800", help="request body bytes")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--policies", default="round_robin,prefix", help="round_robin first")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--profile", action="store_true", help="py-spy: routing's own share")
    parser.add_argument("--out-dir", default=str(RESULTS))
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
