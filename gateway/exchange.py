"""One request's trip to a backend and back: retries before the first byte, then the relay.

Rules, as Envoy, HAProxy and nginx apply them:
- A request is retried on another replica only while nothing has gone to the client, and
  only when the backend cannot have produced an answer (refused, reset, connect timeout, a
  pooled connection closed unanswered) or answered 502/503/504. Never on a 4xx, never after
  the response has started.
- Each chunk is passed on as it arrives, as the same bytes. For an SSE stream only whole
  events are passed, so that if the backend dies mid-stream the error event the client gets
  never lands inside a half-sent event.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time

import aiohttp
import orjson

from gateway.errors import GatewayError, UpstreamFailure, UpstreamTimeout
from gateway.guard import RequestGuard
from gateway.headers import request_headers, response_headers
from gateway.metrics import Metrics
from gateway.observe import (
    CLIENT_CLOSED,
    CLIENT_TIMEOUT,
    TIMEOUT,
    UPSTREAM_ERROR,
    RequestRecord,
)
from gateway.replicas import Registry, Replica
from gateway.types import Receive, Scope, Send
from gateway.upstream import upstream_errors

log = logging.getLogger("gateway.exchange")

RETRY_STATUSES = frozenset({502, 503, 504})


def _stream_error(message: str, kind: str, code: int) -> bytes:
    # vLLM's own in-stream error frame, so clients that handle vLLM's handle ours.
    error = {"message": message, "type": kind, "param": None, "code": code}
    return b"data: " + orjson.dumps({"error": error}) + b"\n\n"


BROKEN_EVENT = _stream_error(
    "The model server stopped in the middle of the response.", "BadGatewayError", 502
)
SILENT_EVENT = _stream_error(
    "The model server sent nothing for longer than the gateway's idle timeout.",
    "GatewayTimeoutError",
    504,
)


# An SSE event ends at a blank line; the spec allows LF, CRLF and CR line ends.
_BLANK_LINES = (b"\n\n", b"\r\n\r\n", b"\r\r")


def complete_events(chunk: bytes) -> int:
    """How many leading bytes of `chunk` are whole SSE events (up to a blank line)."""
    if chunk.endswith(b"\n\n") or chunk.endswith(b"\r\n\r\n"):
        return len(chunk)  # vLLM writes whole events: the common case costs no search.
    end = 0
    for blank_line in _BLANK_LINES:
        found = chunk.rfind(blank_line)
        if found >= 0:
            end = max(end, found + len(blank_line))
    return end


class Forwarder:
    """Sends requests to replicas and relays their answers; one per gateway."""

    __slots__ = (
        "_registry",
        "_session",
        "_fresh_session",
        "_metrics",
        "_retries",
        "_headers_timeout_s",
        "_idle_timeout_s",
        "_id_prefix",
        "_ids",
    )

    def __init__(
        self,
        registry: Registry,
        session: aiohttp.ClientSession,
        *,
        fresh_session: aiohttp.ClientSession,
        metrics: Metrics,
        retries: int,
        headers_timeout_s: float,
        idle_timeout_s: float,
    ) -> None:
        self._registry = registry
        self._session = session
        self._fresh_session = fresh_session
        self._metrics = metrics
        self._retries = retries
        self._headers_timeout_s = headers_timeout_s
        self._idle_timeout_s = idle_timeout_s
        # Request ids unique across gateway processes without a syscall per request.
        self._id_prefix = f"gw-{os.urandom(6).hex()}-"
        self._ids = itertools.count(1)

    async def forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        record: RequestRecord,
        replica: Replica,
        body: bytes,
    ) -> None:
        headers, record.request_id, record.traceparent = request_headers(
            scope["headers"], f"{self._id_prefix}{next(self._ids)}"
        )
        guard = RequestGuard(
            receive,
            headers_timeout_s=self._headers_timeout_s,
            idle_timeout_s=self._idle_timeout_s,
        )
        response: aiohttp.ClientResponse | None = None
        try:
            try:
                response, replica = await self._open(scope, record, replica, body, headers)
            except GatewayError as error:
                guard.finish()
                record.status = error.status
                record.outcome = TIMEOUT if isinstance(error, UpstreamTimeout) else UPSTREAM_ERROR
                await error.send_to(send)
                return
            await self._relay(response, send, guard, replica, record)
        except asyncio.CancelledError:
            if not guard.tripped:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            # Closing the upstream connection is what makes vLLM abort the generation;
            # aiohttp has already closed it if the response had not started.
            if response is not None:
                response.close()
            if guard.slow_client:
                # The client's fault, not the replica's: no strike, its own outcome.
                log.warning(
                    "client %s took no data for %g s: cut off (request %s)",
                    record.client,
                    self._idle_timeout_s,
                    record.request_id,
                )
                record.outcome = CLIENT_TIMEOUT
            elif guard.gone:
                record.outcome = CLIENT_CLOSED
            elif response is None:
                log.warning("no response headers from %s in time", record.replica)
                self._metrics.upstream_error("timeout")
                guard.finish()
                late = UpstreamTimeout("The model server did not answer in time.", retryable=False)
                record.status = late.status
                record.outcome = TIMEOUT
                await late.send_to(send)
        finally:
            guard.close()
            if response is not None:
                # Back to the pool if the body was read to the end, else the connection closes.
                response.release()
                replica.inflight -= 1

    async def _open(
        self,
        scope: Scope,
        record: RequestRecord,
        replica: Replica,
        body: bytes,
        headers: list[tuple[str, str]],
    ) -> tuple[aiohttp.ClientResponse, Replica]:
        """The first usable response, retrying on other replicas while that is safe."""
        path = scope["path"]
        query = scope["query_string"]
        model = record.model
        registry = self._registry
        metrics = self._metrics
        tried: list[Replica] = []
        session = self._session
        while True:
            tried.append(replica)
            record.replica = replica.backend.url
            record.attempts += 1
            url = replica.url(path) if not query else replica.url_with_query(path, query)
            replica.inflight += 1
            try:
                with upstream_errors():
                    response = await session.post(url, data=body, headers=headers)
            except BaseException as exc:
                replica.inflight -= 1
                if not isinstance(exc, UpstreamFailure):
                    raise  # cancelled: the client left or the headers deadline passed
                failure = exc
                log.warning("%s %s: %r", replica.backend.url, path, failure.__context__)
                metrics.upstream_error(failure.kind)
                if failure.stale:
                    # Not the replica's fault: its idle connection timed out under us.
                    session = self._fresh_session
                else:
                    registry.record_failure(replica)
                retry = (
                    self._retry_target(model, tried, failure, body) if failure.retryable else None
                )
                if retry is None:
                    raise
                metrics.retry(failure.kind)
                replica = retry
                continue
            status = response.status
            if status >= 500:
                metrics.upstream_error("5xx")
            if status in RETRY_STATUSES and len(tried) <= self._retries:
                retry = registry.pick_another(model, tried, body)
                if retry is not None:
                    registry.record_failure(replica)
                    log.warning("%s %s answered %d; retrying", replica.backend.url, path, status)
                    metrics.retry(str(status))
                    response.release()
                    replica.inflight -= 1
                    replica = retry
                    continue
            if status >= 500:
                registry.record_failure(replica)
            else:
                registry.record_success(replica)
            return response, replica

    def _retry_target(
        self, model: str, tried: list[Replica], failure: UpstreamFailure, body: bytes
    ) -> Replica | None:
        if len(tried) > self._retries:
            return None
        other = self._registry.pick_another(model, tried, body)
        if other is None and failure.stale and tried.count(tried[-1]) == 1:
            # The only replica closed a pooled connection unanswered: one fresh try.
            return tried[-1]
        return other

    async def _relay(
        self,
        response: aiohttp.ClientResponse,
        send: Send,
        guard: RequestGuard,
        replica: Replica,
        record: RequestRecord,
    ) -> None:
        headers, streaming = response_headers(response.raw_headers, record.request_id)
        record.status = status = response.status
        record.stream = streaming
        guard.streaming()
        clock = asyncio.get_running_loop().time
        await send({"type": "http.response.start", "status": status, "headers": headers})
        content = response.content
        pending = b""
        sent = 0
        try:
            while True:
                # Silence is timed from here: a client slow to take our last send is not
                # the backend's silence (the guard judges that time apart, as the client's).
                guard.sending = 0.0
                guard.last = clock()
                try:
                    chunk = await content.readany()
                except (aiohttp.ClientError, OSError) as exc:
                    # Only the backend's side: a failure to send to the client is not
                    # the replica's fault.
                    log.warning("%s broke off a response: %r", replica.backend.url, exc)
                    self._metrics.upstream_error(
                        "protocol" if isinstance(exc, aiohttp.ClientPayloadError) else "reset"
                    )
                    self._registry.record_failure(replica)
                    record.outcome = UPSTREAM_ERROR
                    record.bytes_out = sent
                    await self._break_off(send, guard, BROKEN_EVENT if streaming else b"")
                    return
                if not chunk:
                    break
                if streaming:
                    if pending:
                        chunk = pending + chunk
                    end = complete_events(chunk)
                    pending = chunk[end:]
                    if not end:
                        continue
                    chunk = chunk[:end]
                if not sent:
                    record.first_byte = time.monotonic()
                sent += len(chunk)
                guard.sending = clock()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except asyncio.CancelledError:
            record.bytes_out = sent
            if not guard.expired:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            log.warning("%s was silent past the idle timeout", replica.backend.url)
            self._metrics.upstream_error("timeout")
            record.outcome = TIMEOUT
            response.close()
            await self._break_off(send, guard, SILENT_EVENT if streaming else b"")
            return
        guard.finish()
        if pending:
            # The stream ended cleanly on a partial event: pass it on as the backend sent it.
            if not sent:
                record.first_byte = time.monotonic()
            sent += len(pending)
            await send({"type": "http.response.body", "body": pending, "more_body": True})
        record.bytes_out = sent
        if status >= 500:
            record.outcome = UPSTREAM_ERROR
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _break_off(send: Send, guard: RequestGuard, event: bytes) -> None:
        """End a started response abnormally: an error event, then no clean end.

        Returning without the final message makes the server close the connection without
        the terminating chunk, so the client sees a truncated response, never a `[DONE]` or a
        complete body it could mistake for the whole answer.
        """
        guard.finish()
        if event:
            await send({"type": "http.response.body", "body": event, "more_body": True})
