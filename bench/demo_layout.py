"""The demo's layout of real vLLM servers, shared by `make demo` and the end-to-end tests:
tiny-a on one server and two replicas of tiny-b, exactly the setup the gateway exists for.

Stdlib only: the models are made by the vLLM virtualenv's python (bench/tiny_models.py).
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from bench.vllm_servers import ServerSpec

ROOT = Path(__file__).resolve().parent.parent


def tiny_a_and_two_tiny_b(models: Path, ports: Sequence[int], *, venv: Path) -> list[ServerSpec]:
    """Make the two tiny models under `models` (kept if present) and the three servers' specs."""
    subprocess.run(
        [
            str(venv / "bin/python"),
            str(ROOT / "bench/tiny_models.py"),
            str(models / "tiny-a"),
            str(models / "tiny-b"),
            "--seed",
            "0",
            "1",
        ],
        check=True,
    )
    port_a, port_b1, port_b2 = ports
    # vLLM's "auto" binding puts every server's compute thread on core 0: spread them.
    return [
        ServerSpec(models / "tiny-a", "tiny-a", port_a, omp_threads_bind="0"),
        ServerSpec(models / "tiny-b", "tiny-b", port_b1, omp_threads_bind="1"),
        ServerSpec(models / "tiny-b", "tiny-b", port_b2, omp_threads_bind="0"),
    ]
