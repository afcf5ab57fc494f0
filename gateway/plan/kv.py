"""KV-cache bytes, blocks and capacity, the way vLLM 0.32 counts them.

Every rule below is vLLM's; the file and function each one mirrors:

- A layer's bytes per token (one tensor-parallel rank): full attention stores K and V,
  `kv_heads_per_rank * (head_size + head_size_v) * dtype bytes`; MLA stores one latent of
  `kv_lora_rank + qk_rope_head_dim` elements, the same on every rank (v1/kv_cache_interface.py
  AttentionSpec.state_content_size_bytes, MLAAttentionSpec; mla_attention.py
  MLAAttention.get_kv_cache_spec sets num_kv_heads=1). fp8 KV is one byte an element.
- A page is one layer's block: `block_size` tokens. A sliding-window layer takes the largest
  block the attention kernel supports within the primary page (attention.py
  Attention.get_kv_cache_spec, _largest_kernel_block_within); pages of different sizes are
  then unified by scaling the block of the smaller ones, or padding them
  (kv_cache_utils.py unify_kv_cache_spec_page_size).
- Layers with one spec share one group; a model with full and sliding-window layers is cut
  into groups of equal layer counts, padding the last (kv_cache_utils.py get_kv_cache_groups,
  _get_kv_cache_groups_uniform_page_size). All groups draw from one block pool; one block id
  costs the widest group's pages (_get_kv_cache_bytes_per_block).
- Blocks per request at max_model_len: `cdiv(len, block)` for a full layer;
  `cdiv(min(window - 1 + in-flight tokens, len), block) + 1` for a sliding-window layer,
  where in-flight tokens are max_num_batched_tokens times the batches in flight (two with
  async scheduling, vLLM's default on GPUs) (kv_cache_interface.py
  SlidingWindowSpec.max_admission_blocks_per_request, config/vllm.py max_in_flight_tokens).
  A request holds the sum over groups (get_max_concurrency_for_kv_cache_config).
- `num_blocks = available // bytes_per_block` (get_kv_cache_config_from_groups);
  "Maximum concurrency" is num_blocks / blocks per request, and "GPU KV cache size: N
  tokens" is int(concurrency * max_model_len) (get_kv_cache_capacity). Startup fails unless
  `available - bytes_per_block` (the null block BlockPool keeps) holds one request
  (get_kv_cache_configs, _check_enough_kv_cache_memory).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from gateway.plan.architecture import Architecture, cdiv, kv_heads_per_rank

KV_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
# FlashAttention, vLLM's backend for these models on CUDA, runs any multiple of 16 tokens
# (v1/attention/backends/flash_attn.py get_supported_kernel_block_sizes: MultipleOf(16)).
GPU_KERNEL_BLOCK_MULTIPLE = 16
GPU_BLOCK_SIZE = 16  # config/cache.py CacheConfig.DEFAULT_BLOCK_SIZE


class KvError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class LayerKv:
    kind: str  # "full", "sliding" or "mla"
    bytes_per_token: int
    window: int | None = None


@dataclasses.dataclass(frozen=True)
class Group:
    kind: str
    window: int | None
    block_size: int
    layers: int
    page_bytes: int  # one layer's block, padded when vLLM pads it

    def blocks_per_request(self, max_model_len: int, in_flight_tokens: int) -> int:
        if self.kind != "sliding":
            return cdiv(max_model_len, self.block_size)
        assert self.window is not None
        held = min(self.window - 1 + in_flight_tokens, max_model_len)
        # +1: the window need not start on a block boundary.
        return cdiv(held, self.block_size) + 1


@dataclasses.dataclass(frozen=True)
class KvLayout:
    layers: tuple[LayerKv, ...]
    groups: tuple[Group, ...]
    bytes_per_block: int

    @property
    def bytes_per_token(self) -> int:
        """Sum over layers of one token's KV on one rank (what a full-attention model pays
        per token of context; sliding-window layers stop paying past their window)."""
        return sum(layer.bytes_per_token for layer in self.layers)

    @property
    def block_size(self) -> int:
        return min(group.block_size for group in self.groups)

    def blocks_per_request(self, max_model_len: int, in_flight_tokens: int) -> int:
        return sum(g.blocks_per_request(max_model_len, in_flight_tokens) for g in self.groups)

    def num_blocks(self, available_bytes: int) -> int:
        return max(0, available_bytes) // self.bytes_per_block

    def capacity(
        self, num_blocks: int, max_model_len: int, in_flight_tokens: int
    ) -> tuple[int, float]:
        """("GPU KV cache size" tokens, "Maximum concurrency") as vLLM logs them."""
        concurrency = num_blocks / self.blocks_per_request(max_model_len, in_flight_tokens)
        return int(concurrency * max_model_len), concurrency

    def bytes_for(self, seqs: int, max_model_len: int, in_flight_tokens: int) -> int:
        """The smallest KV budget that holds `seqs` requests at max_model_len, with the
        null block on top (vLLM's own check for one request)."""
        per_request = self.blocks_per_request(max_model_len, in_flight_tokens)
        return (seqs * per_request + 1) * self.bytes_per_block

    def fits(self, available_bytes: int, max_model_len: int, in_flight_tokens: int) -> bool:
        """vLLM's startup check: one request at max_model_len, past the null block."""
        needed = self.bytes_per_block * self.blocks_per_request(max_model_len, in_flight_tokens)
        return available_bytes > 0 and available_bytes - self.bytes_per_block >= needed

    def max_model_len_for(self, available_bytes: int, upper: int, in_flight_tokens: int) -> int:
        """The binary search vLLM prints as "the estimated maximum model length is N"
        (kv_cache_utils.py _estimate_max_model_len_from_groups); 0 if not one token fits."""
        if not self.fits(available_bytes, 1, in_flight_tokens):
            return 0
        low, high, best = 1, upper, 1
        while low <= high:
            mid = (low + high) // 2
            if self.fits(available_bytes, mid, in_flight_tokens):
                best, low = mid, mid + 1
            else:
                high = mid - 1
        return best

    def describe(self) -> str:
        kinds = {(layer.kind, layer.window) for layer in self.layers}
        parts = []
        for kind, window in sorted(kinds, key=lambda k: (k[0], k[1] or 0)):
            count = sum(1 for layer in self.layers if (layer.kind, layer.window) == (kind, window))
            label = {"full": "full-attention", "mla": "MLA"}.get(kind, f"sliding-window ({window})")
            parts.append(f"{count} {label}")
        return " + ".join(parts) + " layers"


def kv_dtype_bytes(kv_dtype: str, arch: Architecture) -> int:
    if kv_dtype == "auto":
        return arch.dtype_bytes
    if kv_dtype not in KV_DTYPE_BYTES:
        raise KvError(f"unknown KV-cache dtype {kv_dtype!r}: auto, {', '.join(KV_DTYPE_BYTES)}")
    return KV_DTYPE_BYTES[kv_dtype]


def layer_kv(arch: Architecture, tp: int, kv_dtype: str = "auto") -> tuple[LayerKv, ...]:
    element = kv_dtype_bytes(kv_dtype, arch)
    if arch.mla is not None:
        return (LayerKv("mla", arch.head_dim * element),) * arch.layers
    per_token = kv_heads_per_rank(arch, tp) * 2 * arch.head_dim * element
    return tuple(
        LayerKv("full", per_token) if window is None else LayerKv("sliding", per_token, window)
        for window in arch.windows
    )


def _block_of(layer: LayerKv, block_size: int, kernel_multiple: int) -> int:
    if layer.kind != "sliding":
        return block_size
    # _largest_kernel_block_within with a MultipleOf(kernel_multiple) backend: the largest
    # multiple within the primary page, and never below one kernel block.
    return max(kernel_multiple, block_size // kernel_multiple * kernel_multiple)


def layout(
    layers: Sequence[LayerKv],
    block_size: int = GPU_BLOCK_SIZE,
    kernel_multiple: int = GPU_KERNEL_BLOCK_MULTIPLE,
) -> KvLayout:
    if not layers:
        raise KvError("the model has no attention layers")
    if block_size < 1:
        raise KvError("block size must be positive")
    # (layer, block size, page) per layer, before grouping.
    specs = [(layer, _block_of(layer, block_size, kernel_multiple)) for layer in layers]
    pages = [layer.bytes_per_token * block for layer, block in specs]
    if len(set(specs)) == 1:
        # is_kv_cache_spec_uniform: one group of every layer.
        layer, block = specs[0]
        group = Group(layer.kind, layer.window, block, len(layers), pages[0])
        return KvLayout(tuple(layers), (group,), group.page_bytes * group.layers)
    kinds = {(layer.kind == "sliding", layer.window) for layer in layers}
    if len(kinds) == 1 and len({block for _, block in specs}) == 1:
        # UniformTypeKVCacheSpecs: one type, different page sizes, still one group.
        raise KvError("layers of one attention type with different KV sizes are not supported")
    # unify_kv_cache_spec_page_size: scale or pad the smaller pages to the largest.
    largest = max(pages)
    unified: list[tuple[LayerKv, int, int]] = []
    for (layer, block), page in zip(specs, pages, strict=True):
        if page != largest:
            if largest % page == 0:
                block *= largest // page
            elif layer.kind == "mla":
                raise KvError("MLA layers whose pages cannot be unified are not supported")
        unified.append((layer, block, largest))
    # _get_kv_cache_groups_uniform_page_size: buckets of equal specs, in order of appearance.
    buckets: dict[tuple[LayerKv, int, int], int] = {}
    for spec in unified:
        buckets[spec] = buckets.get(spec, 0) + 1
    smallest, biggest = min(buckets.values()), max(buckets.values())
    group_size = biggest if biggest < smallest * 1.5 else smallest
    groups: list[Group] = []
    for (layer, block, page), count in buckets.items():
        num_groups = cdiv(count, group_size)
        for i in range(num_groups):
            members = len(range(i, count, num_groups))  # layers[i::num_groups]
            groups.append(Group(layer.kind, layer.window, block, members, page))
    return KvLayout(tuple(layers), tuple(groups), max(g.page_bytes * g.layers for g in groups))
