"""The access log: one line per request, written when the request ends, however it ended.

Hypercorn's own access log is off: it writes nothing for a stream its client or its backend
cut off, which are the lines an operator looks for. Lines carry no body and no header value
but `X-Request-Id` and the trace id of `traceparent` (never `Authorization`). Values that come
from the client (the model, the path, the ids) are quoted and escaped when they hold anything
but plain characters, so a crafted model name cannot forge a log line.

Lines are rendered on the log writer's thread, one f-string or one orjson call each: rendering
counts in the gateway's CPU per request, so it is kept to what bench/instructions.py shows.
"""

from __future__ import annotations

import time

import orjson

from gateway.logs import STDOUT, LineWriter
from gateway.observe import CLIENT_CLOSED_STATUS, RequestRecord

# Probes and scrapes come every few seconds from machines, not users: counted in the
# metrics, kept out of the log.
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})


def _plain(value: str) -> str:
    """A client-controlled value as one text token: as is when plain, else a JSON string."""
    if not value:
        return "-"
    if value.isascii() and value.isprintable() and " " not in value and '"' not in value:
        return value
    return orjson.dumps(value).decode()


class Renderer:
    """Renders records as text or JSON lines; only ever called on the writer's thread."""

    __slots__ = ("_second", "_stamp", "render")

    def __init__(self, form: str) -> None:
        self._second = -1
        self._stamp = ""
        self.render = self.json if form == "json" else self.text

    def timestamp(self, wall: float) -> str:
        """ISO 8601 in UTC with milliseconds; the part up to the second is made once a second."""
        second = int(wall)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((wall - second) * 1000):03d}Z"

    def text(self, r: RequestRecord) -> bytes:
        ttfb = r.ttfb_s
        return (
            f"{self.timestamp(r.wall + r.duration_s)} INFO gateway.access: "
            f"request_id={_plain(r.request_id)} trace_id={_plain(r.trace_id)} "
            f"method={_plain(r.method)} path={_plain(r.path)} model={_plain(r.model)} "
            f"stream={'true' if r.stream else 'false'} replica={r.replica or '-'} "
            f"attempts={r.attempts} status={r.status or CLIENT_CLOSED_STATUS} "
            f"outcome={r.outcome} ttfb_ms={'-' if ttfb is None else f'{ttfb * 1000:.3f}'} "
            f"duration_ms={r.duration_s * 1000:.3f} bytes_in={r.bytes_in} "
            f"bytes_out={r.bytes_out} client={r.client or '-'}\n"
        ).encode()

    def json(self, r: RequestRecord) -> bytes:
        ttfb = r.ttfb_s
        line = {
            "time": self.timestamp(r.wall + r.duration_s),
            "level": "info",
            "logger": "gateway.access",
            "request_id": r.request_id,
            "trace_id": r.trace_id,
            "method": r.method,
            "path": r.path,
            "model": r.model,
            "stream": r.stream,
            "replica": r.replica,
            "attempts": r.attempts,
            "status": r.status or CLIENT_CLOSED_STATUS,
            "outcome": r.outcome,
            "ttfb_ms": None if ttfb is None else round(ttfb * 1000, 3),
            "duration_ms": round(r.duration_s * 1000, 3),
            "bytes_in": r.bytes_in,
            "bytes_out": r.bytes_out,
            "client": r.client,
        }
        return orjson.dumps(line) + b"\n"


class AccessLog:
    """Hands each finished request to the writer thread, which renders and writes it."""

    __slots__ = ("_writer", "_render")

    def __init__(self, writer: LineWriter, *, form: str) -> None:
        self._writer = writer
        self._render = Renderer(form).render

    def request_done(self, record: RequestRecord) -> None:
        if record.path not in QUIET_PATHS:
            self._writer.put(STDOUT, self._render, record)

    def __repr__(self) -> str:
        return f"<AccessLog [{self._render.__name__}]>"
