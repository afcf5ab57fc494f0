"""What the routing benchmarks share: the contenders in front of several replicas, cache resets,
and the tables (used by routing_vllm.py, routing_sim.py and routing_cpu.py).

A contender here routes over every replica it is given: the gateway with one
GATEWAY_ROUTING policy, vllm-router with one --policy, or `single`, which is no router at
all: the load goes straight to one replica (the hit-rate ceiling: every reuse is on one cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from bench import contenders as cs

POLICIES = ("round_robin", "least_loaded", "prefix")
ROUTER_POLICIES = ("round_robin", "cache_aware", "consistent_hash")


class RoutedGateway(cs.Gateway):
    """The gateway over several replicas of one model with one routing policy."""

    def __init__(self, policy: str, **env: str) -> None:
        self.policy = policy
        self.name = f"gateway {policy}" + "".join(f" {v}" for v in env.values())
        self.about = f"vllm-gateway, GATEWAY_ROUTING={policy}"
        self.extra = env

    def env(self, upstream: str, model: str, port: int) -> dict[str, str]:
        # `upstream` is every replica's URL joined by "|", as GATEWAY_MODELS takes them.
        environ = super().env(upstream, model, port)
        environ["GATEWAY_ROUTING"] = self.policy
        environ.update(self.extra)
        return environ


class CheckedGateway(RoutedGateway):
    """The gateway run by serve_checked.py: at exit it reports the load bound of its picks
    and its routing state (see `checked_report`)."""

    def command(self, upstream: str, model: str, port: int, workdir: Path) -> list[str]:
        return [sys.executable, str(cs.BENCH / "serve_checked.py")]


def gateway_contender(spec: str, workers: int = 1) -> RoutedGateway:
    """The gateway a spec names: `POLICY[+MISS][@FACTOR][/WORKERS]`, e.g. `prefix+hash@1.25/2`
    is GATEWAY_ROUTING=prefix with GATEWAY_PREFIX_MISS=hash, GATEWAY_PREFIX_LOAD_FACTOR=1.25 and
    GATEWAY_WORKERS=2. One worker: the checked gateway, which reports its load bound; several:
    the plain `vllm-gateway`, each worker with its own index (serve_checked.py runs one)."""
    rest, _, count = spec.partition("/")
    rest, _, factor = rest.partition("@")
    policy, _, miss = rest.partition("+")
    workers = int(count) if count else workers
    env = {}
    if miss:
        env["GATEWAY_PREFIX_MISS"] = miss
    if factor:
        env["GATEWAY_PREFIX_LOAD_FACTOR"] = factor
    if workers > 1:
        return RoutedGateway(policy, GATEWAY_WORKERS=str(workers), **env)
    return CheckedGateway(policy, **env)


def checked_report(workdir: Path, contender: CheckedGateway) -> dict[str, Any]:
    """What a stopped CheckedGateway printed: the peak of its picks' in-flight count over
    (the average + 1), the picks, and its routing state."""
    found: dict[str, Any] = {}
    for line in (workdir / f"{contender.name}.log").read_text().splitlines():
        if line.startswith("load bound: "):
            checked = json.loads(line.removeprefix("load bound: "))
            found["load_bound_peak"] = round(checked["peak"], 3)
            found["picks"] = checked["picks"]
        elif line.startswith("routing state: "):
            found["routing_state"] = json.loads(line.removeprefix("routing state: "))
    return found


class RoutedVllmRouter(cs.VllmRouter):
    """vllm-router over several workers with one --policy."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.name = f"vllm-router {policy}"
        self.about = f"vllm-router --policy {policy}"

    def command(self, upstream: str, model: str, port: int, workdir: Path) -> list[str]:
        argv = super().command(upstream.split("|")[0], model, port, workdir)
        urls = upstream.split("|")
        at = argv.index("--worker-urls")
        argv[at + 1 : at + 2] = urls
        argv[argv.index("--policy") + 1] = self.policy
        return argv


def chat_probe(url: str, model: str) -> bytes:
    """One streamed chat request of one token, to see a contender pass a stream."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 1,
            "stream": True,
        }
    ).encode()
    host = url.removeprefix("http://")
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@contextlib.asynccontextmanager
async def in_front(
    contender: cs.Contender | None,
    replicas: Sequence[str],
    model: str,
    *,
    workdir: Path,
    core: int | None,
) -> AsyncIterator[str]:
    """The URL to send the load to: a contender started over `replicas`, or (None) the first
    replica itself."""
    if contender is None:
        yield replicas[0]
        return
    async with cs.start(
        contender,
        upstream="|".join(replicas),
        model=model,
        probe_request=chat_probe(replicas[0], model),
        workdir=workdir,
        core=core,
    ) as target:
        yield target.url


async def reset_caches(urls: Sequence[str]) -> None:
    """Empty every replica's prefix cache (vLLM: POST /reset_prefix_cache, which needs
    VLLM_SERVER_DEV_MODE=1) and the fakes' counters."""
    async with aiohttp.ClientSession() as session:
        for url in urls:
            async with session.post(url + "/reset_prefix_cache") as response:
                if response.status != 200:
                    raise RuntimeError(f"{url}/reset_prefix_cache answered {response.status}")
            async with session.post(url + "/stats/reset") as response:
                await response.read()  # the fake's; vLLM answers 404, which is fine


async def fake_stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url + "/stats") as response:
        stats: dict[str, Any] = await response.json()
        return stats


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def shares(figures: dict[str, Any]) -> str:
    return " / ".join(f"{share:.0%}" for share in figures.get("replica_share", ()))


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


async def wait_quiet(max_load: float = 1.5, wait_s: float = 60.0) -> tuple[float, ...]:
    """Wait once if the machine is busy; the load average it starts with."""
    import os

    load = os.getloadavg()
    if load[0] > max_load:
        await asyncio.sleep(wait_s)
        load = os.getloadavg()
    return load
