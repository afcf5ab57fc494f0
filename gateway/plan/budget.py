"""One vLLM instance's budget, the way vLLM 0.32 spends `--gpu-memory-utilization`.

- The budget: `requested = ceil(total * utilization)` on each of its GPUs, `total` being
  what cudaMemGetInfo reports (v1/worker/utils.py request_memory).
- The startup check: the process's free memory at its snapshot, taken after its CUDA
  context and NCCL are set up, must be at least `requested`, or vLLM stops with "Free
  memory on device ... on startup is less than desired GPU memory utilization"
  (request_memory, called from gpu_worker.py init_device).
- The KV cache gets what is left: `requested - (weights + activation peak + non-torch
  growth) - CUDA-graph estimate`, logged as "Available KV cache memory"
  (gpu_worker.py determine_available_memory). Under tensor parallelism every rank does
  this and all take the smallest rank's block count (kv_cache_utils.py
  get_kv_cache_configs).
"""

from __future__ import annotations

import dataclasses
import math

from gateway.plan import kv as kvmod
from gateway.plan import overheads
from gateway.plan.architecture import Architecture, check_tensor_parallel
from gateway.plan.gpus import Gpu
from gateway.plan.overheads import Estimate, Overrides
from gateway.plan.request import ModelRequest
from gateway.plan.weights import Weights

UTIL_STEP = 10_000  # utilizations are printed with four decimals
DEFAULT_MAX_NUM_SEQS = 1024  # engine/arg_utils.py get_batch_defaults, GPUs of 70 GiB or more
IN_FLIGHT_BATCHES = 2  # config/vllm.py max_concurrent_batches with async scheduling


class BudgetError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Instance:
    index: int
    request: ModelRequest
    arch: Architecture
    weights: Weights
    kv: kvmod.KvLayout
    max_model_len: int
    batched_tokens: int
    batched_source: str
    in_flight_tokens: int
    seqs: int | None
    weights_bytes: int
    activation: Estimate
    non_torch: Estimate
    cudagraph: Estimate
    context: Estimate
    nccl: Estimate
    margin: Estimate

    @property
    def tp(self) -> int:
        return self.request.tp

    @property
    def non_kv_bytes(self) -> int:
        """Charged to the budget before the KV cache, on each rank."""
        return (
            self.weights_bytes + self.activation.bytes + self.non_torch.bytes + self.cudagraph.bytes
        )

    @property
    def outside_bytes(self) -> int:
        """Taken from the GPU besides the budget, by each rank's process."""
        return self.context.bytes + self.nccl.bytes + self.margin.bytes

    @property
    def blocks_per_request(self) -> int:
        return self.kv.blocks_per_request(self.max_model_len, self.in_flight_tokens)

    @property
    def kv_needed_bytes(self) -> int:
        if self.request.kv_target is not None:
            return max(
                self.request.kv_target,
                self.kv.bytes_for(1, self.max_model_len, self.in_flight_tokens),
            )
        return self.kv.bytes_for(self.seqs or 1, self.max_model_len, self.in_flight_tokens)

    @property
    def min_requested(self) -> int:
        return self.non_kv_bytes + self.kv_needed_bytes


def build(
    index: int,
    request: ModelRequest,
    arch: Architecture,
    weights: Weights,
    gpus: list[Gpu],
    overrides: Overrides,
    *,
    in_flight_batches: int = IN_FLIGHT_BATCHES,
    kernel_multiple: int = kvmod.GPU_KERNEL_BLOCK_MULTIPLE,
) -> Instance:
    check_tensor_parallel(arch, request.tp)
    max_len = request.max_model_len or arch.max_model_len
    if request.max_model_len and request.max_model_len > arch.max_model_len:
        raise BudgetError(
            f"{request.label()}: len={request.max_model_len} is above the model's "
            f"{arch.max_model_len}, which vLLM refuses"
        )
    if request.max_num_batched_tokens is not None:
        batched, batched_source = request.max_num_batched_tokens, "given (mnbt=)"
    else:
        # The largest default among the GPUs it may land on: a larger profile run is the
        # safe side of the estimate.
        tokens, source = max(overheads.default_batched_tokens(g) for g in gpus)
        # arg_utils.py: never above max_num_seqs * max_model_len.
        batched, batched_source = min(tokens, DEFAULT_MAX_NUM_SEQS * max_len), source
    layers = kvmod.layer_kv(arch, request.tp, request.kv_dtype)
    layout = kvmod.layout(layers, request.block_size or kvmod.GPU_BLOCK_SIZE, kernel_multiple)
    # kv= asks for a KV size instead of a number of full-length requests.
    seqs = None if request.kv_target is not None else (request.seqs or 1)
    return Instance(
        index=index,
        request=request,
        arch=arch,
        weights=weights,
        kv=layout,
        max_model_len=max_len,
        batched_tokens=batched,
        batched_source=batched_source,
        in_flight_tokens=in_flight_batches * batched,
        seqs=seqs,
        weights_bytes=weights.bytes_per_rank(arch, request.tp),
        activation=overheads.activation(
            arch,
            batched,
            request.activation if request.activation is not None else overrides.activation,
            "act=" if request.activation is not None else "--activation-gib",
        ),
        non_torch=overheads.non_torch(request.tp, overrides.non_torch),
        cudagraph=overheads.cudagraph(
            request.eager,
            request.cudagraph if request.cudagraph is not None else overrides.cudagraph,
            "graphs=" if request.cudagraph is not None else "--cudagraph-gib",
        ),
        context=overheads.context(overrides.context),
        nccl=overheads.nccl(request.tp, overrides.nccl),
        margin=overheads.margin(overrides.margin),
    )


def requested_bytes(total: int, util: float) -> int:
    """v1/worker/utils.py request_memory: math.ceil(total_memory * gpu_memory_utilization)."""
    return math.ceil(total * util)


def util_at_least(needed: int, totals: list[int]) -> float:
    """The smallest four-decimal utilization whose budget is `needed` on every GPU."""
    steps = max(math.ceil(needed * UTIL_STEP / total) for total in totals)
    while any(requested_bytes(t, steps / UTIL_STEP) < needed for t in totals):
        steps += 1
    return steps / UTIL_STEP


def util_at_most(allowed: int, total: int) -> float:
    """The largest four-decimal utilization whose budget stays within `allowed`."""
    steps = max(0, allowed * UTIL_STEP // total)
    while steps and requested_bytes(total, steps / UTIL_STEP) > allowed:
        steps -= 1
    return steps / UTIL_STEP


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What vLLM will log for an instance at a utilization."""

    util: float
    requested: tuple[int, ...]  # per GPU of the instance
    available_kv: int  # "Available KV cache memory", the smallest rank's
    num_blocks: int
    tokens: int  # "GPU KV cache size: N tokens"
    concurrency: float  # "Maximum concurrency for L tokens per request: Cx"
    holds: int  # requests at max_model_len that fit past the null block
    starts: bool  # vLLM's own check that one request fits


def outcome(instance: Instance, util: float, totals: list[int]) -> Outcome:
    requested = tuple(requested_bytes(t, util) for t in totals)
    available = min(requested) - instance.non_kv_bytes
    blocks = instance.kv.num_blocks(available)
    tokens, concurrency = instance.kv.capacity(
        blocks, instance.max_model_len, instance.in_flight_tokens
    )
    holds = max(0, blocks - 1) // instance.blocks_per_request
    starts = instance.kv.fits(available, instance.max_model_len, instance.in_flight_tokens)
    return Outcome(util, requested, available, blocks, tokens, concurrency, holds, starts)
