"""The proxied routes: read the body, route by its `model`, stream the backend's answer back.

The hot path is raw ASGI. The body is parsed once, only to read `model`; the original bytes go
upstream. Each chunk the backend sends is passed to `send` as it arrives, as the same bytes.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import orjson
from yarl import URL

from gateway.errors import (
    BadRequest,
    GatewayError,
    MethodNotAllowed,
    PayloadTooLarge,
)
from gateway.headers import request_headers, response_headers
from gateway.replicas import Registry, Replica
from gateway.types import Receive, Scope, Send
from gateway.upstream import upstream_errors

log = logging.getLogger("gateway.proxy")

PROXIED_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/score",
    "/v1/rerank",
    "/v2/rerank",
    "/classify",
    "/pooling",
    "/tokenize",
    "/detokenize",
)

_ALLOW_POST = ((b"allow", b"POST"),)


class ClientGone(Exception):
    """The client disconnected while its request body was still being read."""


class BodyRefused(Exception):
    """The request was refused before its body was read to the end."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refusing more than `limit` bytes without reading on."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise BodyRefused(
                    BadRequest("The Content-Length header is not a number.")
                ) from None
            if declared > limit:
                raise BodyRefused(_too_large(limit))
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                # Chunked uploads carry no length up front; stop at the limit, not the end.
                raise BodyRefused(_too_large(limit))
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _discard_body(receive: Receive) -> None:
    """Take what is left of a refused body off the server's queue.

    Hypercorn hands body chunks to the app through a bounded queue; if the app returns while
    the client is still sending, the connection's reader blocks on that queue for good. The
    server closes the connection after our error, so this ends at the next disconnect.
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than the gateway's limit of {limit} bytes.")


def model_of(body: bytes) -> str:
    """The request's `model`, from one parse of the body."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(document, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = document.get("model")
    if model is None:
        raise BadRequest(
            "You must provide a model parameter: the gateway routes by it.", param="model"
        )
    if not isinstance(model, str):
        raise BadRequest("The model parameter must be a string.", param="model")
    return model


class _DisconnectWatch:
    """Watches `receive()` beside the response and cancels the request's task if the client goes.

    Under hypercorn a departed client shows only as an `http.disconnect` from `receive()`
    (sends after it are silently dropped), so without this a stream to nobody would keep
    vLLM generating until the end.
    """

    __slots__ = ("gone", "done", "_task", "_watcher")

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        self.done = False
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
        # Hypercorn also reports a disconnect once the response is complete: not a departure.
        if not self.done:
            self.gone = True
            self._task.cancel()

    def finish(self) -> None:
        """The response is complete from here on; no disconnect may cancel it."""
        self.done = True

    def stop(self) -> None:
        self.done = True
        self._watcher.cancel()


class Inflight:
    """How many requests are being forwarded now; `wait_idle` returns when none is."""

    __slots__ = ("count", "_idle")

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def __repr__(self) -> str:
        return f"<Inflight [{self.count} requests]>"


class Proxy:
    """The ASGI app behind every proxied route."""

    __slots__ = ("_registry", "_session", "_max_body_bytes", "inflight")

    def __init__(
        self, registry: Registry, session: aiohttp.ClientSession, *, max_body_bytes: int
    ) -> None:
        self._registry = registry
        self._session = session
        self._max_body_bytes = max_body_bytes
        self.inflight = Inflight()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            error = MethodNotAllowed(f"{scope['path']} takes POST.", headers=_ALLOW_POST)
            await error.send_to(send)
            return
        try:
            body = await read_body(scope, receive, self._max_body_bytes)
            replica = self._registry.pick(model_of(body))
        except ClientGone:
            return
        except BodyRefused as refused:
            await refused.error.send_to(send)
            await _discard_body(receive)
            return
        except GatewayError as error:
            await error.send_to(send)
            return
        self.inflight.enter()
        try:
            await self._forward(scope, receive, send, replica, body)
        finally:
            self.inflight.leave()

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, replica: Replica, body: bytes
    ) -> None:
        url = replica.url(scope["path"])
        if scope["query_string"]:
            url = URL(f"{url}?{scope['query_string'].decode('latin-1')}", encoded=True)
        watch = _DisconnectWatch(receive)
        response: aiohttp.ClientResponse | None = None
        try:
            try:
                with upstream_errors():
                    response = await self._session.post(
                        url, data=body, headers=request_headers(scope["headers"])
                    )
            except GatewayError as error:
                log.warning("%s %s: %r", replica.backend.url, scope["path"], error.__context__)
                watch.finish()
                await error.send_to(send)
                return
            await self._relay(response, send, watch, replica)
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            # The client left. Closing the upstream connection is what makes vLLM abort the
            # generation; aiohttp has already closed it if the response had not started.
            if response is not None:
                response.close()
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            log.debug("client left %s; closed the upstream request", scope["path"])
        finally:
            watch.stop()
            if response is not None:
                # Closes the connection unless the body was read to the end, when it goes
                # back to the pool.
                response.release()

    @staticmethod
    async def _relay(
        response: aiohttp.ClientResponse, send: Send, watch: _DisconnectWatch, replica: Replica
    ) -> None:
        headers, _ = response_headers(response.raw_headers)
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        content = response.content
        try:
            while chunk := await content.readany():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            # The backend died or went silent mid-response. Returning without the final
            # message makes the server end the response abnormally, so the client sees a
            # truncated body, never a clean end it could take for a complete answer.
            log.warning("%s broke off a response: %r", replica.backend.url, exc)
            response.close()
            return
        watch.finish()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
