"""GATEWAY_WORKERS > 1: a supervisor process and N worker processes serving one port.

The supervisor binds one listening socket per worker on the same address, all with
SO_REUSEPORT, so the kernel spreads new connections over them (by a hash of each connection's
addresses and ports), and hands worker i socket i. It keeps its own copy of every socket: a
worker that dies is replaced on the same socket, and the connections queued on it wait for the
replacement instead of being reset. The supervisor runs no event loop and serves no traffic.

Each worker is a whole gateway: its own health checks, its own round-robin, its own
GATEWAY_MAX_CONCURRENCY. N workers send N times the health-check traffic.
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

import uvloop
from prometheus_client.multiprocess import mark_process_dead

from gateway.logs import LineWriter, configure_logging
from gateway.server import listening_socket, serve
from gateway.settings import Settings

log = logging.getLogger("gateway.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# At most one start per slot in this interval: a worker that crashes as it starts is
# restarted once a second rather than in a tight loop. One that ran longer restarts at once.
RESTART_INTERVAL_S = 1.0
# How long past the drain timeout a stopping worker may take to exit before it is killed:
# hypercorn's own grace and the closing of the upstream sessions come after the drain.
EXIT_GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def supervise(settings: Settings) -> int:
    """Serve with `settings.workers` worker processes on one port; return the exit status."""
    try:
        sockets = listening_sockets(settings.host, settings.port, settings.workers)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc.strerror or exc)
        return 1
    with metrics_directory(settings.metrics_dir) as metrics_dir:
        return Supervisor(settings, sockets, metrics_dir).run()


@contextmanager
def metrics_directory(configured: str) -> Iterator[str]:
    """The workers' shared metrics directory, emptied, and named in the environment.

    prometheus-client picks its multi-process mode from PROMETHEUS_MULTIPROC_DIR when a
    worker first builds a metric, so the supervisor sets it before any worker starts (each
    spawned worker inherits it). Files left by an earlier run would be summed into this
    one's counters: the directory starts empty. One made here is removed at exit.
    """
    made = not configured
    path = tempfile.mkdtemp(prefix="vllm-gateway-metrics-") if made else configured
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.unlink(os.path.join(path, name))
    os.environ[MULTIPROC_ENV] = path
    try:
        yield path
    finally:
        if made:
            shutil.rmtree(path, ignore_errors=True)


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` sockets listening on host:port, the kernel choosing one for each connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # SO_REUSEPORT would also let these join the group of a socket already listening there
    # with it set (a second gateway started on the same port by mistake), silently sharing its
    # connections. A first bind without it fails instead, as a single-process gateway would.
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            # Listening from now on: connections queue before the worker is up, and while
            # a dead worker's replacement starts.
            sockets.append(listening_socket(host, port, reuse_port=True))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Slot:
    """One worker's place: its listening socket, the process serving it now, when that began."""

    __slots__ = ("index", "sock", "process", "started_at", "starts")

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self.process: BaseProcess | None = None
        self.started_at = -math.inf
        self.starts = 0

    @property
    def due(self) -> float:
        """The earliest time, on the monotonic clock, a worker may start here."""
        return self.started_at + RESTART_INTERVAL_S

    def __repr__(self) -> str:
        pid = self.process.pid if self.process is not None else None
        return f"<Slot {self.index} [pid {pid}, {self.starts} starts]>"


