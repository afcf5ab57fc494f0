"""The plan as text for people, JSON for tools, and a script that starts the servers in order."""

from __future__ import annotations

import json
import shlex
from typing import Any

from gateway.plan.budget import Instance
from gateway.plan.overheads import Estimate
from gateway.plan.placement import Overflow, Placed, Plan
from gateway.plan.sizes import gib, human


def serve_command(placed: Placed) -> list[str]:
    inst = placed.instance
    req = inst.request
    args = ["vllm", "serve", req.model, "--port", str(placed.port)]
    if req.name:
        args += ["--served-model-name", req.name]
    if req.tp > 1:
        args += ["--tensor-parallel-size", str(req.tp)]
    args += ["--gpu-memory-utilization", f"{placed.outcome.util:.4f}"]
    args += ["--max-model-len", str(inst.max_model_len)]
    if req.kv_dtype != "auto":
        args += ["--kv-cache-dtype", req.kv_dtype]
    if req.block_size:
        args += ["--block-size", str(req.block_size)]
    if req.max_num_batched_tokens:
        args += ["--max-num-batched-tokens", str(req.max_num_batched_tokens)]
    if req.dtype:
        args += ["--dtype", req.dtype]
    if req.eager:
        args.append("--enforce-eager")
    return args


def command_line(placed: Placed) -> str:
    devices = ",".join(str(i) for i in placed.gpus)
    return f"CUDA_VISIBLE_DEVICES={devices} " + shlex.join(serve_command(placed))


def backends(plan: Plan, host: str) -> str:
    ports = sorted((p.instance.index, p.port) for p in plan.placed)
    return "GATEWAY_BACKENDS=" + ",".join(f"http://{host}:{port}" for _, port in ports)


def _estimate(e: Estimate) -> dict[str, Any]:
    return {"bytes": e.bytes, "source": e.source}


def as_json(plan: Plan, host: str) -> str:
    instances = []
    for p in plan.placed:
        inst, out = p.instance, p.outcome
        instances.append(
            {
                "model": inst.request.model,
                "served_model_name": inst.request.name,
                "start_order": p.turn,
                "gpus": list(p.gpus),
                "port": p.port,
                "tensor_parallel_size": inst.tp,
                "gpu_memory_utilization": round(out.util, 4),
                "requested_bytes": list(out.requested),
                "max_model_len": inst.max_model_len,
                "kv_bytes_per_token": inst.kv.bytes_per_token,
                "kv_cache_bytes": out.available_kv,
                "kv_cache_dtype": inst.request.kv_dtype,
                "block_size": inst.kv.block_size,
                "bytes_per_block": inst.kv.bytes_per_block,
                "blocks_per_request": inst.blocks_per_request,
                "num_blocks": out.num_blocks,
                "kv_cache_tokens": out.tokens,
                "max_concurrency": out.concurrency,
                "requests_held": out.holds,
                "requests_asked": inst.seqs,
                "weights": {"bytes": inst.weights_bytes, "source": inst.weights.source},
                "max_num_batched_tokens": {
                    "tokens": inst.batched_tokens,
                    "source": inst.batched_source,
                },
                "estimates": {
                    "activation_peak": _estimate(inst.activation),
                    "non_torch": _estimate(inst.non_torch),
                    "cuda_graphs": _estimate(inst.cudagraph),
                    "cuda_context": _estimate(inst.context),
                    "nccl": _estimate(inst.nccl),
                    "margin": _estimate(inst.margin),
                },
                "startup_checks": [
                    {
                        "gpu": c.gpu,
                        "free_bytes": c.free_at_check,
                        "requested_bytes": c.requested,
                        "passes": c.passes,
                    }
                    for c in p.checks
                ],
                "command": command_line(p),
            }
        )
    body = {
        "fits": plan.fits,
        "gpus": [
            {
                "index": u.gpu.index,
                "name": u.gpu.name,
                "total_bytes": u.gpu.total_bytes,
                "total_source": u.gpu.source,
                "reserved_bytes": u.reserved,
                "planned_bytes": u.used,
                "free_bytes": u.free,
            }
            for u in plan.gpus
        ],
        "instances": instances,
        "gateway_backends": backends(plan, host).partition("=")[2],
        "overflow": [
            {
                "model": o.instance.request.model,
                "gpus": list(o.gpus),
                "short_by_bytes": o.short_by,
                "reason": o.reason,
                "fixes": [{"change": f.change, "detail": f.detail} for f in o.fixes],
            }
            for o in plan.overflow
        ],
    }
    return json.dumps(body, indent=2)


