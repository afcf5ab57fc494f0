"""Smoke test of the benchmark runner (bench/run.py): it runs, counts and reports; how fast
anything is stays in bench/results/, never in an assertion here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench import contenders, run
from bench.scenarios import SCENARIOS, Plan

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
