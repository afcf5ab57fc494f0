"""PNG plots of a benchmark run (matplotlib, Agg backend): TTFT and gap distributions, one
line per contender, as cumulative distributions plus their tails on a log scale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

POINTS = 2000  # quantiles drawn per line: enough for a smooth curve, small PNGs


def available() -> str | None:
    """Why plots cannot be drawn, or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (bench/requirements.txt)"
    return None


def _curve(samples_s: list[float]) -> tuple[Any, Any]:
    import numpy as np

    values = np.sort(np.asarray(samples_s, dtype=float)) * 1000.0
    if len(values) > POINTS:
        picks = np.linspace(0, len(values) - 1, POINTS).astype(int)
        values = values[picks]
        fraction = (picks + 1) / (picks[-1] + 1)
    else:
        fraction = np.arange(1, len(values) + 1) / len(values)
    return values, fraction


def _panel_pair(
    series: dict[str, list[float]],
    *,
    title: str,
    xlabel: str,
    log_x: bool,
    path: Path,
    mark_ms: float | None = None,
) -> None:
    """Left: the CDF (on a linear x axis, cut at 1.2 x the worst p99 so that one slow
    contender does not flatten the others); right: the tail on log-log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cdf, tail) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    worst_p99 = 0.0
    for name, samples in series.items():
        if not samples:
            continue
        x, y = _curve(samples)
        worst_p99 = max(worst_p99, float(x[min(len(x) - 1, int(0.99 * len(x)))]))
        label = f"{name} (n={len(samples):,})"
        (line,) = cdf.plot(x, y, label=label, linewidth=1.6)
        # Tail: the fraction of samples at or above x, where p99 and stalls show.
        tail.plot(x, 1.0 - y + 1.0 / len(samples), color=line.get_color(), linewidth=1.6)
    for ax in (cdf, tail):
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        if mark_ms:
            ax.axvline(mark_ms, color="grey", linestyle="--", linewidth=1)
    tail.set_xscale("log")
    if log_x:
        cdf.set_xscale("log")
    elif worst_p99 > 0:
        cdf.set_xlim(0, 1.2 * worst_p99)
    cdf.set_ylabel("fraction ≤ x")
    cdf.set_ylim(0, 1.0)
    cdf.set_title(f"{title}: distribution")
    cdf.legend(loc="lower right", fontsize=8)
    tail.set_yscale("log")
    tail.set_ylabel("fraction ≥ x")
    tail.set_title(f"{title}: tail")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def draw(raw: dict[str, Any], out_dir: Path, plan: dict[str, Any]) -> list[dict[str, str]]:
    """Draw the plots from raw samples ({contender: [round: {scenario: {name: [...]}}]});
    returns what was written, for the report."""
    out_dir.mkdir(parents=True, exist_ok=True)

    def gather(scenario: str, name: str) -> dict[str, list[float]]:
        return {
            contender: [v for r in rounds for v in r.get(scenario, {}).get(name, [])]
            for contender, rounds in raw.items()
        }

    written = []
    ttft = gather("c1", "ttft_s")
    if any(ttft.values()):
        _panel_pair(
            ttft,
            title=f"Time to first event, concurrency 1 ({plan['c1_events']}-event bursts)",
            xlabel="TTFT (ms, log scale)",
            log_x=True,
            path=out_dir / "ttft.png",
        )
        written.append({"file": "ttft.png", "title": "TTFT at concurrency 1"})
    gaps = gather("paced", "gap_s")
    if any(gaps.values()):
        _panel_pair(
            gaps,
            title=(
                f"Gap between events, {plan['paced_streams']} streams paced "
                f"{plan['paced_interval_ms']:g} ms"
            ),
            xlabel=f"gap (ms; dashed: the {plan['paced_interval_ms']:g} ms pacing)",
            log_x=False,
            path=out_dir / "gaps.png",
            mark_ms=plan["paced_interval_ms"],
        )
        written.append({"file": "gaps.png", "title": "gaps between events, paced streams"})
    return written
