"""A model's config.json read into the shapes vLLM sizes its memory with.

Mirrors vLLM 0.32's reading of a Hugging Face config:
- head size, KV heads, MLA: transformers_utils/model_arch_config_convertor.py
  (get_head_size, get_total_num_kv_heads, is_deepseek_mla);
- max_model_len: config/model.py _get_and_verify_max_len with
  derive_max_model_len_and_key (the smallest length key, times a RoPE factor except for
  the RoPE types that already include it);
- dtype "auto": config/model.py _resolve_auto_dtype (float32 checkpoints run in
  bfloat16, the first dtype a CUDA GPU of compute capability 8.0+ supports);
- sliding-window layers: the model files read `layer_types` (llama.py, gemma2.py), and
  without it every layer takes `cache_config.sliding_window`, set only when no layer is a
  full-attention layer (engine/arg_utils.py create_engine_config).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# config/model_arch.py is_deepseek_mla: the model types whose attention is MLA.
MLA_MODEL_TYPES = frozenset(
    {"deepseek_v2", "deepseek_v3", "deepseek_v32", "kimi_k2", "glm4_moe_lite", "longcat_flash"}
)
# derive_max_model_len_and_key: every key that may hold the length; the smallest wins.
MAX_LEN_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# _get_and_verify_max_len: RoPE types whose max_position_embeddings already includes
# the scaling factor.
ROPE_TYPES_ALREADY_SCALED = frozenset(
    {"su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling"}
)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class ArchitectureError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Mla:
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None


@dataclasses.dataclass(frozen=True)
class Moe:
    experts: int
    expert_intermediate: int
    shared_intermediate: int  # 0: no shared expert
    moe_layers: tuple[int, ...]  # indices of the layers whose MLP is the MoE block


@dataclasses.dataclass(frozen=True)
class Architecture:
    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tie_embeddings: bool
    dtype: str
    max_model_len: int
    # Per layer: the sliding window, or None for a full-attention layer.
    windows: tuple[int | None, ...]
    mla: Mla | None
    moe: Moe | None
    qkv_bias: bool
    qk_norm: bool
    norms_per_layer: int
    quantized: bool

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


def _int(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        if default is not None and value is None:
            return default
        raise ArchitectureError(f"config.json: {key!r} must be an integer, got {value!r}")
    return value


def text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """vLLM's hf_text_config: a multimodal wrapper's `text_config`, else the config itself."""
    inner = config.get("text_config")
    merged = dict(config)
    if isinstance(inner, dict):
        merged.update(inner)
    return merged


def resolve_dtype(config: Mapping[str, Any], override: str | None = None) -> str:
    if override is not None and override != "auto":
        name = {"half": "float16", "bf16": "bfloat16", "fp16": "float16"}.get(override, override)
        if name not in DTYPE_BYTES:
            raise ArchitectureError(f"unknown dtype {override!r}: bfloat16, float16, float32")
        return name
    # transformers 5 writes "dtype", earlier versions "torch_dtype"; none means float32.
    raw = config.get("dtype") or config.get("torch_dtype") or "float32"
    name = str(raw).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ArchitectureError(f"config.json: unsupported dtype {raw!r}")
    return "bfloat16" if name == "float32" else name


def derived_max_model_len(config: Mapping[str, Any]) -> int:
    lengths = [config[key] for key in MAX_LEN_KEYS if isinstance(config.get(key), int)]
    derived = float(min(lengths)) if lengths else 2048.0  # vLLM's default when none is set
    if isinstance(config.get("model_max_length"), int):
        derived = float(config["model_max_length"])
    rope = config.get("rope_scaling") or config.get("rope_parameters")
    if isinstance(rope, dict) and config.get("model_type") != "gemma3":
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        factor = rope.get("factor")
        if rope_type not in ROPE_TYPES_ALREADY_SCALED and isinstance(factor, int | float):
            derived *= factor
    return int(derived)


def layer_windows(config: Mapping[str, Any], layers: int) -> tuple[int | None, ...]:
    window = config.get("sliding_window")
    if not isinstance(window, int) or window <= 0:
        window = None  # vLLM turns a sliding_window of 0 into None (config/model.py)
    model_type = config.get("model_type", "")
    types = config.get("layer_types")
    if types is None and model_type == "gemma2":
        # transformers' Gemma2Config: even layers slide, odd layers attend to everything.
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    if types is None and model_type.startswith(("qwen2", "qwen3")):
        # transformers' Qwen2/Qwen3 configs drop the window unless use_sliding_window.
        if not config.get("use_sliding_window", False):
            window = None
        first = int(config.get("max_window_layers", 0) or 0)
        if window is not None and 0 < first < layers:
            raise ArchitectureError(
                "sliding window on only some layers (max_window_layers) is not supported "
                "by vLLM's qwen2 model either"
            )
    if types is not None:
        if not isinstance(types, list) or len(types) < layers:
            raise ArchitectureError("config.json: layer_types must list every layer")
        return tuple(window if t == "sliding_attention" else None for t in types[:layers])
    return (window,) * layers


def read_architecture(raw: Mapping[str, Any], *, dtype: str | None = None) -> Architecture:
    config = text_config(raw)
    model_type = str(config.get("model_type", ""))
    layers = _int(config, "num_hidden_layers")
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    kv_heads = heads
    for key in ("n_head_kv", "num_kv_heads", "num_key_value_heads", "multi_query_group_num"):
        if isinstance(config.get(key), int):
            kv_heads = config[key]
            break
    mla = None
    if model_type in MLA_MODEL_TYPES and config.get("kv_lora_rank") is not None:
        mla = Mla(
            kv_lora_rank=_int(config, "kv_lora_rank"),
            qk_rope_head_dim=_int(config, "qk_rope_head_dim"),
            qk_nope_head_dim=_int(config, "qk_nope_head_dim"),
            v_head_dim=_int(config, "v_head_dim"),
            q_lora_rank=config.get("q_lora_rank"),
        )
        head_dim = mla.kv_lora_rank + mla.qk_rope_head_dim
    elif isinstance(config.get("head_dim"), int) and config["head_dim"] > 0:
        head_dim = config["head_dim"]
    else:
        head_dim = hidden // heads
    if heads <= 0 or kv_heads <= 0 or layers <= 0 or head_dim <= 0:
        raise ArchitectureError("config.json: layers, heads and head size must be positive")
    return Architecture(
        model_type=model_type,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=_int(config, "intermediate_size", 4 * hidden),
        vocab=_int(config, "vocab_size"),
        tie_embeddings=bool(config.get("tie_word_embeddings", model_type.startswith("gemma"))),
        dtype=resolve_dtype(config, dtype),
        max_model_len=derived_max_model_len(config),
        windows=layer_windows(config, layers),
        mla=mla,
        moe=_moe(config, layers),
        qkv_bias=model_type.startswith("qwen2") or bool(config.get("attention_bias", False)),
        qk_norm=model_type.startswith("qwen3"),
        norms_per_layer=4 if model_type in ("gemma2", "gemma3", "gemma3_text") else 2,
        quantized="quantization_config" in config,
    )


def _moe(config: Mapping[str, Any], layers: int) -> Moe | None:
    experts = config.get("n_routed_experts") or config.get("num_experts")
    experts = experts or config.get("num_local_experts")
    if not isinstance(experts, int) or experts <= 1:
        return None
    expert_intermediate = config.get("moe_intermediate_size") or config.get("intermediate_size")
    if not isinstance(expert_intermediate, int):
        raise ArchitectureError("config.json: MoE model without moe_intermediate_size")
    shared = 0
    if isinstance(config.get("n_shared_experts"), int):  # DeepSeek: n copies of an expert
        shared = config["n_shared_experts"] * expert_intermediate
    elif isinstance(config.get("shared_expert_intermediate_size"), int):  # Qwen2-MoE
        shared = config["shared_expert_intermediate_size"]
    dense_first = int(config.get("first_k_dense_replace", 0) or 0)
    step = int(config.get("moe_layer_freq", config.get("decoder_sparse_step", 1)) or 1)
    dense_only = set(config.get("mlp_only_layers") or [])
    moe_layers = tuple(
        i for i in range(layers) if i >= dense_first and i % step == 0 and i not in dense_only
    )
    return Moe(experts, expert_intermediate, shared, moe_layers)


def kv_heads_per_rank(arch: Architecture, tp: int) -> int:
    """config/model.py get_num_kv_heads: heads split over TP, replicated below one per rank."""
    if arch.mla is not None:
        return 1  # MLA: one latent vector per token, on every rank
    return max(1, arch.kv_heads // tp)


def check_tensor_parallel(arch: Architecture, tp: int) -> None:
    # vLLM refuses a TP size that does not divide the attention heads
    # (config/model.py verify_with_parallel_config).
    if tp < 1 or arch.heads % tp:
        raise ArchitectureError(
            f"tensor-parallel size {tp} does not divide the {arch.heads} attention heads"
        )
    if arch.mla is None and arch.kv_heads > tp and arch.kv_heads % tp:
        raise ArchitectureError(f"tp={tp} does not divide the {arch.kv_heads} KV heads")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
