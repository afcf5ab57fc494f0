"""Smoke tests of the benchmark runner (bench/run.py) and its contenders: they run, count and
report; how fast anything is stays in bench/results/, never in an assertion here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bench import contenders, fake_vllm, hold_streams, loadgen, run
from bench.scenarios import SCENARIOS, Plan

MODEL = "bench-model"

TINY = Plan(
    saturation_s=0.5,
    paced_s=0.5,
    c1_s=0.3,
    hold_streams=20,
    hold_s=0.1,
    warmup_s=0.2,
    saturation_concurrency=4,
    paced_streams=8,
    paced_events=4,
    paced_interval_ms=5.0,
)


class Absent(contenders.Contender):
    name = "absent"
    about = "a contender that is not installed"

    def missing(self) -> str | None:
        return "not installed here"


class Broken(contenders.Contender):
    name = "broken"
    about = "a contender that exits at once"
    start_timeout_s = 20.0

    def command(self, upstream: str, model: str, port: int, workdir: Path) -> list[str]:
        return [sys.executable, "-c", "import sys; print('no config'); sys.exit(3)"]


async def test_runner_reports_every_contender_with_zero_errors(tmp_path: Path) -> None:
    """direct and the gateway run all four scenarios cleanly; the absent and the broken
    contender are listed with the reason, not run."""
    options = run.Options(
        plan=TINY,
        contenders=[contenders.Direct(), contenders.Gateway(), Absent(), Broken()],
        out_dir=tmp_path,
        proxy_core=None,
        load_core=None,
        draw=False,
        max_load=None,
        log=lambda text: None,
    )
    await run.run(options)

    result: dict[str, Any] = json.loads((tmp_path / "latest.json").read_text())
    runs = result["contenders"]
    assert list(runs) == ["direct", "gateway", "absent", "broken"]
    for name in ("direct", "gateway"):
        summary = runs[name]["summary"]
        assert runs[name]["status"] == "ran"
        assert sorted(summary) == sorted(SCENARIOS)
        for scenario in SCENARIOS:
            assert summary[scenario]["errors"] == 0, (name, scenario, summary[scenario])
        assert summary["saturation"]["requests_ok"] > 0
        assert summary["paced"]["events"] == summary["paced"]["requests_ok"] * 4
        assert summary["hold"]["opened"] == 20
        assert summary["hold"]["upstream_aborted"] == 20  # every upstream closed
    gateway = runs["gateway"]["summary"]
    assert gateway["saturation"]["cpu_us_per_req"] > 0  # the proxy's own CPU was measured
    assert gateway["paced"]["cpu_us_per_event"] > 0
    assert runs["absent"] == {**runs["absent"], "status": "skipped", "reason": "not installed here"}
    assert runs["broken"]["status"] == "failed to start"
    assert "status 3" in runs["broken"]["reason"] and "no config" in runs["broken"]["reason"]
    assert set(result["skipped"]) == {"absent", "broken"}
    assert result["machine"]["cores"] and result["machine"]["packages"]["aiohttp"]

    markdown = (tmp_path / "latest.md").read_text()
    for table_title in ("## Streaming cost", "## Time to first event", "open slow streams"):
        assert table_title in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    for name in ("direct", "gateway"):
        # one row in each of the three tables, "direct" measured on the fake in the last
        assert sum(1 for row in rows if row.split("|")[1].split()[0] == name) == 3
    assert not any(row.startswith(("| absent", "| broken")) for row in rows)
    assert "absent (not installed here)" in markdown
    raw = json.loads((tmp_path / "latest.raw.json").read_text())
    assert raw["gateway"][0]["c1"]["ttft_s"]


@pytest.mark.parametrize(
    "floor", [contenders.BareHypercorn(), contenders.BareUvicorn()], ids=lambda c: c.name
)
async def test_bare_proxy_relays_streams_whole_and_closes_upstreams_of_departed_clients(
    floor: contenders.Contender, tmp_path: Path
) -> None:
    """The server floor, started as the runner starts it: a stream arrives event for event,
    concurrent streams are all counted, and clients that leave get their upstreams closed."""
    reason = floor.missing()
    if reason:
        pytest.skip(reason)
    async with await fake_vllm.serve(models=(MODEL,), events=16) as fake:
        probe = loadgen.LoadSpec(url=fake.url, model=MODEL, events=1, interval_ms=0)
        async with contenders.start(
            floor,
            upstream=fake.url,
            model=MODEL,
            probe_request=probe.request_bytes(),
            workdir=tmp_path,
            core=None,
        ) as target:
            request = {"model": MODEL, "stream": True, "fake_events": 5}
            async with (
                aiohttp.ClientSession() as client,
                client.post(target.url + "/v1/chat/completions", json=request) as response,
            ):
                assert response.status == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                assert "content-length" not in response.headers
                body = await response.read()
            *events, done, tail = body.split(b"\n\n")
            assert (done, tail) == (b"data: [DONE]", b"")
            chunks = [orjson.loads(event.removeprefix(b"data: ")) for event in events]
            assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 5
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

            spec = loadgen.LoadSpec(url=target.url, model=MODEL, concurrency=4, requests=40)
            summary = await loadgen.run_load(spec)
            assert summary["errors"] == 0, summary["first_error"]
            assert summary["events"] == 40 * 16

            slow = loadgen.LoadSpec(url=target.url, model=MODEL, events=10**9, interval_ms=1000.0)
            held = await hold_streams.run_hold(
                hold_streams.HoldSpec(
                    url=target.url,
                    request=slow.request_bytes(),
                    streams=10,
                    hold_s=0.0,
                    stats_url=fake.url + "/stats",
                )
            )
            assert held["errors"] == 0, held["first_error"]
            assert held["upstream_aborted"] == 10
            assert fake.stats.active_streams == 0
