"""The access log: one line per request, written when the request ends, however it ended.

Hypercorn's own access log is off: it writes nothing for a stream its client or its backend
cut off, which are the lines an operator looks for. Lines carry no body and no header value
but `X-Request-Id` and the trace id of `traceparent` (never `Authorization`). Values that come
from the client (the model, the path) are quoted and escaped when they hold anything but plain
characters, so a crafted model name cannot forge a log line.
"""

from __future__ import annotations

import re

import orjson

from gateway.logs import STDOUT, LineWriter, timestamp
from gateway.observe import CLIENT_CLOSED_STATUS, RequestRecord

# Probes and scrapes come every few seconds from machines, not users: counted in the
# metrics, kept out of the log.
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})

_PLAIN = re.compile(rb"[\x21-\x7e]*")


def fields(record: RequestRecord) -> dict[str, object]:
    ttfb = record.ttfb_s
    return {
        "time": timestamp(record.wall + record.duration_s),
        "request_id": record.request_id,
        "trace_id": record.trace_id,
        "method": record.method,
        "path": record.path,
        "model": record.model,
        "stream": record.stream,
        "replica": record.replica,
        "attempts": record.attempts,
        "status": record.status or CLIENT_CLOSED_STATUS,
        "outcome": record.outcome,
        "ttfb_ms": None if ttfb is None else round(ttfb * 1000, 3),
        "duration_ms": round(record.duration_s * 1000, 3),
        "bytes_in": record.bytes_in,
        "bytes_out": record.bytes_out,
        "client": record.client,
    }


def render_json(record: RequestRecord) -> bytes:
    line = fields(record)
    line = {"time": line.pop("time"), "level": "info", "logger": "gateway.access", **line}
    return orjson.dumps(line) + b"\n"


def _text_value(value: object) -> bytes:
    if value is None or value == "":
        return b"-"
    if value is True or value is False:
        return b"true" if value else b"false"
    text = str(value).encode("utf-8", "replace")
    return text if _PLAIN.fullmatch(text) and b'"' not in text else orjson.dumps(str(value))


def render_text(record: RequestRecord) -> bytes:
    line = fields(record)
    head = f"{line.pop('time')} INFO gateway.access:".encode()
    parts = [head]
    for name, value in line.items():
        parts.append(name.encode() + b"=" + _text_value(value))
    return b" ".join(parts) + b"\n"


class AccessLog:
    """Hands each finished request to the writer thread, which renders and writes it."""

    __slots__ = ("_writer", "_render")

    def __init__(self, writer: LineWriter, *, form: str) -> None:
        self._writer = writer
        self._render = render_json if form == "json" else render_text

    def request_done(self, record: RequestRecord) -> None:
        if record.path not in QUIET_PATHS:
            self._writer.put(STDOUT, self._render, record)

    def __repr__(self) -> str:
        return f"<AccessLog [{self._render.__name__}]>"
