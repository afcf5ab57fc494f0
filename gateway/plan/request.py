"""One `--model PATH_OR_ID[,key=value...]`: a vLLM instance to plan."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from gateway.plan.kv import KV_DTYPE_BYTES
from gateway.plan.sizes import SizeError, parse_size

KEYS_HELP = (
    "tp=N (tensor-parallel size), len=TOKENS (max model length; default: the model's), "
    "seqs=N (requests to hold at that length; default 1) or kv=SIZE (a KV-cache target), "
    "kv-dtype=auto|fp8, block=N, mnbt=N (max batched tokens), util=F (fix the utilization), "
    "gpu=I[+J...] (pin to GPUs), port=N, name=SERVED_NAME, act=SIZE (activation peak), "
    "graphs=SIZE (CUDA graphs), dtype=bfloat16|float16, eager (--enforce-eager)"
)


class RequestError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ModelRequest:
    model: str
    tp: int = 1
    max_model_len: int | None = None
    seqs: int | None = None
    kv_target: int | None = None
    kv_dtype: str = "auto"
    block_size: int | None = None
    max_num_batched_tokens: int | None = None
    util: float | None = None
    gpus: tuple[int, ...] | None = None
    port: int | None = None
    name: str | None = None
    activation: int | None = None
    cudagraph: int | None = None
    dtype: str | None = None
    eager: bool = False

    def label(self) -> str:
        return self.name or self.model


def _positive(key: str, low: int = 1, high: int = 1 << 31) -> Callable[[str], int]:
    def parse(value: str) -> int:
        if not value.isdigit() or not low <= int(value) <= high:
            raise RequestError(f"{key}={value!r}: expected an integer from {low} to {high}")
        return int(value)

    return parse


def _size(key: str) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            return parse_size(value)
        except SizeError as exc:
            raise RequestError(f"{key}: {exc}") from None

    return parse


def _util(value: str) -> float:
    try:
        util = float(value)
    except ValueError:
        util = -1.0
    if not 0 < util <= 1:
        raise RequestError(f"util={value!r}: expected a fraction in (0, 1]")
    return util


def _kv_dtype(value: str) -> str:
    if value != "auto" and value not in KV_DTYPE_BYTES:
        raise RequestError(f"kv-dtype={value!r}: expected auto, {', '.join(KV_DTYPE_BYTES)}")
    return value


def _gpus(value: str) -> tuple[int, ...]:
    parts = value.split("+")
    if not all(p.isdigit() for p in parts) or len(set(parts)) != len(parts):
        raise RequestError(f"gpu={value!r}: expected distinct GPU indices like 0 or 0+1")
    return tuple(int(p) for p in parts)


_FIELDS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "tp": ("tp", _positive("tp", 1, 64)),
    "len": ("max_model_len", _positive("len")),
    "seqs": ("seqs", _positive("seqs", 1, 1 << 20)),
    "kv": ("kv_target", _size("kv")),
    "kv-dtype": ("kv_dtype", _kv_dtype),
    "block": ("block_size", _positive("block", 1, 4096)),
    "mnbt": ("max_num_batched_tokens", _positive("mnbt")),
    "util": ("util", _util),
    "gpu": ("gpus", _gpus),
    "port": ("port", _positive("port", 1, 65535)),
    "name": ("name", str),
    "act": ("activation", _size("act")),
    "graphs": ("cudagraph", _size("graphs")),
    "dtype": ("dtype", str),
}


def parse_model(text: str) -> ModelRequest:
    model, *options = text.split(",")
    if not model.strip():
        raise RequestError(f"--model {text!r}: no model path or id before the options")
    values: dict[str, Any] = {"model": model.strip()}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if key == "eager" and (not sep or value in ("1", "true", "yes")):
            values["eager"] = True
            continue
        if key not in _FIELDS or not sep or not value:
            raise RequestError(f"--model {text!r}: unknown option {option!r}; options: {KEYS_HELP}")
        field, parse = _FIELDS[key]
        values[field] = parse(value.strip())
    request = ModelRequest(**values)
    if request.seqs is not None and request.kv_target is not None:
        raise RequestError(f"--model {text!r}: give seqs= or kv=, not both")
    if request.gpus is not None and len(request.gpus) != request.tp:
        raise RequestError(
            f"--model {text!r}: gpu= names {len(request.gpus)} GPUs for tp={request.tp}"
        )
    return request