class Supervisor:
    """Keeps one worker per socket running until SIGTERM or SIGINT, then stops them all."""

    __slots__ = ("_settings", "_slots", "_context", "_stopping", "_metrics_dir")

    def __init__(
        self, settings: Settings, sockets: Sequence[socket.socket], metrics_dir: str
    ) -> None:
        self._settings = settings
        self._metrics_dir = metrics_dir
        self._slots = [Slot(index, sock) for index, sock in enumerate(sockets, 1)]
        # Spawn, not fork: a worker starts from a clean interpreter rather than a copy of the
        # supervisor, and the listening sockets are handed over explicitly, one per worker.
        self._context = multiprocessing.get_context("spawn")
        self._stopping = False

    def __repr__(self) -> str:
        running = sum(slot.process is not None for slot in self._slots)
        state = "stopping" if self._stopping else "serving"
        return f"<Supervisor [{len(self._slots)} workers: {running} running | {state}]>"

    def run(self) -> int:
        """Start the workers, replace any that dies, and stop them all on SIGTERM or SIGINT.

        Call it on the main thread: it takes over the stop signals and the signal wakeup fd.
        """
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        # A signal writes a byte here, so the wait below returns at once: a Python handler
        # alone would run only after it, as the wait is retried on EINTR.
        previous_fd = signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        previous = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        try:
            while True:
                self._reap()
                if self._stopping:
                    return self._stop()
                timeout = self._start_due()
                sentinels = [s.process.sentinel for s in self._slots if s.process is not None]
                wait([*sentinels, wake_read], timeout)
                _drain(wake_read)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(previous_fd)
            wake_read.close()
            wake_write.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _reap(self) -> None:
        for slot in self._slots:
            process = slot.process
            if process is None or process.exitcode is None:
                continue
            how = _exit(process.exitcode)
            if process.pid is not None:
                # Its live gauges (in flight, replica state) leave the sum; its counters stay.
                mark_process_dead(process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
            if self._stopping:
                log.warning("worker %d (pid %s) %s", slot.index, process.pid, how)
            else:
                delay = max(0.0, slot.due - time.monotonic())
                log.error(
                    "worker %d (pid %s) %s; restarting it in %.1f s",
                    slot.index,
                    process.pid,
                    how,
                    delay,
                )
            process.close()
            slot.process = None

    def _start_due(self) -> float | None:
        """Start a worker in each empty slot that is due; return the seconds to the next one."""
        now = time.monotonic()
        waits: list[float] = []
        for slot in self._slots:
            if slot.process is not None:
                continue
            if slot.due > now:
                waits.append(slot.due - now)
                continue
            slot.started_at = now
            process = self._context.Process(
                target=work,
                args=(self._settings, slot.sock, os.getpid(), self._metrics_dir),
                name=f"gateway-worker-{slot.index}",
                # Should the supervisor itself fail, multiprocessing's exit handler sends
                # daemonic workers SIGTERM (they drain) rather than waiting on them forever.
                daemon=True,
            )
            try:
                process.start()
            except OSError as exc:
                log.error("cannot start worker %d: %s", slot.index, exc)
                waits.append(RESTART_INTERVAL_S)
                continue
            slot.process = process
            slot.starts += 1
            if slot.starts == 1:
                log.info("worker %d started: pid %s", slot.index, process.pid)
            else:
                log.warning("worker %d restarted: pid %s", slot.index, process.pid)
        return min(waits, default=None)

    def _stop(self) -> int:
        running = [slot.process for slot in self._slots if slot.process is not None]
        log.info("stopping: %d workers draining", len(running))
        for process in running:
            process.terminate()  # SIGTERM: each worker drains as a single gateway does
        # Each worker keeps its own copy of its socket until its drain is over, answering 503
        # meanwhile; once it closes that copy, the kernel sends the socket no more connections.
        # Were the supervisor to keep its copy, they would queue there unanswered until it exits.
        for slot in self._slots:
            slot.sock.close()
        deadline = time.monotonic() + self._settings.drain_timeout_s + EXIT_GRACE_S
        status = 0
        for process in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.error("worker pid %s still running after its drain; killing it", process.pid)
                process.kill()
                process.join()
                status = 1
        log.info("all workers stopped")
        return status


def work(settings: Settings, sock: socket.socket, supervisor_pid: int, metrics_dir: str) -> None:
    """A worker process: the whole gateway on `sock` until SIGTERM or SIGINT, then its drain."""
    _follow_supervisor(supervisor_pid)
    writer = LineWriter()
    configure_logging(settings.log_level, with_pid=True, form=settings.log_format, writer=writer)
    try:
        uvloop.run(serve(settings, writer=writer, sock=sock, metrics_dir=metrics_dir))
    finally:
        writer.close()


def _follow_supervisor(supervisor_pid: int) -> None:
    """Make sure this worker does not outlive its supervisor, even one killed with SIGKILL.

    The kernel's parent-death signal rather than a task polling os.getppid(): it costs the
    worker nothing while it runs and arrives however busy its loop is. It is SIGTERM, so an
    orphaned worker drains as on any shutdown. The kernel sends it when the thread that
    started the worker exits: the supervisor starts every worker from its main thread.
    Linux only; elsewhere an orphaned worker keeps serving until stopped.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # The supervisor may have died before the prctl call, and then no signal will come.
    if os.getppid() != supervisor_pid:
        raise SystemExit(0)


def _exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        pass
