"""The overheads vLLM measures at startup, estimated here: each has a default, where the
default comes from, and an override for the figure from your own log.

In the budget (`--gpu-memory-utilization` x total), charged before the KV cache
(v1/worker/gpu_worker.py determine_available_memory):
- activation peak of the profile run at max_num_batched_tokens (transient_peak_headroom);
- non-torch memory that grows during the profile run (part of total_consumed);
- CUDA graphs, estimated before capture since v0.21 (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS,
  on by default).
Outside the budget, but taking free memory before vLLM's startup check
(gpu_worker.py init_device takes its snapshot after these are allocated):
- the process's CUDA context;
- NCCL communicators and all-reduce buffers under tensor parallelism;
- a safety margin: vLLM's own 150 MiB "redundancy buffer" for profiling's underestimate.
"""

from __future__ import annotations

import dataclasses

from gateway.plan.architecture import Architecture
from gateway.plan.gpus import Gpu
from gateway.plan.sizes import GiB, MiB


@dataclasses.dataclass(frozen=True)
class Estimate:
    bytes: int
    source: str


@dataclasses.dataclass(frozen=True)
class Overrides:
    """Global figures from the command line (bytes); None keeps the default."""

    activation: int | None = None
    non_torch: int | None = None
    cudagraph: int | None = None
    context: int | None = None
    nccl: int | None = None
    margin: int | None = None


# PR 10511's H100 log for `vllm serve meta-llama/Meta-Llama-3-8B` (8,192 batched tokens).
ACTIVATION_REFERENCE = (int(1.26 * GiB), 8192, 4096)
ACTIVATION_SOURCE = (
    'scaled from vLLM PR #10511\'s H100 log, "PyTorch activation peak memory 1.26GiB" for '
    "Meta-Llama-3-8B at 8,192 batched tokens, by batched tokens and hidden size; yours is "
    'the "GiB for peak activation" in vLLM\'s "Free memory on device ... Actual usage" line'
)
NON_TORCH_TP1 = Estimate(
    int(0.16 * GiB),
    'vLLM PR #12126\'s H100 log: "non_torch_memory takes 0.16GiB" (one GPU)',
)
NON_TORCH_TP = Estimate(
    int(0.20 * GiB),
    'vLLM PR #14447\'s tensor-parallel log: "non_torch_memory takes 0.20GiB"',
)
CUDAGRAPH = Estimate(
    1 * GiB,
    'vLLM\'s own capture notice "CUDA graphs can take additional 1~3 GiB memory per GPU" '
    "(quoted in mlcommons/inference#2267); logs of vLLM's estimate show less "
    "(0.09 GiB in noonghunna/club-3090#434, 0.36 GiB in gpustack/runner#251): use your "
    '"Estimated CUDA graph memory: X GiB total"',
)
EAGER = Estimate(0, "--enforce-eager: no CUDA graphs")
CONTEXT = Estimate(
    int(0.5 * GiB),
    "the CUDA context vLLM does not count (vllm-project/vllm#12059); one context measured "
    "555 MiB on a 188-SM GPU (ggml-org/llama.cpp#23604)",
)
NCCL = Estimate(
    int(1.79 * GiB),
    "vLLM PR #10511's H100 logs: non-torch memory 1.79 GiB at TP 1, 3.58 GiB at TP 2",
)
NO_NCCL = Estimate(0, "one GPU: no NCCL")
MARGIN = Estimate(
    150 * MiB,
    "vLLM's own 150 MiB redundancy buffer (gpu_worker.py compile_or_warm_up_model)",
)


def _given(value: int, what: str) -> Estimate:
    return Estimate(value, f"given ({what})")


def activation(
    arch: Architecture, batched_tokens: int, override: int | None, flag: str
) -> Estimate:
    if override is not None:
        return _given(override, flag)
    base, tokens, hidden = ACTIVATION_REFERENCE
    return Estimate(base * batched_tokens * arch.hidden // (tokens * hidden), ACTIVATION_SOURCE)


def non_torch(tp: int, override: int | None) -> Estimate:
    if override is not None:
        return _given(override, "--non-torch-gib")
    return NON_TORCH_TP1 if tp == 1 else NON_TORCH_TP


def cudagraph(eager: bool, override: int | None, flag: str) -> Estimate:
    if eager:
        return EAGER
    if override is not None:
        return _given(override, flag)
    return CUDAGRAPH


def context(override: int | None) -> Estimate:
    return CONTEXT if override is None else _given(override, "--context-gib")


def nccl(tp: int, override: int | None) -> Estimate:
    if tp == 1:
        return NO_NCCL
    return NCCL if override is None else _given(override, "--nccl-gib")


def margin(override: int | None) -> Estimate:
    return MARGIN if override is None else _given(override, "--margin-gib")


def default_batched_tokens(gpu: Gpu) -> tuple[int, str]:
    """`vllm serve`'s max_num_batched_tokens (engine/arg_utils.py get_batch_defaults)."""
    if gpu.total_bytes >= 160 * GiB:
        return 16384, "vLLM's default for `vllm serve` on a GPU of 160 GiB or more"
    if gpu.total_bytes >= 70 * GiB and "a100" not in gpu.name.lower():
        return 8192, "vLLM's default for `vllm serve` on a GPU of 70 GiB or more but an A100"
    return 2048, "vLLM's default for `vllm serve` on this GPU"
