"""What prefix routing costs the gateway: CPU per request on the burst benchmark, prefix
against round_robin, with request bodies of 4 KB and 200 KB.

    python bench/routing_cpu.py                      # 4 KB and 200 KB, 12 windows each
    python bench/routing_cpu.py --sizes 4096 --windows 20 \
        --policies round_robin,least_loaded,prefix --profile

The burst scenario of run.py (16-event streams back to back on 32 connections) through the
gateway, in front of two replicas of the fake vLLM (one process on core 1, with this process
as the load generator). The body is a chat request whose system message is padded to the
size asked; every request is the same, so under `prefix` they share every block: each is
hashed, looked up and recorded (the load bound spreads them).

This VM's speed drifts by 20-40% over minutes, more than the few percent measured here, so
one gateway per policy runs at once, all pinned to core 0, and the load goes to each in turn
for a window of `--window` seconds, the order rotating window by window: consecutive windows
share the machine's state. CPU per request is the gateway's CPU time (all threads, from
/proc) over the requests it served in its windows; the ratio is the median over rounds of a
policy's window over round_robin's window of the same round. An idle gateway costs nothing
meanwhile but its health checks (two GETs every 5 s).

`--profile` then samples each gateway with py-spy under the same load (as cpu_profile.py
does) and charges to routing the samples whose innermost frame is in gateway/routing.py or
gateway/prefix_index.py (the C calls they make, hashing included, count for them): the
routing code's own µs per request, out of all sampled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
ROUTING_FILES = ("gateway/routing.py", "gateway/prefix_index.py")
RATE_HZ = 1000


def padded_body(size: int) -> dict[str, Any]:
    """extra_body for LoadSpec making the whole JSON body `size` bytes."""
    padded = {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi."}]}
    spec = LoadSpec(url="http://x:1", model=MODEL, events=16, interval_ms=0, extra_body=padded)
    empty = len(spec.request_bytes().split(b"\r\n\r\n", 1)[1])
    filler = "You are a careful assistant. " * (size // 29 + 1)
    padded["messages"][0]["content"] = filler[: max(0, size - empty)]
    return padded


def burst(url: str, size: int, seconds: float) -> LoadSpec:
    return LoadSpec(
        url=url,
        model=MODEL,
        concurrency=32,
        duration_s=seconds,
        events=16,
        interval_ms=0,
        extra_body=padded_body(size),
    )


async def start_fakes(core: int | None) -> tuple[asyncio.subprocess.Process, list[str]]:
    argv = [sys.executable, str(cs.BENCH / "fake_vllm.py"), "--port", "0", "--model", MODEL]
    argv += ["--replicas", "2"]
    proc = await asyncio.create_subprocess_exec(
        *cs.pinned(argv, core), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    urls = []
    for _ in range(2):
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        urls.append(line.split(" on ", 1)[1].strip())
    return proc, urls


async def window(target: cs.Target, size: int, seconds: float) -> tuple[float, int]:
    """The gateway's CPU seconds and the requests it served in one window of load."""
    assert target.pid is not None
    summary = await run_load(burst(target.url, size, seconds), pids=[target.pid])
    if summary["errors"]:
        raise RuntimeError(f"{target.name}: {summary['first_error']}")
    proc = next(p for p in summary["processes"] if p["pid"] == target.pid)
    return float(proc["cpu_s"]), int(summary["requests_ok"])