class _Sources:
    """Numbers each distinct source once, so a row reads `1.26 GiB [2]`."""

    __slots__ = ("notes",)

    def __init__(self) -> None:
        self.notes: list[str] = []

    def __repr__(self) -> str:
        return f"<_Sources {len(self.notes)} notes>"

    def ref(self, source: str) -> str:
        if source not in self.notes:
            self.notes.append(source)
        return f"[{self.notes.index(source) + 1}]"


def as_text(plan: Plan, host: str) -> str:
    notes = _Sources()
    lines: list[str] = []
    count = len(plan.placed) + len(plan.overflow)
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(
        f"vllm-gateway plan: {count} vLLM instance(s) on {len(plan.gpus)} GPU(s): {verdict}"
    )
    for u in plan.gpus:
        lines.append("")
        lines.append(
            f"GPU {u.gpu.index}  {u.gpu.name}: {gib(u.gpu.total_bytes)} total "
            f"{notes.ref(u.gpu.source)}"
        )
        for p in plan.placed:
            if u.gpu.index in p.gpus:
                req = p.outcome.requested[p.gpus.index(u.gpu.index)]
                lines.append(
                    f"  {p.turn}. {p.instance.request.label()}: "
                    f"--gpu-memory-utilization {p.outcome.util:.4f} = {gib(req)}, "
                    f"+ {gib(p.instance.outside_bytes)} outside vLLM's budget"
                )
        reserved = f" (and {gib(u.reserved)} reserved)" if u.reserved else ""
        lines.append(f"  left free: {gib(u.free)}{reserved}")
    for p in plan.placed:
        lines.extend(_instance_text(p, notes))
    for o in plan.overflow:
        lines.extend(_overflow_text(o))
    if plan.placed:
        lines.append("")
        lines.append(
            "Start them in this order, each once the previous answers /health "
            "(started together, each counts the other's loading as its own: vLLM issue 55827):"
        )
        lines.extend(f"  {command_line(p)}" for p in plan.placed)
        lines.append("")
        lines.append(backends(plan, host) + " vllm-gateway")
    lines.append("")
    lines.append("Where the numbers come from (override any estimate with what your logs print):")
    lines.extend(f"  [{n}] {note}" for n, note in enumerate(notes.notes, start=1))
    return "\n".join(lines) + "\n"


def _overflow_text(o: Overflow) -> list[str]:
    inst = o.instance
    where = ", ".join(str(g) for g in o.gpus) or "-"
    lines = [
        "",
        f"DOES NOT FIT: {inst.request.label()} (GPU {where}): {o.reason}, "
        f"short by {gib(o.short_by)}",
        f"    it needs a budget of {gib(inst.min_requested)} on each GPU (weights "
        f"{gib(inst.weights_bytes)}, KV {gib(inst.kv_needed_bytes)}, overheads "
        f"{gib(inst.non_kv_bytes - inst.weights_bytes)}) + {gib(inst.outside_bytes)} outside it",
    ]
    if o.fixes:
        lines.append("    any one of these makes it fit:")
        lines.extend(f"      {f.change:<24} {f.detail}" for f in o.fixes)
    else:
        lines.append(
            "    no single change tried makes it fit (fp8 KV, a shorter context, fewer "
            "requests, more tensor parallelism, more GPUs)"
        )
    return lines


def _row(label: str, size: int, text: str) -> str:
    return f"    {label:<13}{gib(size):>11}  {text}"


