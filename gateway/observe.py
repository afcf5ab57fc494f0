"""What one request did, recorded as it goes, for the metrics and the access log.

A `RequestRecord` is filled by the code that knows each fact (the proxy the model, the
forwarder the replica, the status and the bytes) and handed to `Observer.done` once, when the
request is over, whichever way it ended. Nothing here runs per streamed event: the relay only
adds the chunk's length to `bytes_out`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

# How a request ended. A status alone does not say it: a stream that began 200 can still be
# cut off by its client or its backend.
OK = "ok"  # answered, whatever the status (vLLM's own 400 included)
CLIENT_CLOSED = "client_closed"  # the client left before the end
CLIENT_TIMEOUT = "client_timeout"  # the client stopped reading and was cut off
UPSTREAM_ERROR = "upstream_error"  # unreachable, reset, 5xx, or broke off mid-response
TIMEOUT = "timeout"  # no connection, no headers or silence past its deadline
REJECTED = "rejected"  # refused by the gateway itself (bad request, no key, limits, no replica)

OUTCOMES = (OK, CLIENT_CLOSED, CLIENT_TIMEOUT, UPSTREAM_ERROR, TIMEOUT, REJECTED)

# nginx's code for a request whose client left before any status was sent.
CLIENT_CLOSED_STATUS = 499


class RequestRecord:
    """One request's facts; `status` 0 and `first_byte` 0.0 until they happen."""

    __slots__ = (
        "started",
        "wall",
        "method",
        "path",
        "peer",
        "request_id",
        "traceparent",
        "model",
        "stream",
        "replica",
        "attempts",
        "status",
        "outcome",
        "first_byte",
        "ended",
        "bytes_in",
        "bytes_out",
    )

    def __init__(
        self, method: str, path: str, client: tuple[str, int] | None, started: float
    ) -> None:
        self.started = started  # the loop's clock
        self.wall = time.time()
        self.method = method
        self.path = path
        # The ASGI scope's (host, port), formatted only when a line is written.
        self.peer = client
        self.request_id = ""
        self.traceparent = b""
        self.model = ""
        self.stream = False
        self.replica = ""
        self.attempts = 0
        self.status = 0
        self.outcome = OK
        self.first_byte = 0.0
        self.ended = 0.0
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def trace_id(self) -> str:
        """W3C trace context: `00-<32 hex trace id>-<16 hex parent>-<flags>`."""
        parts = self.traceparent.split(b"-")
        if len(parts) >= 4 and len(parts[1]) == 32:
            return parts[1].decode("latin-1")
        return ""

    @property
    def client(self) -> str:
        peer = self.peer
        return f"{peer[0]}:{peer[1]}" if peer else ""

    @property
    def ttfb_s(self) -> float | None:
        return self.first_byte - self.started if self.first_byte else None

    @property
    def duration_s(self) -> float:
        return self.ended - self.started

    def __repr__(self) -> str:
        return (
            f"<RequestRecord {self.method} {self.path} [{self.model or '-'} | "
            f"{self.status} {self.outcome} | {self.attempts} attempts]>"
        )


class Sink(Protocol):
    def request_done(self, record: RequestRecord) -> None: ...


class Observer:
    """Where finished requests go: the metrics, then the access log (either may be absent)."""

    __slots__ = ("_sinks", "clock")

    def __init__(self, *sinks: Sink | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._sinks = tuple(sink for sink in sinks if sink is not None)
        self.clock = clock

    def done(self, record: RequestRecord) -> None:
        record.ended = self.clock()
        for sink in self._sinks:
            sink.request_done(record)

    def __repr__(self) -> str:
        return f"<Observer [{len(self._sinks)} sinks]>"
