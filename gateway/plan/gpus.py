"""GPUs: a size, or a known name mapped to the total vLLM sees.

vLLM sizes every budget from the device total that `cudaMemGetInfo` reports
(utils/mem_utils.py MemorySnapshot.measure, torch.accelerator.get_memory_info), which is
less than the marketing size and less than nvidia-smi's (an H100 80GB: 81559 MiB in
nvidia-smi, 79.18 GiB to vLLM). The known names below carry the total a published vLLM or
PyTorch log printed for that GPU, with where it was printed. Logs print two decimals, so
these totals are exact to 0.005 GiB; ECC and driver settings move them a little too. The
total your own vLLM prints in "Free memory on device (free/TOTAL GiB)" is the one to pass
(`--gpu 79.18GiB`).
"""

from __future__ import annotations

import dataclasses
import re

from gateway.plan.sizes import GiB, SizeError, parse_size


@dataclasses.dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_bytes: int
    source: str


@dataclasses.dataclass(frozen=True)
class KnownGpu:
    total_gib: float
    source: str


KNOWN_GPUS: dict[str, KnownGpu] = {
    "H100-80GB": KnownGpu(
        79.18,
        'vLLM: "Free memory on device cuda:0 (46.95/79.18 GiB)", vllm-project/vllm-omni#1144',
    ),
    "A100-80GB": KnownGpu(
        79.15,
        'PyTorch under vLLM on an A100 80GB: "GPU 0 has a total capacity of 79.15 GiB", '
        "vllm-project/vllm#4408",
    ),
    "A100-40GB": KnownGpu(
        39.39,
        'PyTorch on Perlmutter\'s A100 40GB: "GPU 2 has a total capacity of 39.39 GiB", '
        "NERSC/dl4sci25-dl-at-scale tutorial",
    ),
    "L4": KnownGpu(
        22.05,
        'vLLM on the 24 GB L4 CI runners: "Free memory on device cuda:0 (19.77/22.05 GiB)", '
        "pytorch/pytorch#175666",
    ),
    "A10": KnownGpu(
        22.06,
        'PyTorch under vLLM on a 24 GB A10: "22.06 GiB total capacity", vllm-project/vllm#928',
    ),
    "RTX-3090": KnownGpu(
        23.58,
        'vLLM on an RTX 3090: "total_gpu_memory=23.58GiB", vllm-project/vllm#10517',
    ),
}

_ALIASES = {re.sub(r"[^a-z0-9]", "", name.lower()): name for name in KNOWN_GPUS}
_COUNT = re.compile(r"^\s*([0-9]+)\s*[xX]\s*(.+)$")


class GpuError(ValueError):
    pass


def known_names() -> str:
    return ", ".join(KNOWN_GPUS)


def _one(text: str, index: int) -> Gpu:
    key = re.sub(r"[^a-z0-9]", "", text.lower())
    if key in _ALIASES:
        name = _ALIASES[key]
        known = KNOWN_GPUS[name]
        return Gpu(index, name, int(known.total_gib * GiB), known.source)
    try:
        total = parse_size(text)
    except SizeError:
        raise GpuError(
            f"not a GPU: {text!r}; give its total as vLLM prints it (79.18GiB) "
            f"or a known name: {known_names()}"
        ) from None
    if total < GiB:
        raise GpuError(f"GPU total {text!r} is under 1 GiB")
    return Gpu(index, text.strip(), total, "given on the command line")


def parse_gpus(single: list[str], counted: list[str]) -> list[Gpu]:
    """`--gpu 80GiB` (repeatable) and `--gpus 4x80GiB` / `--gpus 2xH100-80GB`, in order."""
    specs: list[str] = list(single)
    for text in counted:
        match = _COUNT.match(text)
        if match is None:
            specs.append(text)
            continue
        count = int(match.group(1))
        if not 1 <= count <= 64:
            raise GpuError(f"GPU count in {text!r} must be 1..64")
        specs.extend([match.group(2)] * count)
    return [_one(text, index) for index, text in enumerate(specs)]
