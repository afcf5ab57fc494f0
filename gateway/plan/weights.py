"""The weight bytes one tensor-parallel rank holds.

Read from the safetensors headers when the checkpoint is on disk (quantized checkpoints
count their real bytes), else computed from config.json and marked as computed. Either
way each tensor is split the way vLLM's layers split it:
- vocabulary rows (embed_tokens, lm_head) are padded to a multiple of 64 and divided by
  TP (model_executor/layers/vocab_parallel_embedding.py, DEFAULT_VOCAB_PADDING_SIZE);
- K and V projections hold max(1, kv_heads // tp) heads per rank: replicated below one
  head per rank (QKVParallelLinear);
- norms, MoE routers and MLA's kv_a_proj_with_mqa / q_a_proj are replicated
  (ReplicatedLinear, RMSNorm);
- everything else (q, o, MLP, experts) is divided by TP.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from pathlib import Path

from gateway.plan.architecture import Architecture, cdiv, kv_heads_per_rank

VOCAB_PADDING = 64
# A safetensors header is JSON metadata; real ones are kilobytes to a few MiB.
MAX_HEADER_BYTES = 100 << 20
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_REPLICATED = ("norm", "kv_a_proj_with_mqa", "q_a_proj", "e_score_correction_bias")


class WeightsError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    nbytes: int
    rule: str  # "vocab", "kv", "replicated" or "split"


@dataclasses.dataclass(frozen=True)
class Weights:
    tensors: tuple[Tensor, ...]
    source: str  # how the bytes were obtained, for the output
    read: bool

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def bytes_per_rank(self, arch: Architecture, tp: int) -> int:
        padded_vocab = cdiv(arch.vocab, VOCAB_PADDING) * VOCAB_PADDING
        total = 0
        for tensor in self.tensors:
            if tensor.rule == "vocab":
                total += tensor.nbytes * (padded_vocab // tp) // arch.vocab
            elif tensor.rule == "kv":
                total += tensor.nbytes * kv_heads_per_rank(arch, tp) // arch.kv_heads
            elif tensor.rule == "replicated":
                total += tensor.nbytes
            else:
                total += cdiv(tensor.nbytes, tp)
        return total


def rule_for(name: str) -> str:
    if "embed_tokens" in name or "lm_head" in name or name.endswith("wte.weight"):
        return "vocab"
    if ".k_proj." in name or ".v_proj." in name:
        return "kv"
    if any(part in name for part in _REPLICATED) or name.endswith("mlp.gate.weight"):
        return "replicated"
    return "split"


def computed(arch: Architecture) -> Weights:
    """Parameter shapes of a Llama-style, Qwen/Gemma, Mixtral/Qwen-MoE or DeepSeek (MLA)
    decoder, in the checkpoint's dtype."""
    b = arch.dtype_bytes
    h, hd = arch.hidden, arch.head_dim
    tensors = [Tensor("model.embed_tokens.weight", arch.vocab * h * b, "vocab")]
    if not arch.tie_embeddings:
        tensors.append(Tensor("lm_head.weight", arch.vocab * h * b, "vocab"))
    tensors.append(Tensor("model.norm.weight", h * b, "replicated"))
    moe_layers = set(arch.moe.moe_layers) if arch.moe else set()
    for i in range(arch.layers):
        p = f"model.layers.{i}."
        tensors.append(Tensor(p + "norms", arch.norms_per_layer * h * b, "replicated"))
        if arch.mla is not None:
            m = arch.mla
            qk = m.qk_nope_head_dim + m.qk_rope_head_dim
            if m.q_lora_rank:
                tensors += [
                    Tensor(p + "self_attn.q_a_proj.weight", h * m.q_lora_rank * b, "replicated"),
                    Tensor(p + "self_attn.q_a_layernorm", m.q_lora_rank * b, "replicated"),
                    Tensor(
                        p + "self_attn.q_b_proj.weight",
                        m.q_lora_rank * arch.heads * qk * b,
                        "split",
                    ),
                ]
            else:
                tensors.append(
                    Tensor(p + "self_attn.q_proj.weight", h * arch.heads * qk * b, "split")
                )
            kv_b = m.kv_lora_rank * arch.heads * (m.qk_nope_head_dim + m.v_head_dim) * b
            tensors += [
                Tensor(
                    p + "self_attn.kv_a_proj_with_mqa.weight",
                    h * (m.kv_lora_rank + m.qk_rope_head_dim) * b,
                    "replicated",
                ),
                Tensor(p + "self_attn.kv_a_layernorm.weight", m.kv_lora_rank * b, "replicated"),
                Tensor(p + "self_attn.kv_b_proj.weight", kv_b, "split"),
                Tensor(p + "self_attn.o_proj.weight", arch.heads * m.v_head_dim * h * b, "split"),
            ]
        else:
            bias = 1 if arch.qkv_bias else 0
            q, kvw = arch.heads * hd, arch.kv_heads * hd
            tensors += [
                Tensor(p + "self_attn.q_proj.weight", (h + bias) * q * b, "split"),
                Tensor(p + "self_attn.k_proj.weight", (h + bias) * kvw * b, "kv"),
                Tensor(p + "self_attn.v_proj.weight", (h + bias) * kvw * b, "kv"),
                Tensor(p + "self_attn.o_proj.weight", q * h * b, "split"),
            ]
            if arch.qk_norm:
                tensors.append(Tensor(p + "self_attn.qk_norm", 2 * hd * b, "replicated"))
        if arch.moe is not None and i in moe_layers:
            moe = arch.moe
            experts = moe.experts * 3 * h * moe.expert_intermediate * b
            tensors += [
                Tensor(p + "mlp.gate.weight", h * moe.experts * b, "replicated"),
                Tensor(p + "mlp.experts", experts, "split"),
            ]
            if moe.shared_intermediate:
                shared = 3 * h * moe.shared_intermediate * b
                tensors.append(Tensor(p + "mlp.shared_experts", shared, "split"))
        else:
            tensors.append(Tensor(p + "mlp", 3 * h * arch.intermediate * b, "split"))
    params = sum(t.nbytes for t in tensors) // b
    source = f"computed from config.json: {params / 1e9:.2f}B parameters x {b} bytes ({arch.dtype})"
    if arch.quantized:
        source += (
            "; the checkpoint is quantized, so its real bytes are fewer: put its "
            ".safetensors files beside config.json to read them"
        )
    return Weights(tuple(tensors), source, read=False)


def _header(path: Path) -> dict[str, object]:
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise WeightsError(f"{path}: not a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES:
            raise WeightsError(f"{path}: safetensors header of {length} bytes is not plausible")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise WeightsError(f"{path}: unreadable safetensors header") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: unreadable safetensors header")
    return header


def read(files: list[Path], arch: Architecture) -> Weights:
    """Exact bytes from the headers; tensors of layers past num_hidden_layers (DeepSeek's MTP
    layers) are skipped, as vLLM does not load them into the model."""
    tensors = []
    for path in files:
        for name, info in _header(path).items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            offsets = info.get("data_offsets")
            if not (isinstance(offsets, list) and len(offsets) == 2):
                raise WeightsError(f"{path}: tensor {name!r} has no data_offsets")
            layer = _LAYER.search(name)
            if layer is not None and int(layer.group(1)) >= arch.layers:
                continue
            tensors.append(Tensor(name, int(offsets[1]) - int(offsets[0]), rule_for(name)))
    if not tensors:
        raise WeightsError("the safetensors files hold no tensors")
    total = sum(t.nbytes for t in tensors)
    source = f"read from {len(files)} safetensors header(s): {total / (1 << 30):.2f} GiB in all"
    return Weights(tuple(tensors), source, read=True)
