"""CPU time, RSS and open fds of a process tree, read from /proc (Linux only).

CPU comes from ``/proc/PID/task/*/schedstat`` (first field: ns spent on a CPU), summed over
every thread of the PID and of all its descendants. Sample before and after a run and subtract:
``cpu_seconds(before, after)``. Caveat: a thread or child that exits between the two samples
takes its CPU time with it, so keep the measured processes alive across the run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

PROC = "/proc"


@dataclass(frozen=True)
class ProcSample:
    """One reading of a process tree; ``at`` is ``time.monotonic()`` when it was taken."""

    root: int
    pids: tuple[int, ...]
    cpu_ns: int
    rss_bytes: int
    fds: int
    at: float


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None  # the process or thread went away while we looked


def parent_pid(pid: int) -> int | None:
    stat = _read(f"{PROC}/{pid}/stat")
    if stat is None:
        return None
    # The command name (field 2) may hold spaces and parentheses: parse after the last ')'.
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def tree_pids(root: int) -> list[int]:
    """``root`` and all its live descendants (the root first); empty if root is gone."""
    if not os.path.exists(f"{PROC}/{root}"):
        return []
    children: dict[int, list[int]] = {}
    for entry in os.listdir(PROC):
        if entry.isdigit():
            ppid = parent_pid(int(entry))
            if ppid is not None:
                children.setdefault(ppid, []).append(int(entry))
    found, todo = [root], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_ns(pid: int) -> int:
    """Nanoseconds on CPU of all live threads of one process."""
    total = 0
    try:
        tids = os.listdir(f"{PROC}/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for tid in tids:
        text = _read(f"{PROC}/{pid}/task/{tid}/schedstat")
        if text:
            total += int(text.split()[0])
    return total


def rss_bytes(pid: int) -> int:
    status = _read(f"{PROC}/{pid}/status")
    for line in (status or "").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    return 0  # gone, or a zombie / kernel thread without memory


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"{PROC}/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0


def sample(root: int) -> ProcSample:
    pids = tree_pids(root)
    return ProcSample(
        root=root,
        pids=tuple(pids),
        cpu_ns=sum(cpu_ns(p) for p in pids),
        rss_bytes=sum(rss_bytes(p) for p in pids),
        fds=sum(open_fds(p) for p in pids),
        at=time.monotonic(),
    )


def cpu_seconds(before: ProcSample, after: ProcSample) -> float:
    return (after.cpu_ns - before.cpu_ns) / 1e9


def cpu_share(before: ProcSample, after: ProcSample) -> float:
    """CPU seconds per wall second between two samples (1.0 = one full core)."""
    wall = after.at - before.at
    return cpu_seconds(before, after) / wall if wall > 0 else 0.0


def describe(before: ProcSample, after: ProcSample) -> dict[str, float | int]:
    """The usual figures of one run, ready for a JSON report."""
    return {
        "pid": after.root,
        "processes": len(after.pids),
        "cpu_s": round(cpu_seconds(before, after), 4),
        "cpu_cores": round(cpu_share(before, after), 4),
        "rss_mib_before": round(before.rss_bytes / 2**20, 2),
        "rss_mib_after": round(after.rss_bytes / 2**20, 2),
        "fds_after": after.fds,
    }


class Meter:
    """This process's CPU (reported as ``{name}_cpu_*``) and the watched trees' figures, from
    construction to ``report()``."""

    def __init__(self, pids: Sequence[int], *, name: str = "loadgen") -> None:
        self.name, self.pids = name, list(pids)
        self.cpu0, self.wall0 = time.process_time(), time.monotonic()
        self.before = {pid: sample(pid) for pid in self.pids}

    def report(self) -> dict[str, Any]:
        cpu, wall = time.process_time() - self.cpu0, time.monotonic() - self.wall0
        return {
            f"{self.name}_cpu_s": round(cpu, 3),
            f"{self.name}_cpu_cores": round(cpu / wall, 3),
            "processes": [describe(self.before[p], sample(p)) for p in self.pids],
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sample CPU/RSS/fds of process trees.")
    parser.add_argument("pids", type=int, nargs="+")
    parser.add_argument(
        "--every",
        type=float,
        default=0.0,
        help="seconds between samples; 0 prints one sample and exits",
    )
    args = parser.parse_args(argv)
    if args.every <= 0:
        for pid in args.pids:
            print(json.dumps(asdict(sample(pid))))
        return
    last = {pid: sample(pid) for pid in args.pids}
    while True:
        time.sleep(args.every)
        for pid in args.pids:
            now = sample(pid)
            print(json.dumps(describe(last[pid], now)), flush=True)
            last[pid] = now


if __name__ == "__main__":
    main()
