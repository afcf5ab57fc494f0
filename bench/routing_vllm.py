"""Routing policies in front of real vLLM (CPU build): prefix-cache hit rate and balance.

    python bench/routing_vllm.py                  # every contender, one table
    python bench/routing_vllm.py --contenders single,prefix,vllm-router:consistent_hash

Three vLLM servers of one tiny model (bench/tiny_models.py), started with
VLLM_SERVER_DEV_MODE=1 so that POST /reset_prefix_cache empties a cache between runs:
two replicas under KV-cache pressure (--num-gpu-blocks-override BLOCKS; a CPU block is 128
tokens), each with its own core (VLLM_CPU_OMP_THREADS_BIND 0 and 1), and one with twice the
blocks that serves the whole load alone: `single`, the ceiling of the hit rate (every reuse
lands on one cache as large as the two together). The gateway, vllm-router and this process
(the multi-round chat workload of chat_workload.py) are not pinned: on two cores they compete
with the replicas, so TTFT here says more about CPU contention than about routing; decide on
the hit rate and the balance.

Contenders, each after every cache was emptied: `single`; the gateway with each
GATEWAY_ROUTING policy; vllm-router with --policy round_robin, cache_aware and
consistent_hash, the last one given each user's id in an X-User-ID header (no other
contender gets that header). Reported from the replicas' own /metrics: the hit rate
(Δ vllm:prefix_cache_hits_total / Δ vllm:prefix_cache_queries_total), each replica's share of
the requests (Δ vllm:request_success_total), and the workload's TTFT, throughput and errors.
Written to bench/results/routing_vllm.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import re
import shutil
import subprocess
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
from bench.vllm_servers import DEFAULT_VENV, ServerSpec, start_servers  # noqa: E402

MODEL = "tiny-chat"
RESULTS = Path(__file__).resolve().parent / "results"
MODELS = Path.home() / ".cache/vllm-gateway/models"
ALL = (
    "single",
    *(f"gateway:{policy}" for policy in rb.POLICIES),
    *(f"vllm-router:{policy}" for policy in rb.ROUTER_POLICIES),
)


def contender_for(name: str) -> tuple[cs.Contender | None, str]:
    """The contender to start (None: straight to the single server), and the user header.

    `gateway:prefix@1.5` is the prefix policy with GATEWAY_PREFIX_LOAD_FACTOR=1.5; the whole
    syntax is routing_bench.gateway_contender's (`gateway:prefix+hash/2`: hashed misses, two
    workers).
    """
    kind, _, policy = name.partition(":")
    if kind == "single":
        return None, ""
    if kind == "gateway":
        return rb.gateway_contender(policy), ""
    return rb.RoutedVllmRouter(policy), "X-User-ID" if policy == "consistent_hash" else ""


def make_model(venv: Path) -> Path:
    path = MODELS / "tiny-b"
    subprocess.run(
        [str(venv / "bin/python"), str(cs.BENCH / "tiny_models.py"), str(path), "--seed", "1"],
        check=True,
    )
    return path


async def one_run(
    name: str, spec: ChatSpec, replicas: list[str], single: str, log_dir: Path
) -> dict[str, Any]:
    contender, header = contender_for(name)
    urls = [single] if contender is None else replicas
    with tempfile.TemporaryDirectory(prefix="routing-vllm-") as tmp:
        async with rb.in_front(contender, urls, MODEL, workdir=Path(tmp), core=None) as url:
            await rb.reset_caches([*replicas, single])
            summary = await run_chat(
                replace(spec, url=url, metrics=tuple(urls), user_header=header)
            )
        if isinstance(contender, rb.CheckedGateway):
            summary.update(rb.checked_report(Path(tmp), contender))
        if contender is not None:
            # The router's own log, kept beside the servers' for a look at any error.
            log = Path(tmp) / f"{contender.name}.log"
            if log.exists():
                shutil.copyfile(log, log_dir / f"{name.replace('/', '_')}.log")
    summary["contender"] = name
    return summary


def render(runs: list[dict[str, Any]], args: argparse.Namespace, spec: ChatSpec) -> str:
    ceiling = next((r["hit_rate"] for r in runs if r["contender"] == "single"), None)
    rows = []
    for run in runs:
        ttft = run["ttft_ms"]
        gap = f"{run['hit_rate'] - ceiling:+.3f}" if ceiling is not None else "-"
        header = " (X-User-ID)" if "consistent_hash" in run["contender"] else ""
        state = run.get("routing_state") or {}
        spills = str(state["bound_spills"]) if state.get("index_capacity") else "-"
        rows.append(
            [
                run["contender"] + header,
                f"{run['hit_rate']:.3f}",
                gap,
                rb.shares(run),
                spills,
                f"{ttft.get('p50', 0):.0f} / {ttft.get('p90', 0):.0f} / {ttft.get('p99', 0):.0f}",
                f"{run['req_per_s']:.2f}",
                run["errors"],
            ]
        )
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Routing in front of real vLLM ({when})",
        "",
        f"`{' '.join(sys.argv)}`: vLLM CPU build, tiny model, two replicas with "
        f"{args.blocks} KV blocks of 128 tokens each (cores 0 and 1), `single` with "
        f"{2 * args.blocks}. {spec.users} users x {spec.rounds} rounds, back to back; system "
        f"prompt {spec.system_words} words, own context {spec.context_words} words, questions "
        f"{spec.question_words} words, answers {spec.answer_tokens} tokens.",
        "",
        rb.markdown_table(
            [
                "contender",
                "hit rate",
                "vs single",
                "requests per replica",
                "load-bound spills",
                "TTFT p50 / p90 / p99 ms",
                "req/s",
                "errors",
            ],
            rows,
        ),
    ]
    prefix = next((r for r in runs if r["contender"] == "gateway:prefix"), None)
    routers = [r for r in runs if r["contender"].startswith("vllm-router")]
    if prefix is not None:
        best = max((r["hit_rate"] for r in routers), default=0.0)
        lines += [
            "",
            f"gateway prefix: hit rate {prefix['hit_rate']:.3f}; best vllm-router policy "
            f"{best:.3f}; single {ceiling if ceiling is not None else float('nan'):.3f}; "
            f"busiest replica {prefix['max_share']:.0%} of the requests.",
        ]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    venv = Path(os.environ.get("VLLM_VENV") or DEFAULT_VENV)
    model = make_model(venv)
    names = [n for n in args.contenders.split(",") if n]
    unknown = [n for n in names if re.split("[+@/]", n)[0] not in ALL]
    if unknown:
        raise SystemExit(f"unknown contenders {unknown}; known: {', '.join(ALL)}")
    spec = ChatSpec(
        url="",
        model=MODEL,
        users=args.users,
        rounds=args.rounds,
        qps=0.0,
        system_words=args.system_words,
        context_words=args.context_words,
        question_words=args.question_words,
        answer_tokens=args.answer_tokens,
    )
    ports = [cs.free_port() for _ in range(3)]
    blocks = ("--num-gpu-blocks-override", str(args.blocks), "--enable-prefix-caching")
    double = ("--num-gpu-blocks-override", str(2 * args.blocks), "--enable-prefix-caching")
    specs = [
        ServerSpec(model, MODEL, ports[0], omp_threads_bind="0", extra_args=blocks),
        ServerSpec(model, MODEL, ports[1], omp_threads_bind="1", extra_args=blocks),
        ServerSpec(model, MODEL, ports[2], omp_threads_bind="0", extra_args=double),
    ]
    environ = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    print(f"starting 3 vLLM servers ({model}), a few minutes on two cores", file=sys.stderr)
    runs: list[dict[str, Any]] = []
    with start_servers(specs, venv=venv, environ=environ, log_dir=Path(args.log_dir)) as servers:
        replicas = [servers[0].base_url, servers[1].base_url]
        single = servers[2].base_url
        for name in names:
            run = await one_run(name, spec, replicas, single, Path(args.log_dir))
            runs.append(run)
            print(
                f"{name}: hit rate {run['hit_rate']:.3f}, shares {rb.shares(run)}, "
                f"errors {run['errors']}",
                file=sys.stderr,
                flush=True,
            )
    report = render(runs, args, spec)
    print(report)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing_vllm.md").write_text(report + "\n")
    rb.write_json(out / "routing_vllm.json", {"runs": runs})
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--contenders", default=",".join(ALL), help=f"comma-separated, of {', '.join(ALL)}")
    add("--blocks", type=int, default=64, help="KV blocks (128 tokens) of each replica")
    add("--users", type=int, default=12)
    add("--rounds", type=int, default=6)
    add("--system-words", type=int, default=150)
    add("--context-words", type=int, default=300)
    add("--question-words", type=int, default=20)
    add("--answer-tokens", type=int, default=24)
    add("--log-dir", default=str(Path(tempfile.gettempdir()) / "routing-vllm-logs"))
    add("--out-dir", default=str(RESULTS))
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
