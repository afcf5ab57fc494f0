"""A multi-round chat workload, shaped like production-stack's benchmarks/multi-round-qa.

N users chat at once, M rounds each. A user's first message is a system prompt every user
shares plus a context of its own; each round appends the previous answer and a new question,
so every request resends the whole conversation so far, as chat clients do. Users pace
themselves so that all together they offer ``qps`` requests a second: each user's rounds are
due at random (Poisson) times, N/qps seconds apart on average, and a round waits for the
previous answer if that comes later (qps 0: each round as soon as the previous answer is in).
Random rather than fixed gaps: with fixed ones, N users a multiple of the replica count put
each user on the same replica every round under round-robin, which real traffic never does.
With ``--duration`` the N users are sessions: a user who has had its M rounds is replaced by
a new one, so the offered load holds steady, and no round starts after the duration.
``--no-reuse`` sends fresh random prompts instead: nothing to reuse anywhere.

Reported: TTFT p50/p90/p99 (request sent to first SSE event), request and output-token
throughput, errors; and from each replica's /metrics (``--metrics URL``, repeatable), vLLM's
prefix-cache hit rate (the deltas of vllm:prefix_cache_hits_total over
vllm:prefix_cache_queries_total) and each replica's share of the requests (the deltas of
vllm:request_success_total).

    python bench/chat_workload.py --url http://127.0.0.1:8080 --model m --users 16 \\
        --rounds 5 --qps 4 --metrics http://127.0.0.1:8001 --metrics http://127.0.0.1:8002
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

if __package__ in (None, ""):  # run as a script: make `bench.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sse_client import percentiles  # noqa: E402

# Words the tiny test models' tokenizer was trained on (bench/tiny_models.py), so that a word
# is about one token there; for the fake, a token is 4 bytes whatever the words.
WORDS = (
    "the gateway a replica router each client scheduler worker server this request stream "
    "engine queue model sends reads forwards waits retries drops counts streams balances "
    "returns caches measures rejects accepts closes tokens response every chunk headers its "
    "metrics prompt timeout error one connection backlog new requests usage quickly again "
    "before deadline under load port without copying in order when it is healthy for user"
).split()

_METRIC = re.compile(rb"^(vllm:[a-z_]+)(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.M)
READ = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")
SUCCESS = "vllm:request_success_total"


@dataclass(frozen=True)
class ChatSpec:
    url: str
    model: str
    users: int = 16
    rounds: int = 5
    qps: float = 0.0  # 0: every user sends its next round as soon as it has the answer
    system_words: int = 1000
    context_words: int = 2000
    question_words: int = 30
    answer_tokens: int = 100
    no_reuse: bool = False
    user_header: str = ""  # e.g. X-User-ID: send each user's id in it
    ignore_eos: bool = True  # vLLM's extension: every answer runs to answer_tokens
    timeout_s: float = 600.0
    seed: int = 1
    metrics: tuple[str, ...] = ()
    duration_s: float = 0.0  # > 0: users are replaced as they finish, until this is over


@dataclass
class Result:
    ttft_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    first_error: str = ""

    def error(self, kind: str, detail: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        self.first_error = self.first_error or detail[:300]


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def parse_metrics(text: bytes) -> dict[str, float]:
    """vLLM's counters by name, summed over their labels."""
    values: dict[str, float] = {}
    for name, value in _METRIC.findall(text):
        key = name.decode()
        values[key] = values.get(key, 0.0) + float(value)
    return values


async def scrape(session: aiohttp.ClientSession, urls: Sequence[str]) -> list[dict[str, float]]:
    async def one(url: str) -> dict[str, float]:
        async with session.get(url.rstrip("/") + "/metrics") as response:
            return parse_metrics(await response.read())

    return list(await asyncio.gather(*(one(url) for url in urls)))


def cache_figures(
    urls: Sequence[str], before: list[dict[str, float]], after: list[dict[str, float]]
) -> dict[str, Any]:
    """Hit rate over all replicas and each replica's share of the requests."""

    def delta(index: int, name: str) -> float:
        return after[index].get(name, 0.0) - before[index].get(name, 0.0)

    queries = sum(delta(i, READ[0]) for i in range(len(urls)))
    hits = sum(delta(i, READ[1]) for i in range(len(urls)))
    served = [delta(i, SUCCESS) for i in range(len(urls))]
    total = sum(served) or 1.0
    return {
        "hit_rate": round(hits / queries, 4) if queries else 0.0,
        "queried_tokens": int(queries),
        "hit_tokens": int(hits),
        "replica_requests": [int(n) for n in served],
        "replica_share": [round(n / total, 4) for n in served],
        "max_share": round(max(served) / total, 4) if served else 0.0,
        "replica_hit_rate": [
            round(delta(i, READ[1]) / delta(i, READ[0]), 4) if delta(i, READ[0]) else 0.0
            for i in range(len(urls))
        ],
    }


class User:
    """One user's conversation: the messages so far and the next question."""

    __slots__ = ("number", "messages", "rng", "spec", "system")

    def __init__(self, number: int, spec: ChatSpec, system: str) -> None:
        self.number = number
        self.spec = spec
        self.rng = random.Random(spec.seed * 1_000_003 + number)
        self.system = system
        self.messages: list[dict[str, str]] = []

    def request(self) -> dict[str, Any]:
        spec, rng = self.spec, self.rng
        if spec.no_reuse:
            # A fresh prompt of the same size as a first round: nothing in any cache.
            fresh = words(rng, spec.system_words + spec.context_words + spec.question_words)
            self.messages = [{"role": "user", "content": f"{rng.random()} {fresh}"}]
        elif not self.messages:
            context = f"I am user {self.number}. " + words(rng, spec.context_words)
            self.messages = [
                {"role": "system", "content": self.system},
                {"role": "user", "content": context + "\n" + words(rng, spec.question_words)},
            ]
        else:
            self.messages.append({"role": "user", "content": words(rng, spec.question_words)})
        return {
            "model": spec.model,
            "messages": self.messages,
            "max_tokens": spec.answer_tokens,
            "stream": True,
            **({"ignore_eos": True} if spec.ignore_eos else {}),
        }

    def answered(self, text: str) -> None:
        if not self.spec.no_reuse:
            self.messages.append({"role": "assistant", "content": text})


