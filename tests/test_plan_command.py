"""`vllm-gateway plan` as a user runs it: arguments, errors, text, JSON and the start script
(gateway/plan/command.py, render.py; the dispatch in gateway/cli.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.plan.command import main
from gateway.plan.sizes import GiB

DATA = Path(__file__).parent / "data" / "plan"
LLAMA = str(DATA / "llama-3.1-8b")
QWEN = str(DATA / "qwen2.5-7b")


def run(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(list(args), environ={"HF_HUB_CACHE": str(DATA / "no-cache")})
    out, err = capsys.readouterr()
    return code, out, err


def plan_json(*args: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, err = run(*args, "--json", capsys=capsys)
    assert code in (0, 1), err
    return dict(json.loads(out))


def test_the_server_help_mentions_plan_and_plan_dispatches() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    helped = subprocess.run(
        [sys.executable, "-m", "gateway", "--help"], env=env, capture_output=True, text=True
    )
    assert helped.returncode == 0 and "vllm-gateway plan" in helped.stdout
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "plan", "--gpus", "1xH100-80GB", "--model", LLAMA],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--gpu-memory-utilization" in result.stdout


def test_json_gives_each_instance_its_utilization_kv_bytes_per_token_and_kv_cache(
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = plan_json(
        "--gpus", "1xH100-80GB",
        "--model", f"{LLAMA},len=32768,seqs=4",
        "--model", f"{QWEN},len=32768,seqs=4,name=qwen",
        capsys=capsys,
    )  # fmt: skip
    assert body["fits"] is True and body["overflow"] == []
    llama, qwen = body["instances"]
    for item in (llama, qwen):
        assert 0 < item["gpu_memory_utilization"] < 1
        assert item["kv_cache_bytes"] >= item["kv_bytes_per_token"] * 32768 * 4
        assert all(check["passes"] for check in item["startup_checks"])
        assert all(e["source"] for e in item["estimates"].values())
    assert llama["kv_bytes_per_token"] == 32 * 8 * 128 * 2 * 2
    assert qwen["kv_bytes_per_token"] == 28 * 4 * 128 * 2 * 2
    assert "--served-model-name qwen" in qwen["command"]
    assert body["gateway_backends"] == "http://127.0.0.1:8000,http://127.0.0.1:8001"
    total = body["gpus"][0]["total_bytes"]
    assert body["gpus"][0]["planned_bytes"] + body["gpus"][0]["free_bytes"] == total


def test_an_override_from_your_log_moves_the_kv_cache_by_exactly_that_much(
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["--gpus", "1xH100-80GB", "--model", f"{LLAMA},len=8192,util=0.9"]
    default = plan_json(*base, capsys=capsys)["instances"][0]
    measured = plan_json(*base, "--cudagraph-gib", "0.36", capsys=capsys)["instances"][0]
    assert default["estimates"]["cuda_graphs"]["bytes"] == 1 * GiB
    assert measured["estimates"]["cuda_graphs"]["source"] == "given (--cudagraph-gib)"
    assert measured["kv_cache_bytes"] - default["kv_cache_bytes"] == GiB - int(0.36 * GiB)


def test_text_names_every_source_and_ends_with_the_gateway_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run("--gpus", "1xH100-80GB", "--model", LLAMA, "--model", QWEN, capsys=capsys)
    assert code == 0
    assert "vllm-project/vllm-omni#1144" in out and "PR #10511" in out
    assert "Where the numbers come from" in out
    assert "GATEWAY_BACKENDS=http://127.0.0.1:8000,http://127.0.0.1:8001 vllm-gateway" in out


def test_a_plan_that_does_not_fit_exits_1_and_says_by_how_much_and_what_fits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run("--gpu", "L4", "--model", f"{LLAMA},len=32768,seqs=2", capsys=capsys)
    assert code == 1
    assert "DOES NOT FIT" in out and "short by" in out
    assert "kv-dtype=fp8" in out and "len=" in out


def test_the_start_script_starts_each_server_after_the_previous_is_healthy(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run(
        "--gpus", "1xH100-80GB", "--model", LLAMA, "--model", QWEN, "--format", "script",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0
    script = tmp_path / "start.sh"
    script.write_text(out)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    starts = [line for line in out.splitlines() if "vllm serve" in line and "&" in line]
    waits = [line for line in out.splitlines() if line.startswith("wait_healthy ")]
    assert len(starts) == 2 and waits == ["wait_healthy 8000 $!", "wait_healthy 8001 $!"]
    assert out.index("--port 8000") < out.index("wait_healthy 8000") < out.index("--port 8001")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "1xH100-80GB"], "give at least one --model"),
        (["--model", LLAMA], "give the GPUs"),
        (["--gpu", "80 parsecs", "--model", LLAMA], "not a GPU: '80 parsecs'"),
        (["--gpus", "0x80GiB", "--model", LLAMA], "GPU count"),
        (["--gpu", "80GiB", "--model", f"{LLAMA},speed=fast"], "unknown option 'speed=fast'"),
        (["--gpu", "80GiB", "--model", f"{LLAMA},seqs=2,kv=10GiB"], "seqs= or kv=, not both"),
        (["--gpu", "80GiB", "--model", f"{LLAMA},tp=3"], "does not divide the 32 attention"),
        (["--gpu", "80GiB", "--model", f"{LLAMA},len=999999"], "above the model's 131072"),
        (["--gpu", "80GiB", "--model", f"{LLAMA},util=1.5"], "util='1.5'"),
        (["--gpu", "80GiB", "--model", f"{LLAMA},tp=2,gpu=0"], "names 1 GPUs for tp=2"),
        (["--gpu", "80GiB", "--model", "acme/absent"], "nothing is downloaded"),
        (["--gpu", "80GiB", "--model", LLAMA, "--cudagraph-gib", "lots"], "not a size"),
    ],
)
def test_bad_arguments_exit_2_with_one_clear_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(*args, capsys=capsys)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err
    assert err.startswith("vllm-gateway plan: ")


def test_argparse_errors_exit_2_too(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run("--format", "yaml", capsys=capsys)
    assert code == 2 and "invalid choice: 'yaml'" in err
