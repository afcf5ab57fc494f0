"""A vLLM engine's prefix cache and timing, simulated, for the fake vLLM (``fake_vllm.py``).

One ``CacheModel`` per fake replica. A request is admitted when one of ``max_running`` slots
is free (a FIFO queue before that, as vLLM's waiting queue), then:

1. its prompt is cut into blocks of ``block_tokens`` tokens, each named by a hash chained
   from the first block, as vLLM names KV-cache blocks; the leading blocks found in the LRU
   cache are hits, the rest must be computed;
2. prefill: the uncached tokens take ``prefill_us_per_token`` each on the replica's one
   compute engine, shared FIFO by every request (prefill is compute-bound: two prefills on
   one GPU do not go faster than one after the other); the first token is sent when it ends;
3. the prompt's blocks enter the cache (least recently used out first past ``cache_blocks``);
4. decode: each further token takes ``decode_ms_per_token``, concurrently with the other
   running requests (decode is memory-bound and batched), and the slot is freed at the end.

Tokens are counted as ``bytes_per_token`` bytes of prompt text (role tags and contents for
chat, the prompt for completions); only whole blocks are cached, as in vLLM.

Where the defaults come from: Llama-3.1-8B-Instruct in BF16 on one H100-80GB under vLLM.
- KV cache: 32 layers x 8 KV heads x 128 dims x 2 (K and V) x 2 bytes = 128 KiB a token;
  80 GB x 0.9 (vLLM's default gpu_memory_utilization) - 16 GB of weights - ~4 GB of
  activations leaves ~52 GB: ~400k tokens, 25,000 blocks of 16 tokens (vLLM's GPU block).
- Prefill: 2 x 8e9 FLOP a token; at ~50% of the H100's 989 dense BF16 TFLOP/s, 31 us a
  token (~32k tokens/s), the order vLLM reaches on long prompts.
- Decode: 10 ms a token, between the 6.5 ms TPOT p50 published for this model and GPU at
  concurrency 1-4 and 10.9 ms at 16 (vLLM 0.21, InferenceBench concurrency sweep).
- max_running: vLLM's default max_num_seqs, 256.
Simplifications: prefill does not slow decode (vLLM's chunked prefill shares each step
between them), decode time does not grow with the batch, and blocks of running requests can
be evicted (vLLM pins them). They make every policy's figures a bit better, not one policy's.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CacheSpec:
    cache_blocks: int = 25_000
    block_tokens: int = 16
    prefill_us_per_token: float = 31.0
    decode_ms_per_token: float = 10.0
    max_running: int = 256
    bytes_per_token: int = 4


def prompt_text(request: dict[str, Any]) -> bytes:
    """The prompt as the engine would see it: chat turns with role tags, or the prompt."""
    messages = request.get("messages")
    if isinstance(messages, list):
        parts = []
        for message in messages:
            if isinstance(message, dict):
                parts.append(f"<|{message.get('role')}|>\n{message.get('content')}\n")
        return "".join(parts).encode()
    prompt = request.get("prompt", request.get("input", ""))
    return str(prompt).encode()


class Cluster:
    """The fakes of one process, to check a router's load bound from where the load lands:
    at each arrival, the replica's active requests over (the average active + 1)."""

    __slots__ = ("models", "peak_ratio", "arrivals")

    def __init__(self) -> None:
        self.models: list[CacheModel] = []
        self.peak_ratio = 0.0
        self.arrivals = 0

    def arrived(self, model: CacheModel) -> None:
        self.arrivals += 1
        total = sum(m.active for m in self.models)
        ratio = model.active / (total / len(self.models) + 1)
        self.peak_ratio = max(self.peak_ratio, ratio)

    def reset(self) -> None:
        self.peak_ratio = 0.0
        self.arrivals = 0

    def __repr__(self) -> str:
        return f"<Cluster [{len(self.models)} replicas | peak ratio {self.peak_ratio:.2f}]>"


