"""vLLM's own KV-cache arithmetic for a config.json, without a GPU and without weights.

Runs in the vLLM virtualenv (stdlib + vllm). For each job it builds the engine config the
way `vllm serve` does (`EngineArgs(...).create_engine_config()`), builds each attention
layer's KV-cache spec with vLLM's own `Attention.get_kv_cache_spec` /
`MLAAttention.get_kv_cache_spec` and `customize_attention_spec`, resolves and records the
KV-cache layout as the engine core does (`resolve_kv_cache_layout`,
`record_kv_cache_layout`), then asks `get_kv_cache_configs` and `get_kv_cache_capacity`
(vllm/v1/core/kv_cache_utils.py) what a given KV budget buys. The gateway's planner
(gateway/plan/) must agree with every figure; tests/test_plan_e2e.py compares them.

    python bench/vllm_kv_reference.py --jobs jobs.json --out results.json

jobs.json is a list of objects: {"model": DIR, "tp": N, "budgets": [bytes, ...]} plus
optional "max_model_len", "block_size", "max_num_batched_tokens", "kv_cache_dtype" and
"async_scheduling" (true: two batches in flight, as on a GPU; the CPU build turns async
scheduling off, which halves what a sliding-window layer keeps). One result per job, in
order; a job vLLM rejects gets {"error": message}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path
from typing import Any

# Offline: the jobs name local directories; never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.model_executor.layers.attention.mla_attention import MLAAttention
    from vllm.utils.math_utils import cdiv
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.utils import (
        get_supported_kv_cache_layouts,
        record_kv_cache_layout,
        resolve_kv_cache_layout,
    )
    from vllm.v1.attention.selector import get_attn_backend
    from vllm.v1.core.kv_cache_utils import (
        _pool_bytes_per_block,
        generate_scheduler_kv_cache_config,
        get_kv_cache_capacity,
        get_kv_cache_configs,
    )
    from vllm.v1.worker.utils import customize_attention_spec

    tp = int(job.get("tp", 1))
    args = EngineArgs(
        model=str(job["model"]),
        load_format="dummy",
        skip_tokenizer_init=True,
        tensor_parallel_size=tp,
        max_model_len=job.get("max_model_len"),
        block_size=job.get("block_size"),
        max_num_batched_tokens=job.get("max_num_batched_tokens"),
        kv_cache_dtype=job.get("kv_cache_dtype", "auto"),
    )
    config = args.create_engine_config()
    if job.get("async_scheduling"):
        # The CPU platform forces it off; on a GPU it is on by default
        # (VllmConfig.__post_init__), and it doubles max_in_flight_tokens.
        config.scheduler_config.async_scheduling = True
    model = config.model_config
    cache = config.cache_config
    parallel = config.parallel_config
    text = model.hf_text_config
    layer_types = getattr(text, "layer_types", None)
    specs: dict[str, Any] = {}
    with set_current_vllm_config(config):
        num_layers = model.get_num_layers(parallel)
        head_size = model.get_head_size()
        for index in range(num_layers):
            name = f"model.layers.{index}.self_attn.attn"
            if model.use_mla:
                # mla_attention.py MLAAttention.get_kv_cache_spec reads these attributes.
                layer = types.SimpleNamespace(
                    kv_cache_dtype=cache.cache_dtype,
                    head_size=head_size,
                    sliding_window=None,
                    indexer=None,
                    non_causal_multi_token_decode=False,
                )
                spec = MLAAttention.get_kv_cache_spec(layer, config)  # type: ignore[arg-type]
                backend = get_attn_backend(head_size, model.dtype, cache.cache_dtype, use_mla=True)
            else:
                # The model files pass config.sliding_window for "sliding_attention"
                # layers (llama.py, gemma2.py); other layers fall back to
                # cache_config.sliding_window (Attention.__init__).
                if layer_types is not None:
                    sliding = (
                        text.sliding_window if layer_types[index] == "sliding_attention" else None
                    )
                else:
                    sliding = cache.sliding_window
                backend = get_attn_backend(
                    head_size,
                    model.dtype,
                    cache.cache_dtype,
                    has_sliding_window=sliding is not None,
                )
                layer = types.SimpleNamespace(
                    attn_type=AttentionType.DECODER,
                    kv_cache_dtype=cache.cache_dtype,
                    sliding_window=sliding,
                    attn_backend=backend,
                    num_kv_heads=model.get_num_kv_heads(parallel),
                    head_size=head_size,
                    head_size_v=head_size,
                    kv_cache_torch_dtype=kv_cache_dtype_str_to_dtype(cache.cache_dtype, model),
                )
                spec = Attention.get_kv_cache_spec(layer, config)  # type: ignore[arg-type]
            specs[name] = customize_attention_spec(backend, spec)
        layouts = [layout.name for layout in get_supported_kv_cache_layouts([backend])]
        layout = resolve_kv_cache_layout(config, [layouts] * tp, list(specs.values()))
        record_kv_cache_layout(cache, layout.name)
        per_token = sum(s.real_page_size_bytes // s.block_size for s in specs.values())
        result: dict[str, Any] = {
            "model": str(job["model"]),
            "tp": tp,
            "block_size": cache.block_size,
            "max_model_len": model.max_model_len,
            "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
            "max_in_flight_tokens": config.max_in_flight_tokens,
            "kv_cache_layout": layout.name,
            "dtype": str(model.dtype).removeprefix("torch."),
            "layers": num_layers,
            "kv_heads_per_rank": 1 if model.use_mla else model.get_num_kv_heads(parallel),
            "head_size": head_size,
            "kv_bytes_per_token": per_token,
            "budgets": [],
        }
        for budget in job["budgets"]:
            try:
                configs = get_kv_cache_configs(
                    config, [dict(specs) for _ in range(tp)], [int(budget)] * tp
                )
            except ValueError as exc:
                result["budgets"].append({"budget": budget, "error": str(exc)})
                continue
            scheduler = generate_scheduler_kv_cache_config(configs)
            groups = scheduler.kv_cache_groups
            tokens, concurrency = get_kv_cache_capacity(config, scheduler)
            result["budgets"].append(
                {
                    "budget": budget,
                    "num_blocks": scheduler.num_blocks,
                    "bytes_per_block": _pool_bytes_per_block(config, configs[0].kv_cache_groups),
                    "blocks_per_request": sum(
                        cdiv(
                            g.kv_cache_spec.max_memory_usage_bytes(config),
                            g.kv_cache_spec.page_size_bytes,
                        )
                        for g in groups
                    ),
                    "groups": [
                        [type(g.kv_cache_spec).__name__, len(g.layer_names)] for g in groups
                    ],
                    "tokens": tokens,
                    "concurrency": concurrency,
                }
            )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=Path, required=True, help="JSON list of jobs")
    parser.add_argument("--out", type=Path, required=True, help="where the results go")
    args = parser.parse_args(argv)
    jobs = json.loads(args.jobs.read_text())
    results = []
    for job in jobs:
        try:
            results.append(run_job(job))
        except Exception as exc:  # one bad job must not hide the others' results
            results.append({"model": job.get("model"), "tp": job.get("tp"), "error": repr(exc)})
    args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
