"""Byte sizes on the command line and in output, in vLLM's units (GiB = 2**30 bytes)."""

from __future__ import annotations

import math
import re

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

_UNITS = {
    "": GiB,  # a bare number is GiB, the unit of every vLLM memory log line
    "b": 1,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


class SizeError(ValueError):
    pass


def parse_size(text: str) -> int:
    """`80GiB`, `81559MiB`, `85GB`, `0.5` (GiB) -> bytes, rounded down."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise SizeError(f"not a size: {text!r} (examples: 80GiB, 81559MiB, 0.5GiB)")
    return math.floor(float(match.group(1)) * _UNITS[unit])


def gib(n: int) -> str:
    """Bytes as vLLM logs them: GiB rounded to two decimals (utils/mem_utils.py format_gib)."""
    return f"{round(n / GiB, 2):.2f} GiB"


def human(n: int) -> str:
    """Small sizes in the unit that keeps them readable (KV bytes per token, a block)."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
