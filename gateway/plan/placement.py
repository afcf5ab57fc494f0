"""Where each instance goes, its utilization, the start order, and what fits when not all do.

The rules:
- Instances are placed widest first (tensor parallelism), then by budget: each on the GPUs
  with the most free memory, unless pinned with gpu=.
- Each gets the smallest utilization that holds its weights, overheads and the KV cache it
  asked for (`seqs` requests at `len`, or `kv=`); the memory left on a GPU is then shared
  among the instances on it in proportion to the KV cache each asked for.
- On a GPU, the budgets plus every process's CUDA context, NCCL and safety margin must fit
  the total: vLLM's startup check compares the *free* memory, after everything started
  earlier and after the process's own context, with its whole budget.
- They start one at a time, each once the previous answers /health. Started together,
  each would count the other's loading as its own memory (vLLM issue 55827: the profile
  reads whole-device free memory), and the free-memory check would race.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from gateway.plan.budget import (
    Instance,
    Outcome,
    outcome,
    requested_bytes,
    util_at_least,
    util_at_most,
)
from gateway.plan.gpus import Gpu
from gateway.plan.request import ModelRequest
from gateway.plan.sizes import gib


class PlacementError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class StartupCheck:
    gpu: int
    free_before: int  # free on the GPU when the process starts
    own: int  # its CUDA context and NCCL, allocated before vLLM's snapshot
    requested: int

    @property
    def free_at_check(self) -> int:
        return self.free_before - self.own

    @property
    def passes(self) -> bool:
        return self.free_at_check >= self.requested


@dataclasses.dataclass(frozen=True)
class Placed:
    instance: Instance
    gpus: tuple[int, ...]
    outcome: Outcome
    turn: int
    port: int
    checks: tuple[StartupCheck, ...]


@dataclasses.dataclass(frozen=True)
class Fix:
    change: str
    detail: str


@dataclasses.dataclass(frozen=True)
class Overflow:
    instance: Instance
    gpus: tuple[int, ...]
    short_by: int
    reason: str
    fixes: tuple[Fix, ...] = ()


@dataclasses.dataclass(frozen=True)
class GpuUse:
    gpu: Gpu
    reserved: int
    used: int

    @property
    def free(self) -> int:
        return self.gpu.total_bytes - self.reserved - self.used


@dataclasses.dataclass(frozen=True)
class Plan:
    gpus: tuple[GpuUse, ...]
    placed: tuple[Placed, ...]  # in start order
    overflow: tuple[Overflow, ...]

    @property
    def fits(self) -> bool:
        return not self.overflow and all(
            p.outcome.starts and all(c.passes for c in p.checks) for p in self.placed
        )


def _footprint(instance: Instance, util: float, total: int) -> int:
    return requested_bytes(total, util) + instance.outside_bytes


def _choose(instance: Instance, gpus: Sequence[Gpu], free: dict[int, int]) -> tuple[int, ...]:
    pinned = instance.request.gpus
    if pinned is not None:
        missing = [i for i in pinned if i not in free]
        if missing:
            raise PlacementError(
                f"{instance.request.label()}: gpu={missing[0]} but only {len(gpus)} GPU(s) given"
            )
        return pinned
    ranked = sorted(gpus, key=lambda g: (-free[g.index], g.index))
    return tuple(sorted(g.index for g in ranked[: instance.tp]))


def place(
    gpus: Sequence[Gpu], instances: Sequence[Instance], *, reserve: int = 0, base_port: int = 8000
) -> Plan:
    by_index = {g.index: g for g in gpus}
    free = {g.index: g.total_bytes - reserve for g in gpus}
    order = sorted(instances, key=lambda i: (-i.tp, -i.min_requested, i.index))
    chosen: list[tuple[Instance, tuple[int, ...], float]] = []
    overflow: list[Overflow] = []
    for instance in order:
        if instance.tp > len(gpus):
            overflow.append(
                Overflow(
                    instance,
                    (),
                    instance.min_requested,
                    f"tp={instance.tp} needs {instance.tp} GPUs, {len(gpus)} given",
                )
            )
            continue
        where = _choose(instance, gpus, free)
        totals = [by_index[i].total_bytes for i in where]
        fixed = instance.request.util
        util = fixed if fixed is not None else util_at_least(instance.min_requested, totals)
        budget = min(requested_bytes(t, util) for t in totals)
        if budget < instance.min_requested:
            overflow.append(
                Overflow(
                    instance,
                    where,
                    instance.min_requested - budget,
                    f"util={fixed} leaves the KV cache too small",
                )
            )
            continue
        short = max(_footprint(instance, util, by_index[i].total_bytes) - free[i] for i in where)
        if short > 0:
            overflow.append(Overflow(instance, where, short, "not enough memory on its GPU(s)"))
            continue
        for i in where:
            free[i] -= _footprint(instance, util, by_index[i].total_bytes)
        chosen.append((instance, where, util))
    chosen = _share_spare(chosen, by_index, free)
    return _finish(gpus, chosen, overflow, reserve, base_port)


def _share_spare(
    chosen: list[tuple[Instance, tuple[int, ...], float]],
    by_index: dict[int, Gpu],
    free: dict[int, int],
) -> list[tuple[Instance, tuple[int, ...], float]]:
    """Give each GPU's leftover to its instances, in proportion to the KV they asked for.

    Each instance's share on a GPU is at most its part of that GPU's leftover, and its new
    budget is rounded down, so the GPU stays within its total."""
    asked: dict[int, int] = {}
    for instance, where, _ in chosen:
        if instance.request.util is None:
            for i in where:
                asked[i] = asked.get(i, 0) + instance.kv_needed_bytes
    grown = []
    for instance, where, util in chosen:
        if instance.request.util is None:
            widest = min(
                util_at_most(
                    requested_bytes(by_index[i].total_bytes, util)
                    + free[i] * instance.kv_needed_bytes // asked[i],
                    by_index[i].total_bytes,
                )
                for i in where
            )
            util = max(util, widest)
        grown.append((instance, where, util))
    return grown


def _finish(
    gpus: Sequence[Gpu],
    chosen: list[tuple[Instance, tuple[int, ...], float]],
    overflow: list[Overflow],
    reserve: int,
    base_port: int,
) -> Plan:
    by_index = {g.index: g for g in gpus}
    used = {g.index: 0 for g in gpus}
    ports = _ports([inst for inst, _, _ in chosen] + [o.instance for o in overflow], base_port)
    placed = []
    for turn, (instance, where, util) in enumerate(chosen, start=1):
        result = outcome(instance, util, [by_index[i].total_bytes for i in where])
        checks = []
        for i, requested in zip(where, result.requested, strict=True):
            total = by_index[i].total_bytes
            own = instance.context.bytes + instance.nccl.bytes
            checks.append(StartupCheck(i, total - reserve - used[i], own, requested))
            used[i] += requested + instance.outside_bytes
        placed.append(Placed(instance, where, result, turn, ports[instance.index], tuple(checks)))
    uses = tuple(GpuUse(g, reserve, used[g.index]) for g in gpus)
    return Plan(uses, tuple(placed), tuple(overflow))


def _ports(instances: Sequence[Instance], base: int) -> dict[int, int]:
    ports: dict[int, int] = {}
    taken = {i.request.port for i in instances if i.request.port is not None}
    next_port = base
    for instance in sorted(instances, key=lambda i: i.index):
        if instance.request.port is not None:
            ports[instance.index] = instance.request.port
            continue
        while next_port in taken:
            next_port += 1
        ports[instance.index] = next_port
        taken.add(next_port)
    if len(set(ports.values())) != len(ports):
        raise PlacementError("two instances were given the same port=")
    return ports


Rebuild = Callable[[Instance, ModelRequest], Instance]


@dataclasses.dataclass(frozen=True)
class _Trial:
    """Re-plans with one instance changed, to tell which single changes would fit."""

    gpus: Sequence[Gpu]
    instances: Sequence[Instance]
    rebuild: Rebuild
    reserve: int
    base_port: int
    overflowing: int

    def change(self, instance: Instance, **fields: object) -> Instance | None:
        try:
            request = dataclasses.replace(instance.request, **fields)  # type: ignore[arg-type]
            return self.rebuild(instance, request)
        except ValueError:
            return None

    def fits(self, changed: Sequence[Instance], more_gpus: Sequence[Gpu] = ()) -> bool:
        swap = {c.index: c for c in changed}
        others = [swap.get(i.index, i) for i in self.instances]
        try:
            trial = place(
                [*self.gpus, *more_gpus], others, reserve=self.reserve, base_port=self.base_port
            )
        except ValueError:
            return False
        gone = all(o.instance.index not in swap for o in trial.overflow)
        return gone and len(trial.overflow) < self.overflowing

    def fits_with(self, instance: Instance, **fields: object) -> bool:
        changed = self.change(instance, **fields)
        return changed is not None and self.fits([changed])


def with_fixes(
    plan: Plan,
    gpus: Sequence[Gpu],
    instances: Sequence[Instance],
    rebuild: Rebuild,
    *,
    reserve: int = 0,
    base_port: int = 8000,
) -> Plan:
    """For each instance that does not fit, the single changes that would make it fit: to
    itself, to the GPUs, or to an instance already placed where it was tried."""
    if not plan.overflow:
        return plan
    trial = _Trial(gpus, instances, rebuild, reserve, base_port, len(plan.overflow))
    overflow = [dataclasses.replace(o, fixes=tuple(_fixes(o, trial, plan))) for o in plan.overflow]
    return dataclasses.replace(plan, overflow=tuple(overflow))


def _shrinks(trial: _Trial, inst: Instance, prefix: str) -> list[Fix]:
    req = inst.request
    fixes: list[Fix] = []
    if req.kv_dtype == "auto" and inst.arch.dtype_bytes > 1:
        if trial.fits_with(inst, kv_dtype="fp8"):
            fixes.append(Fix(prefix + "kv-dtype=fp8", "an fp8 KV cache: half the bytes per token"))
    length = _largest(
        lambda n: trial.fits_with(inst, max_model_len=n), inst.kv.block_size, inst.max_model_len - 1
    )
    if length:
        detail = f"{length:,} tokens of context, not {inst.max_model_len:,}"
        fixes.append(Fix(f"{prefix}len={length}", detail))
    if inst.seqs and inst.seqs > 1:
        seqs = _largest(lambda n: trial.fits_with(inst, seqs=n), 1, inst.seqs - 1)
        if seqs:
            detail = f"{seqs} full-length requests, not {inst.seqs}"
            fixes.append(Fix(f"{prefix}seqs={seqs}", detail))
    return fixes


def _fixes(item: Overflow, trial: _Trial, plan: Plan) -> list[Fix]:
    inst, req = item.instance, item.instance.request
    fixes = _shrinks(trial, inst, "")
    if req.kv_dtype == "auto" and not any(f.change == "kv-dtype=fp8" for f in fixes):
        every = [trial.change(i, kv_dtype="fp8") for i in trial.instances]
        if all(every) and trial.fits([i for i in every if i is not None]):
            fixes.append(Fix("kv-dtype=fp8 on all", "fp8 KV caches for every instance"))
    if req.util is not None and trial.fits_with(inst, util=None):
        fixes.append(Fix("drop util=", "let the planner size the utilization"))
    biggest = max(trial.gpus, key=lambda g: g.total_bytes)
    if req.gpus is None:
        wider = req.tp * 2
        more = max(0, wider - len(trial.gpus))
        changed = trial.change(inst, tp=wider)
        extra = [dataclasses.replace(biggest, index=len(trial.gpus) + n) for n in range(more)]
        if changed is not None and trial.fits([changed], extra):
            where = f" with {more} more {biggest.name}" if more else ""
            fixes.append(Fix(f"tp={wider}", f"tensor parallelism over {wider} GPUs{where}"))
    need = max(1, req.tp - len(trial.gpus))
    extra = [dataclasses.replace(biggest, index=len(trial.gpus) + n) for n in range(need)]
    if trial.fits([inst], extra):
        change = f"--gpus {need}x{biggest.name}"
        fixes.append(Fix(change, f"{need} more GPU(s) of {gib(biggest.total_bytes)}"))
    for placed in plan.placed:
        if set(placed.gpus) & set(item.gpus):
            fixes += _shrinks(trial, placed.instance, placed.instance.request.label() + ": ")
    return fixes


def _largest(ok: Callable[[int], bool], low: int, high: int) -> int:
    """The largest n in [low, high] with ok(n), for a monotone ok; 0 if none."""
    if high < low or not ok(low):
        return 0
    best = low
    while low <= high:
        mid = (low + high) // 2
        if ok(mid):
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best