class CacheModel:
    """One simulated engine: its prefix cache, its compute engine, its running slots."""

    __slots__ = (
        "spec",
        "cluster",
        "active",
        "running",
        "queries",
        "hits",
        "success",
        "_blocks",
        "_slots",
        "_prefill_free_at",
    )

    def __init__(self, spec: CacheSpec, cluster: Cluster | None = None) -> None:
        self.spec = spec
        self.cluster = cluster
        if cluster is not None:
            cluster.models.append(self)
        self.active = 0  # admitted or waiting
        self.running = 0
        # vLLM's counters, in tokens: prompt tokens looked up and found in the cache.
        self.queries = 0
        self.hits = 0
        self.success = 0
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self._slots = asyncio.Semaphore(spec.max_running)
        self._prefill_free_at = 0.0

    def blocks_of(self, text: bytes) -> tuple[list[int], int]:
        """The chained hashes of the prompt's whole blocks, and its length in tokens."""
        spec = self.spec
        size = spec.block_tokens * spec.bytes_per_token
        chain = 0
        blocks = []
        for start in range(0, len(text) - size + 1, size):
            chain = hash((chain, text[start : start + size]))
            blocks.append(chain)
        return blocks, max(1, len(text) // spec.bytes_per_token)

    def reset(self) -> None:
        """As POST /reset_prefix_cache, plus the counters."""
        self._blocks.clear()
        self.queries = self.hits = self.success = 0

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """Hold a running slot, after waiting for one in arrival order."""
        self.active += 1
        if self.cluster is not None:
            self.cluster.arrived(self)
        try:
            async with self._slots:
                self.running += 1
                try:
                    yield
                finally:
                    self.running -= 1
        finally:
            self.active -= 1

    async def prefill(self, blocks: list[int], tokens: int) -> None:
        """Look the prompt up, compute what is not cached, and cache it; returns at the
        first token."""
        cache = self._blocks
        cached = 0
        for block in blocks:
            if block not in cache:
                break
            cache.move_to_end(block)
            cached += 1
        hit_tokens = cached * self.spec.block_tokens
        self.queries += tokens
        self.hits += hit_tokens
        # At least the last token is computed, as in vLLM, even on a full hit.
        compute_s = max(1, tokens - hit_tokens) * self.spec.prefill_us_per_token / 1e6
        loop = asyncio.get_running_loop()
        now = loop.time()
        done = max(now, self._prefill_free_at) + compute_s
        self._prefill_free_at = done
        await asyncio.sleep(done - now)
        for block in blocks[cached:]:
            cache[block] = None
        while len(cache) > self.spec.cache_blocks:
            cache.popitem(last=False)

    async def decode(self, tokens: int) -> None:
        """The tokens after the first."""
        if tokens > 1:
            await asyncio.sleep((tokens - 1) * self.spec.decode_ms_per_token / 1000)
        self.success += 1

    def metrics(self, model: str) -> bytes:
        """vLLM's own /metrics names for what the benchmarks read."""
        label = f'model_name="{model}"'
        lines = [
            f"vllm:prefix_cache_queries_total{{{label}}} {float(self.queries)}",
            f"vllm:prefix_cache_hits_total{{{label}}} {float(self.hits)}",
            f'vllm:request_success_total{{finished_reason="length",{label}}} {float(self.success)}',
            f"vllm:num_requests_running{{{label}}} {float(self.running)}",
            f"vllm:num_requests_waiting{{{label}}} {float(self.active - self.running)}",
        ]
        return ("\n".join(lines) + "\n").encode()

    def __repr__(self) -> str:
        return (
            f"<CacheModel [{len(self._blocks)} of {self.spec.cache_blocks} blocks | "
            f"{self.running} running, {self.active - self.running} waiting | "
            f"hits {self.hits} of {self.queries} tokens]>"
        )
