"""Log output: every line, the access log's included, goes through one writer thread.

The event loop never writes to stdout or stderr itself: a slow reader of the container's
output (a full pipe, a stalled log shipper) would stop every stream the gateway serves. Lines
go into a bounded queue that a thread drains; past the cap, lines are dropped and counted.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

STDOUT = 1
STDERR = 2
# Lines waiting for the writer, at most; about 4 MiB of access lines.
QUEUE_CAP = 16384
# While lines keep coming, the writer wakes this often and writes what has queued: no signal
# per line from the loop, one write for many lines, at most this much delay before a line shows.
FLUSH_INTERVAL_S = 0.05
# After this many wake-ups with nothing to write (a second), it sleeps until the next line.
QUIET_POLLS = 20
# A pipe write up to PIPE_BUF bytes is atomic: lines of several workers sharing one stderr
# never interleave mid-line.
PIPE_BUF = 4096

Render = Callable[[Any], bytes]


class LineWriter:
    """A thread that writes queued lines to their file descriptors, never blocking `put`."""

    __slots__ = (
        "_queue",
        "_cap",
        "_quiet_polls",
        "dropped",
        "_wake",
        "_signalled",
        "_lock",
        "_thread",
        "_closed",
    )

    def __init__(self, *, cap: int = QUEUE_CAP, quiet_polls: int = QUIET_POLLS) -> None:
        self._queue: deque[tuple[int, Render, Any]] = deque()
        self._cap = cap
        self._quiet_polls = quiet_polls
        self.dropped = 0
        # True while the writer is awake (polling) or already signalled: `put` then pays one
        # flag test, and signals only a writer that went to sleep after a quiet second.
        self._wake = threading.Event()
        self._signalled = True
        # Held while lines are taken and written, so that an explicit `flush` and the
        # thread never write parts of the queue out of order.
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def put(self, fd: int, render: Render, item: Any) -> None:
        """Queue `render(item)` for `fd`; the rendering, too, happens on the writer's thread."""
        if len(self._queue) >= self._cap:
            self.dropped += 1
            return
        self._queue.append((fd, render, item))
        if not self._signalled:
            self._signalled = True
            self._wake.set()

    def flush(self) -> None:
        """Write everything queued so far, on the caller's thread, before returning."""
        self._flush()

    def close(self) -> None:
        """Write what is queued and stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        quiet = 0
        while True:
            if quiet >= self._quiet_polls:
                # Nothing for a while: sleep until `put` signals, so an idle gateway's writer
                # never wakes. Say so first, then look once more, or a line put in between
                # would wait for the next one.
                self._signalled = False
                if not self._queue and not self._closed:
                    self._wake.wait()
                self._wake.clear()
                self._signalled = True
                quiet = 0
            if self._closed:
                self._flush()
                return
            time.sleep(FLUSH_INTERVAL_S)
            if self._queue:
                self._flush()
                quiet = 0
            else:
                quiet += 1

    def _flush(self) -> None:
        with self._lock:
            queue = self._queue
            pending: dict[int, list[bytes]] = {}
            while queue:
                fd, render, item = queue.popleft()
                try:
                    line = render(item)
                except Exception as exc:  # a line that cannot be rendered must not stop the log
                    line = f"log line could not be rendered: {exc!r}\n".encode()
                pending.setdefault(fd, []).append(line)
            for fd, lines in pending.items():
                _write_lines(fd, lines)

    def __repr__(self) -> str:
        return f"<LineWriter [{len(self._queue)} queued, {self.dropped} dropped]>"


def _write_lines(fd: int, lines: list[bytes]) -> None:
    batch = b""
    for line in lines:
        if batch and len(batch) + len(line) > PIPE_BUF:
            _write_all(fd, batch)
            batch = b""
        batch += line
    if batch:
        _write_all(fd, batch)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except InterruptedError:
            continue
        except OSError:
            return  # the reader is gone: nothing to write to
        view = view[written:]


def timestamp(wall: float) -> str:
    """ISO 8601 in UTC with milliseconds, as log collectors parse it."""
    seconds = int(wall)
    millis = int((wall - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class TextFormatter(logging.Formatter):
    def __init__(self, *, with_pid: bool) -> None:
        origin = "%(name)s[%(process)d]" if with_pid else "%(name)s"
        super().__init__(f"%(asctime)s %(levelname)s {origin}: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return timestamp(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, pid, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


class WriterHandler(logging.Handler):
    """Formats on the caller's thread (log records are rare) and hands the line to the writer."""

    def __init__(self, writer: LineWriter, fd: int = STDERR) -> None:
        super().__init__()
        self._writer = writer
        self._fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).encode("utf-8", "replace") + b"\n"
        except Exception:
            self.handleError(record)
            return
        self._writer.put(self._fd, bytes, line)


def configure_logging(
    level: str, *, with_pid: bool, form: str = "text", writer: LineWriter | None = None
) -> None:
    """Log at `level` in `form` (text or json); `with_pid` tags text lines with their process.

    With a `writer`, lines go through its thread; without one (the supervisor of several
    workers, which serves nothing), straight to stderr.
    """
    formatter: logging.Formatter = (
        JsonFormatter() if form == "json" else TextFormatter(with_pid=with_pid)
    )
    handler: logging.Handler = (
        WriterHandler(writer) if writer is not None else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
