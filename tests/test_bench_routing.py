"""Smoke tests of the routing benchmarks' tools: the fake's cache model, the chat workload and
the figures read from /metrics. They count right; how fast anything is belongs to bench/."""

from __future__ import annotations

import aiohttp

from bench import fake_vllm, routing_affinity
from bench.cache_model import CacheModel, CacheSpec, Cluster, prompt_text
from bench.chat_workload import ChatSpec, cache_figures, parse_metrics, run_chat

MODEL = "sim-model"
# Fast enough for a unit test: the timing is not what is checked.
QUICK = CacheSpec(cache_blocks=64, prefill_us_per_token=1.0, decode_ms_per_token=0.1)

VLLM_METRICS = b"""# HELP vllm:prefix_cache_queries Prefix cache queries, in queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 902.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 384.0
vllm:external_prefix_cache_hits_total{engine="0",model_name="m"} 0.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 1.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 2.0
"""


def test_vllm_metrics_are_read_by_name_and_summed_over_labels() -> None:
    values = parse_metrics(VLLM_METRICS)
    assert values["vllm:prefix_cache_queries_total"] == 902.0
    assert values["vllm:prefix_cache_hits_total"] == 384.0
    assert values["vllm:request_success_total"] == 3.0


def test_hit_rate_and_shares_come_from_the_deltas() -> None:
    before = [parse_metrics(VLLM_METRICS), {}]
    after = [
        {
            "vllm:prefix_cache_queries_total": 1902.0,
            "vllm:prefix_cache_hits_total": 1184.0,
            "vllm:request_success_total": 6.0,
        },
        {
            "vllm:prefix_cache_queries_total": 1000.0,
            "vllm:prefix_cache_hits_total": 0.0,
            "vllm:request_success_total": 1.0,
        },
    ]
    figures = cache_figures(["a", "b"], before, after)
    assert figures["hit_rate"] == 0.4
    assert figures["replica_requests"] == [3, 1]
    assert figures["replica_share"] == [0.75, 0.25] and figures["max_share"] == 0.75


async def test_a_resent_prompt_hits_every_whole_block_and_the_cache_keeps_its_cap() -> None:
    model = CacheModel(QUICK)
    text = prompt_text({"messages": [{"role": "user", "content": "x" * 1000}]})
    blocks, tokens = model.blocks_of(text)
    assert len(blocks) == len(text) // 64 and tokens == len(text) // 4
    async with model.admitted():
        await model.prefill(blocks, tokens)
    async with model.admitted():
        await model.prefill(blocks, tokens)
    assert (model.queries, model.hits) == (2 * tokens, len(blocks) * 16)
    for number in range(20):
        other, count = model.blocks_of(f"{number} ".encode() * 400)
        async with model.admitted():
            await model.prefill(other, count)
    assert len(model._blocks) == QUICK.cache_blocks


async def test_the_cluster_sees_where_the_load_landed() -> None:
    cluster = Cluster()
    one, two = CacheModel(QUICK, cluster), CacheModel(QUICK, cluster)
    async with one.admitted(), one.admitted():
        pass
    # The second arrival found 2 active on `one` and 0 on `two`: 2 / (1 + 1).
    assert cluster.peak_ratio == 1.0 and cluster.arrivals == 2
    async with two.admitted():
        pass
    assert cluster.arrivals == 3


async def test_chat_workload_against_the_simulating_fake_counts_hits_and_requests() -> None:
    cluster = Cluster()
    async with await fake_vllm.serve(models=(MODEL,), cache=QUICK, cluster=cluster) as fake:
        spec = ChatSpec(
            url=fake.url,
            model=MODEL,
            users=3,
            rounds=3,
            system_words=50,
            context_words=100,
            question_words=5,
            answer_tokens=4,
            metrics=(fake.url,),
        )
        summary = await run_chat(spec)
        assert summary["errors"] == 0, summary["first_error"]
        assert summary["requests_ok"] == 9
        assert summary["replica_requests"] == [9]
        # Rounds 2 and 3 resend rounds 1 and 2; the system prompt is shared from the start.
        assert 0.3 < summary["hit_rate"] < 1.0
        async with aiohttp.ClientSession() as session:
            async with session.post(fake.url + "/reset_prefix_cache") as response:
                assert response.status == 200
            async with session.get(fake.url + "/metrics") as response:
                values = parse_metrics(await response.read())
        assert values["vllm:prefix_cache_queries_total"] == 0.0
        assert cluster.arrivals == 9


async def test_no_reuse_prompts_share_nothing() -> None:
    async with await fake_vllm.serve(models=(MODEL,), cache=QUICK) as fake:
        spec = ChatSpec(
            url=fake.url,
            model=MODEL,
            users=2,
            rounds=2,
            system_words=40,
            context_words=40,
            question_words=5,
            answer_tokens=3,
            no_reuse=True,
            metrics=(fake.url,),
        )
        summary = await run_chat(spec)
        assert summary["requests_ok"] == 4 and summary["hit_rate"] == 0.0


async def test_with_a_duration_finished_users_are_replaced_by_new_ones() -> None:
    async with await fake_vllm.serve(models=(MODEL,), cache=QUICK) as fake:
        spec = ChatSpec(
            url=fake.url,
            model=MODEL,
            users=2,
            rounds=1,
            qps=40.0,
            system_words=20,
            context_words=20,
            question_words=5,
            answer_tokens=2,
            duration_s=0.3,
        )
        summary = await run_chat(spec)
        assert summary["errors"] == 0, summary["first_error"]
        assert summary["users"] > 2 and summary["requests_ok"] >= 3


def test_affinity_bench_keeps_every_turn_home_with_one_process_and_reports_shares() -> None:
    spec = ChatSpec(url="", model="m", users=6, rounds=3, system_words=60, context_words=120)
    stays, busiest = routing_affinity.run(
        processes=1, replicas=2, miss="least_loaded", spec=spec, seed=1
    )
    assert stays == 1.0
    assert 0.5 <= busiest < 1.0