def _instance_text(p: Placed, notes: _Sources) -> list[str]:
    inst, out = p.instance, p.outcome
    kv = inst.kv
    dtype = inst.request.kv_dtype if inst.request.kv_dtype != "auto" else inst.arch.dtype
    asked = f"{inst.seqs} asked" if inst.seqs else f"KV target {gib(inst.request.kv_target or 0)}"
    batched = f"at {inst.batched_tokens:,} batched tokens {notes.ref(inst.batched_source)}"
    lines = [
        "",
        f"{p.turn}. {inst.request.label()}  (GPU {'+'.join(map(str, p.gpus))}, "
        f"tp {inst.tp}, port {p.port})",
        f"    budget       {', '.join(gib(r) for r in out.requested):>11}  "
        f"ceil({out.util:.4f} x total) per GPU",
        _row("weights", inst.weights_bytes, f"per GPU, {inst.weights.source}"),
        _row("activation", inst.activation.bytes, f"{batched} {notes.ref(inst.activation.source)}"),
        _row("non-torch", inst.non_torch.bytes, notes.ref(inst.non_torch.source)),
        _row("CUDA graphs", inst.cudagraph.bytes, notes.ref(inst.cudagraph.source)),
        _row("KV cache", out.available_kv, '= budget - the above: "Available KV cache memory"'),
        f"    KV/token    {human(kv.bytes_per_token):>11}  {kv.describe()}; "
        f"{_per_layer(inst)}; {dtype}",
        f"    blocks      {out.num_blocks:>11,}  of {kv.block_size} tokens, "
        f"{human(kv.bytes_per_block)} each; {inst.blocks_per_request:,} per request of "
        f"{inst.max_model_len:,} tokens",
        f'    capacity    {out.concurrency:>10.2f}x  "Maximum concurrency"; '
        f'"GPU KV cache size: {out.tokens:,} tokens"; holds {out.holds} full-length '
        f"request(s), {asked}",
    ]
    lines.append(
        _row(
            "outside",
            inst.outside_bytes,
            "per GPU: CUDA context "
            + notes.ref(inst.context.source)
            + (", NCCL " + notes.ref(inst.nccl.source) if inst.nccl.bytes else "")
            + ", margin "
            + notes.ref(inst.margin.source),
        )
    )
    for c in p.checks:
        verdict = "passes" if c.passes else "FAILS"
        lines.append(
            f"    startup     turn {p.turn}, GPU {c.gpu}: free {gib(c.free_at_check)} (after its "
            f"own CUDA context) >= budget {gib(c.requested)}: {verdict}"
        )
    return lines


def _per_layer(inst: Instance) -> str:
    arch = inst.arch
    if arch.mla is not None:
        return (
            f"a layer holds {arch.mla.kv_lora_rank} latent + {arch.mla.qk_rope_head_dim} RoPE "
            "elements a token, the same on every GPU"
        )
    heads = max(1, arch.kv_heads // inst.tp)
    replicated = ", replicated: fewer KV heads than GPUs" if arch.kv_heads < inst.tp else ""
    return f"{heads} KV head(s) per GPU x {arch.head_dim} x 2 (K, V) a layer{replicated}"


SCRIPT_HEAD = """#!/usr/bin/env bash
# Generated by `vllm-gateway plan`. Starts the vLLM servers one at a time: each starts only
# once the previous one answers /health, so its memory profile and its free-memory check
# see the previous servers' final footprint (vLLM issue 55827). Logs go to $LOGS.
set -euo pipefail
LOGS=${LOGS:-./vllm-logs}
mkdir -p "$LOGS"

wait_healthy() {  # PORT PID
    until curl -sf "http://127.0.0.1:$1/health" >/dev/null; do
        if ! kill -0 "$2" 2>/dev/null; then
            echo "vLLM on port $1 exited; see $LOGS/vllm-$1.log" >&2
            exit 1
        fi
        sleep 5
    done
}
"""


def as_script(plan: Plan, host: str) -> str:
    lines = [SCRIPT_HEAD]
    for p in plan.placed:
        lines.append(f"# {p.turn}. {p.instance.request.label()}: GPU {'+'.join(map(str, p.gpus))}")
        lines.append(f'{command_line(p)} >"$LOGS/vllm-{p.port}.log" 2>&1 &')
        lines.append(f"wait_healthy {p.port} $!")
        lines.append("")
    lines.append(
        f"echo {shlex.quote('all up; now run: ' + backends(plan, host) + ' vllm-gateway')}"
    )
    return "\n".join(lines) + "\n"