async def sampled(target: cs.Target, size: int, seconds: float, out: Path) -> dict[str, float]:
    """py-spy on the gateway under the load: all sampled µs per request, and routing's."""
    spy_path = py_spy()
    if spy_path is None:
        raise SystemExit("--profile needs py-spy (bench/requirements.txt)")
    spy = await asyncio.create_subprocess_exec(
        spy_path, "record", "--pid", str(target.pid), "--nonblocking", "--format", "raw",
        "--rate", str(RATE_HZ), "--duration", str(int(seconds)), "--output", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    # The load outlasts the sampling by a second, so every sample is under load.
    load = asyncio.create_task(run_load(burst(target.url, size, seconds + 1.0)))
    await spy.wait()
    summary = await load
    samples = innermost_frames(out.read_text().splitlines())
    served = summary["requests_ok"] * int(seconds) / summary["elapsed_s"]
    routing = sum(n for frame, n in samples.items() if any(f in frame for f in ROUTING_FILES))
    return {
        "sampled_us_per_req": round(sum(samples.values()) * 1e6 / RATE_HZ / served, 1),
        "routing_us_per_req": round(routing * 1e6 / RATE_HZ / served, 1),
    }


async def one_size(
    size: int, policies: list[str], replicas: list[str], args: argparse.Namespace, core: int | None
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    windows: list[dict[str, Any]] = []
    profiles: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="routing-cpu-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            targets = {}
            for policy in policies:
                targets[policy] = await stack.enter_async_context(
                    cs.start(
                        rb.RoutedGateway(policy),
                        upstream="|".join(replicas),
                        model=MODEL,
                        probe_request=rb.chat_probe(replicas[0], MODEL),
                        workdir=Path(tmp) / policy,
                        core=core,
                    )
                )
            for policy in policies:  # warm-up: connection pools, the index
                await window(targets[policy], size, 1.0)
            for number in range(args.windows):
                turn = number % len(policies)
                for policy in policies[turn:] + policies[:turn]:
                    cpu_s, requests = await window(targets[policy], size, args.window)
                    windows.append(
                        {"size": size, "round": number, "policy": policy, "cpu_s": cpu_s}
                        | {"requests": requests, "us_per_req": cpu_s * 1e6 / requests}
                    )
            if args.profile:
                for policy in policies:
                    out = Path(tmp) / f"{policy}.collapsed"
                    profiles[policy] = await sampled(targets[policy], size, 5.0, out)
    return windows, profiles


async def main_async(args: argparse.Namespace) -> int:
    cores = os.cpu_count() or 1
    gateway_core, load_core = (0, 1) if cores >= 2 else (None, None)
    if load_core is not None:
        os.sched_setaffinity(0, {load_core})
    load = await rb.wait_quiet()
    sizes = [int(s) for s in args.sizes.split(",")]
    policies = [p for p in args.policies.split(",") if p]
    if policies[0] != "round_robin":
        raise SystemExit("--policies must start with round_robin, the baseline")
    windows: list[dict[str, Any]] = []
    profiles: dict[int, dict[str, dict[str, float]]] = {}
    proc, replicas = await start_fakes(load_core)
    try:
        for size in sizes:
            found, profiles[size] = await one_size(size, policies, replicas, args, gateway_core)
            windows += found
            print(json.dumps(found), file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        await proc.communicate()
    rows, summary = [], {}
    for size in sizes:
        base = {
            w["round"]: w["us_per_req"]
            for w in windows
            if w["size"] == size and w["policy"] == "round_robin"
        }
        for policy in policies:
            mine = [w for w in windows if w["size"] == size and w["policy"] == policy]
            overall = sum(w["cpu_s"] for w in mine) * 1e6 / sum(w["requests"] for w in mine)
            paired = statistics.median(w["us_per_req"] / base[w["round"]] for w in mine)
            figures: dict[str, Any] = {"us_per_req": round(overall, 1), "paired": round(paired, 3)}
            row = [f"{size:,}", policy, f"{overall:.0f}", f"{paired:.3f}x"]
            if args.profile:
                found = profiles[size][policy]
                figures |= found
                routing, whole = found["routing_us_per_req"], found["sampled_us_per_req"]
                row.append(f"{routing:.1f} of {whole:.0f}")
            summary[f"{size} {policy}"] = figures
            rows.append(row)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    headers = ["body bytes", "policy", "CPU µs per request", "over round_robin (paired windows)"]
    if args.profile:
        headers.append("sampled µs in routing code, of all")
    report = "\n".join(
        [
            f"# Prefix routing's CPU cost ({when})",
            "",
            f"`{' '.join(sys.argv)}`: the gateway's CPU µs per 16-event request, one gateway "
            f"per policy on core 0 taking the load in turn, {args.windows} rounds of "
            f"{args.window:g} s windows per body size; the ratio is the median over rounds of "
            f"a policy's window over round_robin's. Load average at start: {load[0]:.2f}.",
            "",
            rb.markdown_table(headers, rows),
        ]
    )
    print(report)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing_cpu.md").write_text(report + "\n")
    rb.write_json(out / "routing_cpu.json", {"summary": summary, "windows": windows})
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,204800", help="request body bytes")
    parser.add_argument("--policies", default="round_robin,prefix", help="round_robin first")
    parser.add_argument("--windows", type=int, default=12, help="rounds of windows per size")
    parser.add_argument("--window", type=float, default=1.5, help="seconds of load per window")
    parser.add_argument("--profile", action="store_true", help="py-spy: routing's own share")
    parser.add_argument("--out-dir", default=str(RESULTS))
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
