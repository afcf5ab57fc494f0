"""Routing policies at scale, by simulation: 8 fake vLLM replicas with a prefix-cache model.

    python bench/routing_sim.py                      # the sweep and the no-reuse run
    python bench/routing_sim.py --loads 40,70 --replicas 16 --users 512
    python bench/routing_sim.py --workers 2 --policies round_robin,prefix,prefix+hash

Every replica is the fake vLLM with its cache model (``cache_model.py``: a Llama-3.1-8B on
an H100, the sources of each constant are there), all in one process pinned to core 1 with
this process, which runs the multi-round chat workload (``chat_workload.py``: N user sessions
at once, each user replaced by a new one after its rounds, for a fixed duration). The
gateway runs pinned alone on core 0 (``serve_checked.py``: the gateway's own server, objects
and settings, with each routing decision checked against the load bound), once per policy and
offered load, the policies in alternating order. Before each run every replica's cache and
counters are emptied.

Reported per policy and offered load: TTFT p50/p90/p99, requests and output tokens a second
(completed, over the time from the first request to the last answer), errors, the
prefix-cache hit rate, the busiest replica's share of the requests, and the load bound: the
peak over the gateway's picks of the chosen replica's requests in flight / (the average + 1),
both counting the request being placed, which GATEWAY_PREFIX_LOAD_FACTOR (1.5) bounds for
`prefix`. Then the no-reuse workload (fresh random prompts) at the highest load, round_robin
against prefix in alternating pairs. Written to bench/results/routing_sim.{md,json,png}.

A policy may carry the options of routing_bench.gateway_contender: `prefix+hash` is prefix with
GATEWAY_PREFIX_MISS=hash. With `--workers N` the gateway is the plain `vllm-gateway` with
GATEWAY_WORKERS=N (each worker with its own index; no load-bound check, which
serve_checked.py does for one process only).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import contenders as cs  # noqa: E402
from bench import routing_bench as rb  # noqa: E402
from bench.chat_workload import ChatSpec, run_chat  # noqa: E402

MODEL = "sim-model"
RESULTS = Path(__file__).resolve().parent / "results"


async def start_fakes(count: int, core: int | None) -> tuple[asyncio.subprocess.Process, list[str]]:
    argv = cs.pinned(
        [
            sys.executable,
            str(cs.BENCH / "fake_vllm.py"),
            "--port",
            "0",
            "--model",
            MODEL,
            "--sim",
            "--replicas",
            str(count),
        ],
        core,
    )
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    urls = []
    for _ in range(count):
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        if " on " not in line:
            raise RuntimeError(f"fake_vllm did not start: {line!r}")
        urls.append(line.split(" on ", 1)[1].strip())
    return proc, urls


async def one_run(
    policy: str,
    spec: ChatSpec,
    replicas: list[str],
    *,
    workdir: Path,
    core: int | None,
    workers: int = 1,
) -> dict[str, Any]:
    contender = rb.gateway_contender(policy, workers)
    async with rb.in_front(contender, replicas, MODEL, workdir=workdir, core=core) as url:
        await rb.reset_caches(replicas)
        summary = await run_chat(replace(spec, url=url, metrics=tuple(replicas)))
        stats = await rb.fake_stats(replicas[0])
    if isinstance(contender, rb.CheckedGateway):
        summary.update(rb.checked_report(workdir, contender))
    summary["policy"] = policy if workers == 1 else f"{policy} x{workers} workers"
    # The same ratio as the fakes saw the requests land (their view lags the gateway's).
    summary["landed_peak"] = round(stats.get("cluster_peak_ratio", 0.0), 3)
    return summary


def row(run: dict[str, Any]) -> list[object]:
    ttft = run["ttft_ms"]
    return [
        run["offered_qps"],
        run["policy"],
        f"{ttft.get('p50', 0):.0f}",
        f"{ttft.get('p90', 0):.0f}",
        f"{ttft.get('p99', 0):.0f}",
        f"{run['req_per_s']:.1f}",
        f"{run['output_tokens_per_s']:.0f}",
        run["errors"],
        f"{run['hit_rate']:.3f}",
        f"{run['max_share']:.1%}",
        f"{run['load_bound_peak']:.2f}" if "load_bound_peak" in run else "-",
    ]


HEADERS = [
    "offered req/s",
    "policy",
    "TTFT p50 ms",
    "p90 ms",
    "p99 ms",
    "req/s",
    "output tok/s",
    "errors",
    "hit rate",
    "busiest replica",
    "peak load / (avg+1)",
]


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for policy in dict.fromkeys(r["policy"] for r in runs):
        mine = sorted((r for r in runs if r["policy"] == policy), key=lambda r: r["offered_qps"])
        if not mine:
            continue
        loads = [r["offered_qps"] for r in mine]
        left.plot(loads, [r["ttft_ms"]["p50"] for r in mine], marker="o", label=policy)
        right.plot(loads, [r["req_per_s"] for r in mine], marker="o", label=policy)
    left.set_yscale("log")
    left.set(xlabel="offered requests/s", ylabel="TTFT p50 (ms, log)", title="First token")
    right.set(xlabel="offered requests/s", ylabel="served requests/s", title="Throughput")
    for axes in (left, right):
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.suptitle("8 simulated vLLM replicas (Llama-3.1-8B on H100), multi-round chat")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


async def main_async(args: argparse.Namespace) -> int:
    cores = os.cpu_count() or 1
    gateway_core, load_core = (0, 1) if cores >= 2 else (None, None)
    if load_core is not None:
        os.sched_setaffinity(0, {load_core})
    load = await rb.wait_quiet()
    policies = [p for p in args.policies.split(",") if p]
    loads = [float(q) for q in args.loads.split(",") if q]
    base = ChatSpec(
        url="",
        model=MODEL,
        users=args.users,
        rounds=args.rounds,
        system_words=args.system_words,
        context_words=args.context_words,
        question_words=20,
        answer_tokens=args.answer_tokens,
        duration_s=args.duration,
    )
    runs: list[dict[str, Any]] = []
    proc, replicas = await start_fakes(args.replicas, load_core)
    try:
        with tempfile.TemporaryDirectory(prefix="routing-sim-") as tmp:
            workdir = Path(tmp)

            async def run_one(policy: str, spec: ChatSpec) -> dict[str, Any]:
                return await one_run(
                    policy,
                    spec,
                    replicas,
                    workdir=workdir,
                    core=gateway_core,
                    workers=args.workers,
                )

            for number, qps in enumerate(loads):
                order = policies if number % 2 == 0 else policies[::-1]
                for policy in order:
                    run = await run_one(policy, replace(base, qps=qps))
                    runs.append(run)
                    print(" | ".join(str(c) for c in row(run)), file=sys.stderr, flush=True)
            no_reuse: list[dict[str, Any]] = []
            if args.no_reuse_rounds:
                qps = args.no_reuse_qps or max(loads)
                for number in range(args.no_reuse_rounds):
                    pair = ["round_robin", "prefix"]
                    for policy in pair if number % 2 == 0 else pair[::-1]:
                        spec = replace(base, qps=qps, no_reuse=True, seed=number + 1)
                        run = await run_one(policy, spec)
                        no_reuse.append(run)
                        print("no-reuse " + " | ".join(str(c) for c in row(run)), file=sys.stderr)
    finally:
        proc.terminate()
        await proc.communicate()
    report = render(args, runs, no_reuse, load)
    print(report)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing_sim.md").write_text(report + "\n")
    rb.write_json(out / "routing_sim.json", {"runs": runs, "no_reuse": no_reuse})
    plot(runs, out / "routing_sim.png")
    return 0


def render(
    args: argparse.Namespace,
    runs: list[dict[str, Any]],
    no_reuse: list[dict[str, Any]],
    load: tuple[float, ...],
) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Routing by simulation ({when})",
        "",
        f"`{' '.join(sys.argv)}`: {args.replicas} fake replicas with the cache model "
        f"(bench/cache_model.py), {args.users} user sessions of {args.rounds} rounds for "
        f"{args.duration:g} s, system prompt {args.system_words} words, own context "
        f"{args.context_words} words, answers {args.answer_tokens} tokens, gateway workers "
        f"{args.workers}. Load average at start: {load[0]:.2f}.",
        "",
        rb.markdown_table(HEADERS, [row(run) for run in runs]),
    ]
    if no_reuse:
        lines += [
            "",
            "No-reuse workload (fresh random prompts, same sizes), alternating pairs:",
            "",
            rb.markdown_table(HEADERS, [row(run) for run in no_reuse]),
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--replicas", type=int, default=8)
    add("--users", type=int, default=256)
    add("--rounds", type=int, default=4)
    add("--system-words", type=int, default=600, help="about 1,000 tokens at 4 bytes a token")
    add("--context-words", type=int, default=1200, help="about 2,000 tokens")
    add("--answer-tokens", type=int, default=100)
    add("--duration", type=float, default=20.0, help="seconds of offered load per run")
    add("--loads", default="20,40,60,70", help="offered requests/s, comma-separated")
    add(
        "--policies",
        default=",".join(rb.POLICIES),
        help="GATEWAY_ROUTING values; prefix+hash is prefix with GATEWAY_PREFIX_MISS=hash",
    )
    add("--workers", type=int, default=1, help="GATEWAY_WORKERS of the gateway")
    add("--no-reuse-rounds", type=int, default=2, help="alternating pairs; 0 skips it")
    add("--no-reuse-qps", type=float, default=0.0, help="default: the highest load")
    add("--out-dir", default=str(RESULTS))
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
