"""Placement, utilizations, the startup free-memory check in start order, and what fits when
a plan does not (gateway/plan/placement.py, budget.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.plan.architecture import read_architecture
from gateway.plan.budget import Instance, build, requested_bytes
from gateway.plan.gpus import Gpu, parse_gpus
from gateway.plan.overheads import Overrides
from gateway.plan.placement import PlacementError, Plan, place, with_fixes
from gateway.plan.request import ModelRequest
from gateway.plan.sizes import GiB
from gateway.plan.weights import computed

DATA = Path(__file__).parent / "data" / "plan"


def instance(index: int, name: str, gpu_list: list[Gpu], **options: Any) -> Instance:
    request = ModelRequest(model=str(DATA / name), **options)
    arch = read_architecture(json.loads((DATA / name / "config.json").read_text()))
    return build(index, request, arch, computed(arch), gpu_list, Overrides())


def rebuild(old: Instance, request: ModelRequest, gpus: list[Gpu]) -> Instance:
    return build(old.index, request, old.arch, old.weights, gpus, Overrides())


def planned(gpus: list[Gpu], *instances: Instance) -> Plan:
    plan = place(gpus, instances)
    return with_fixes(plan, gpus, instances, lambda old, req: rebuild(old, req, gpus))


def footprint_on(plan: Plan, gpu: int) -> int:
    return sum(
        p.outcome.requested[p.gpus.index(gpu)] + p.instance.outside_bytes
        for p in plan.placed
        if gpu in p.gpus
    )


def test_two_8b_models_share_one_h100_and_each_passes_its_startup_check() -> None:
    gpus = parse_gpus([], ["1xH100-80GB"])
    llama = instance(0, "llama-3.1-8b", gpus, max_model_len=32768, seqs=4)
    qwen = instance(1, "qwen2.5-7b", gpus, max_model_len=32768, seqs=4)
    plan = planned(gpus, llama, qwen)
    assert plan.fits
    assert footprint_on(plan, 0) <= gpus[0].total_bytes
    first, second = plan.placed
    assert (first.turn, second.turn) == (1, 2)
    # The second process starts after the first holds its whole budget and context.
    assert second.checks[0].free_before == gpus[0].total_bytes - (
        first.outcome.requested[0] + first.instance.outside_bytes
    )
    assert all(p.outcome.holds >= 4 and p.outcome.starts for p in plan.placed)


def test_two_instances_at_half_a_gpu_each_do_not_fit() -> None:
    # Each budget is half the total, and each process's CUDA context comes on top: the
    # second one finds less than half free.
    gpus = parse_gpus(["H100-80GB"], [])
    a = instance(0, "qwen2.5-7b", gpus, max_model_len=8192, util=0.5)
    b = instance(1, "qwen2.5-7b", gpus, max_model_len=8192, util=0.5)
    plan = planned(gpus, a, b)
    assert not plan.fits and [o.instance.index for o in plan.overflow] == [1]
    half = requested_bytes(gpus[0].total_bytes, 0.5)
    assert plan.overflow[0].short_by == 2 * (half + a.outside_bytes) - gpus[0].total_bytes
    assert "drop util=" in [f.change for f in plan.overflow[0].fixes]


def test_the_leftover_goes_to_the_instances_in_proportion_to_the_kv_they_asked() -> None:
    gpus = parse_gpus([], ["1xH100-80GB"])
    small = instance(0, "qwen2.5-7b", gpus, max_model_len=32768, seqs=1)
    large = instance(1, "qwen2.5-7b", gpus, max_model_len=32768, seqs=3)
    plan = planned(gpus, small, large)
    by_index = {p.instance.index: p.outcome for p in plan.placed}
    assert by_index[1].available_kv > by_index[0].available_kv
    # Shared out to the last utilization step (1/10,000 of the GPU) per instance.
    assert 0 <= plan.gpus[0].free < 2 * gpus[0].total_bytes // 10_000


def test_tensor_parallel_ranks_share_one_utilization_and_check_each_gpu() -> None:
    gpus = parse_gpus([], ["2xH100-80GB"])
    big = instance(0, "llama-3.1-70b", gpus, tp=2, max_model_len=8192)
    plan = planned(gpus, big)
    assert plan.fits
    (placed,) = plan.placed
    assert placed.gpus == (0, 1) and len(set(placed.outcome.requested)) == 1
    assert [c.gpu for c in placed.checks] == [0, 1]
    assert big.nccl.bytes > 0 and big.weights_bytes < big.weights.total_bytes() // 2 + GiB


def test_the_smallest_gpu_of_a_tensor_parallel_group_sets_the_blocks() -> None:
    gpus = parse_gpus(["79.18GiB", "39.39GiB"], [])
    model = instance(0, "qwen2.5-7b", gpus, tp=2, max_model_len=8192)
    (placed,) = planned(gpus, model).placed
    smaller = min(placed.outcome.requested)
    assert placed.outcome.num_blocks == model.kv.num_blocks(smaller - model.non_kv_bytes)


def test_each_suggested_fix_makes_the_overflowing_instance_fit() -> None:
    gpus = parse_gpus(["L4"], [])
    llama = instance(0, "llama-3.1-8b", gpus, max_model_len=32768, seqs=2)
    plan = planned(gpus, llama)
    (overflow,) = plan.overflow
    assert overflow.short_by > 0 and overflow.fixes
    changes = {f.change.partition("=")[0]: f.change.partition("=")[2] for f in overflow.fixes}
    assert {"kv-dtype", "len"} <= set(changes)
    for field, value in (("kv_dtype", changes["kv-dtype"]), ("max_model_len", int(changes["len"]))):
        fixed = rebuild(llama, dataclasses.replace(llama.request, **{field: value}), gpus)
        assert place(gpus, [fixed]).fits
    # One token more than the suggested length does not fit: the answer is the largest.
    longer = rebuild(
        llama, dataclasses.replace(llama.request, max_model_len=int(changes["len"]) + 1), gpus
    )
    assert not place(gpus, [longer]).fits


def test_a_model_wider_than_the_gpus_needs_more_gpus() -> None:
    gpus = parse_gpus(["H100-80GB"], [])
    plan = planned(gpus, instance(0, "llama-3.1-70b", gpus, tp=2, max_model_len=8192))
    (overflow,) = plan.overflow
    assert overflow.reason.startswith("tp=2 needs 2 GPUs")
    fixes = {f.change: f.detail for f in overflow.fixes}
    assert "--gpus 1xH100-80GB" in fixes
    assert fixes.get("tp=4", "with 3 more H100-80GB").endswith("with 3 more H100-80GB")


def test_pinned_gpus_are_kept_and_a_missing_one_is_an_error() -> None:
    gpus = parse_gpus([], ["2xH100-80GB"])
    pinned = instance(0, "qwen2.5-7b", gpus, max_model_len=8192, gpus=(1,))
    assert planned(gpus, pinned).placed[0].gpus == (1,)
    wrong = instance(0, "qwen2.5-7b", gpus, max_model_len=8192, gpus=(5,))
    with pytest.raises(PlacementError, match="gpu=5"):
        place(gpus, [wrong])


def test_later_instances_see_less_free_memory_in_start_order() -> None:
    gpus = parse_gpus(["H100-80GB"], [])
    models = [instance(i, "qwen2.5-1.5b", gpus, max_model_len=8192) for i in range(3)]
    plan = planned(gpus, *models)
    free = [p.checks[0].free_before for p in plan.placed]
    assert [p.turn for p in plan.placed] == [1, 2, 3] and free == sorted(free, reverse=True)
    assert all(p.checks[0].passes for p in plan.placed)
