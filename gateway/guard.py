"""The watchman beside each forwarded request: client departure, slow clients and timeouts.

Both end the request the same way, by cancelling its task, so the forwarding code has one
place to clean up: close the upstream connection, which is what makes vLLM abort.
"""

from __future__ import annotations

import asyncio

from gateway.types import Receive


class RequestGuard:
    """Cancels the request's task when its client leaves or the backend stays silent too long.

    Under hypercorn a departed client shows only as an `http.disconnect` from `receive()`
    (sends after it are silently dropped), so without the watcher a stream to nobody would
    keep vLLM generating to the end. The idle timer is lazy: a chunk only stores the time, and
    the timer re-arms itself at most once per idle period, so the per-chunk cost is one store.
    """

    __slots__ = (
        "gone",
        "expired",
        "slow_client",
        "last",
        "sending",
        "_done",
        "_loop",
        "_task",
        "_watcher",
        "_timer",
        "_headers_due",
        "_idle_s",
    )

    def __init__(
        self, receive: Receive, *, headers_timeout_s: float, idle_timeout_s: float
    ) -> None:
        self.gone = False
        self.expired = False
        self.slow_client = False
        # When the send to the client now blocked began (loop clock), 0.0 when not sending:
        # that time is the client's, judged by the same idle limit but never the backend's.
        self.sending = 0.0
        self._done = False
        loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        now = self.last = loop.time()
        # One deadline for the response headers, across every retry; 0.0 once they are in.
        self._headers_due = now + headers_timeout_s
        self._idle_s = idle_timeout_s
        self._watcher = loop.create_task(self._watch(receive))
        # One timer for the whole request, armed at the earlier of the two deadlines and
        # re-armed by `_check` when it fires early: no timer work when the headers arrive.
        self._timer: asyncio.TimerHandle | None = loop.call_at(
            now + min(headers_timeout_s, idle_timeout_s), self._check
        )

    @property
    def tripped(self) -> bool:
        return self.gone or self.expired or self.slow_client

    def streaming(self) -> None:
        """Headers are in: from now on only silence between chunks counts."""
        self._headers_due = 0.0
        self.last = self._loop.time()

    def finish(self) -> None:
        """The response is complete or being ended on purpose: nothing may cancel it now."""
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        self.finish()
        self._watcher.cancel()

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
        # Hypercorn also reports a disconnect once the response is complete: not a departure.
        if not self._done and not self.tripped:
            self.gone = True
            self._task.cancel()

    def _check(self) -> None:
        sending = self.sending
        due = sending + self._idle_s if sending else self._headers_due or self.last + self._idle_s
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check)
            return
        self._timer = None
        if not self._done and not self.tripped:
            if sending:
                self.slow_client = True
            else:
                self.expired = True
            self._task.cancel()