async def one_round(
    session: aiohttp.ClientSession, spec: ChatSpec, user: User, result: Result
) -> None:
    body = json.dumps(user.request()).encode()
    headers = {"Content-Type": "application/json"}
    if spec.user_header:
        headers[spec.user_header] = f"user-{user.number}"
    started = time.perf_counter()
    first = 0.0
    pieces: list[str] = []
    tokens = 0
    try:
        async with session.post(
            spec.url.rstrip("/") + "/v1/chat/completions", data=body, headers=headers
        ) as response:
            if response.status != 200:
                result.error(f"status_{response.status}", (await response.read()).decode())
                user.answered("")
                return
            buffer = b""
            done = False
            async for chunk in response.content.iter_any():
                if not first:
                    first = time.perf_counter()
                buffer += chunk
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    data = event.removeprefix(b"data: ")
                    if data == b"[DONE]":
                        done = True
                        continue
                    document = json.loads(data)
                    if "error" in document:
                        result.error("stream_error", data.decode())
                        continue
                    for choice in document.get("choices", ()):
                        content = choice.get("delta", {}).get("content")
                        if content:
                            pieces.append(content)
                            tokens += 1
            if not done:
                result.error("truncated", "no [DONE]")
                user.answered("".join(pieces))
                return
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        result.error(type(exc).__name__, repr(exc))
        user.answered("".join(pieces))
        return
    result.ttft_s.append(first - started)
    result.total_s.append(time.perf_counter() - started)
    result.output_tokens += tokens
    user.answered("".join(pieces))


async def run_chat(spec: ChatSpec) -> dict[str, Any]:
    """Run every user's rounds and return the summary (what the CLI prints as JSON)."""
    system = words(random.Random(spec.seed), spec.system_words)
    users = [User(number, spec, system) for number in range(spec.users)]
    result = Result()
    gap = spec.users / spec.qps if spec.qps > 0 else 0.0
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        before = await scrape(session, spec.metrics) if spec.metrics else []
        loop = asyncio.get_running_loop()
        start = loop.time()

        end = start + spec.duration_s if spec.duration_s else float("inf")

        async def converse(user: User) -> None:
            timing = random.Random(spec.seed * 7919 + user.number)
            due = start + timing.random() * gap
            while True:
                for _ in range(spec.rounds):
                    if due >= end:
                        return
                    delay = due - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    due += timing.expovariate(1 / gap) if gap else 0.0
                    await one_round(session, spec, user, result)
                if not spec.duration_s:
                    return
                user = User(user.number + spec.users, spec, system)
                started.append(user.number)

        started: list[int] = []
        await asyncio.gather(*(converse(user) for user in users))
        elapsed = loop.time() - start
        after = await scrape(session, spec.metrics) if spec.metrics else []
    done = len(result.ttft_s)
    summary: dict[str, Any] = {
        "users": spec.users + len(started),
        "rounds": spec.rounds,
        "duration_s": spec.duration_s,
        "offered_qps": spec.qps,
        "requests_ok": done,
        "errors": result.errors,
        "error_kinds": result.error_kinds,
        "first_error": result.first_error,
        "elapsed_s": round(elapsed, 3),
        "req_per_s": round(done / elapsed, 3) if elapsed else 0.0,
        "output_tokens_per_s": round(result.output_tokens / elapsed, 1) if elapsed else 0.0,
        "ttft_ms": percentiles(result.ttft_s),
        "total_ms": percentiles(result.total_s),
    }
    if spec.metrics:
        summary["replicas"] = list(spec.metrics)
        summary.update(cache_figures(spec.metrics, before, after))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--url", required=True, help="the gateway, a router, or one vLLM server")
    add("--model", required=True)
    add("--users", type=int, default=16)
    add("--rounds", type=int, default=5)
    add("--qps", type=float, default=0.0, help="requests a second from all users; 0: no pause")
    add("--system-words", type=int, default=1000, help="the shared system prompt")
    add("--context-words", type=int, default=2000, help="each user's own first context")
    add("--question-words", type=int, default=30)
    add("--answer-tokens", type=int, default=100)
    add("--no-reuse", action="store_true", help="fresh random prompts, nothing to reuse")
    add("--user-header", default="", help="send each user's id in this header (X-User-ID)")
    add("--metrics", action="append", default=[], help="a replica's base URL (repeatable)")
    add("--seed", type=int, default=1)
    add("--duration", type=float, default=0.0, help="seconds; users replaced as they finish")
    args = parser.parse_args(argv)
    spec = ChatSpec(
        url=args.url,
        model=args.model,
        users=args.users,
        rounds=args.rounds,
        qps=args.qps,
        system_words=args.system_words,
        context_words=args.context_words,
        question_words=args.question_words,
        answer_tokens=args.answer_tokens,
        no_reuse=args.no_reuse,
        user_header=args.user_header,
        seed=args.seed,
        metrics=tuple(args.metrics),
        duration_s=args.duration,
    )
    summary = asyncio.run(run_chat(spec))
    print(json.dumps(summary, indent=2))
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
