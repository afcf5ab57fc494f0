"""KV bytes, blocks and capacity: vLLM's published log lines reproduced, and its rules for
tensor parallelism, sliding windows, MLA and fp8 (gateway/plan/kv.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.plan import kv
from gateway.plan.architecture import Architecture, read_architecture
from gateway.plan.sizes import GiB, gib

DATA = Path(__file__).parent / "data" / "plan"


def arch(name: str) -> Architecture:
    return read_architecture(json.loads((DATA / name / "config.json").read_text()))


def test_vllm_issue_19996_h100_llama_8b_with_eagle_410128_tokens_at_3_13x() -> None:
    # vLLM issue 19996 (H100 80GB, Llama 3.1 8B + EAGLE, max_model_len 131072):
    #   "Available KV cache memory: 51.63 GiB", "GPU KV cache size: 410,128 tokens",
    #   "Maximum concurrency for 131,072 tokens per request: 3.13x".
    # The target's 32 layers plus the EAGLE head's one, all 8 KV heads x 128 in bfloat16.
    target = kv.layer_kv(arch("llama-3.1-8b"), tp=1)
    assert len(target) == 32 and len(set(target)) == 1
    layout = kv.layout(target + target[:1])
    blocks = layout.num_blocks(int(51.63 * GiB))
    tokens, concurrency = layout.capacity(blocks, 131072, in_flight_tokens=2 * 8192)
    assert tokens == 410_128
    assert f"{concurrency:.2f}x" == "3.13x"


def test_vllm_issue_15871_deepseek_v2_lite_needs_0_95_gib_at_32768_tokens() -> None:
    # vLLM issue 15871 (DeepSeek-V2-Lite-Chat, max seq len 32768): "0.95 GiB KV cache is
    # needed, which is larger than the available KV cache memory (0.93 GiB)".
    layout = kv.layout(kv.layer_kv(arch("deepseek-v2-lite"), tp=1))
    needed = layout.bytes_per_block * layout.blocks_per_request(32768, 2 * 8192)
    assert gib(needed) == "0.95 GiB"
    assert not layout.fits(int(0.93 * GiB), 32768, 2 * 8192)
    assert layout.fits(needed + layout.bytes_per_block, 32768, 2 * 8192)


def test_mla_latent_is_the_same_on_every_rank() -> None:
    deepseek = arch("deepseek-v2-lite")
    per_rank = {kv.layout(kv.layer_kv(deepseek, tp)).bytes_per_token for tp in (1, 2, 8)}
    # 27 layers x (512 latent + 64 RoPE) x 2 bytes, whatever the tensor parallelism.
    assert per_rank == {27 * 576 * 2}


def test_kv_heads_split_over_tp_and_replicate_below_one_per_rank() -> None:
    qwen3 = arch("qwen3-30b-a3b")  # 4 KV heads
    per_layer = [kv.layer_kv(qwen3, tp)[0].bytes_per_token for tp in (1, 2, 4, 8)]
    head = 2 * 128 * 2  # K and V, head size 128, bfloat16
    assert per_layer == [4 * head, 2 * head, 1 * head, 1 * head]


def test_fp8_kv_halves_the_bytes() -> None:
    llama = arch("llama-3.1-8b")
    bf16 = kv.layout(kv.layer_kv(llama, 1)).bytes_per_token
    fp8 = kv.layout(kv.layer_kv(llama, 1, "fp8")).bytes_per_token
    assert (bf16, fp8) == (32 * 8 * 128 * 2 * 2, 32 * 8 * 128 * 2)


def test_gemma2_sliding_and_full_layers_share_one_pool_in_two_groups() -> None:
    layout = kv.layout(kv.layer_kv(arch("gemma-2-9b-it"), tp=1))
    assert [(g.kind, g.layers) for g in layout.groups] == [("sliding", 21), ("full", 21)]
    page = 16 * 8 * 2 * 256 * 2  # 16 tokens x 8 KV heads x (K, V) x 256 x bfloat16
    assert layout.bytes_per_block == 21 * page
    # At 8,192 tokens with 16,384 in flight the window holds the whole request anyway:
    # cdiv(min(4095 + 16384, 8192), 16) + 1 blocks, beside 512 for the full layers.
    assert layout.blocks_per_request(8192, 16384) == 512 + 513
    # With a long context the window pays off: the sliding group stops at the window.
    assert layout.groups[0].blocks_per_request(131072, 0) == -(-4095 // 16) + 1


def test_sliding_window_everywhere_is_one_group_with_window_sized_requests() -> None:
    layout = kv.layout(kv.layer_kv(arch("mistral-7b-v0.1"), tp=1))
    assert [(g.kind, g.window, g.layers) for g in layout.groups] == [("sliding", 4096, 32)]
    full = kv.layout(kv.layer_kv(arch("mistral-7b-v0.3"), tp=1))
    assert layout.blocks_per_request(32768, 16384) < full.blocks_per_request(32768, 16384)


def test_a_kernel_that_needs_larger_blocks_scales_the_full_layers_to_match() -> None:
    # vLLM's CPU kernel runs multiples of 32 tokens: sliding layers take 32-token blocks,
    # and unify_kv_cache_spec_page_size doubles the full layers' blocks to match.
    layout = kv.layout(kv.layer_kv(arch("gemma-2-9b-it"), tp=2), 16, kernel_multiple=32)
    assert {g.block_size for g in layout.groups} == {32}


def test_vllm_estimates_the_longest_context_that_fits() -> None:
    layout = kv.layout(kv.layer_kv(arch("llama-3.1-8b"), tp=1))
    budget = 10 * layout.bytes_per_block
    longest = layout.max_model_len_for(budget, 131072, 0)
    assert layout.fits(budget, longest, 0) and not layout.fits(budget, longest + 1, 0)
    assert longest == 9 * 16  # nine blocks past the null block


def test_unknown_kv_dtype_is_refused() -> None:
    with pytest.raises(kv.KvError, match="unknown KV-cache dtype"):
        kv.layer_kv(arch("llama-3.1-8b"), 1, "int3")
