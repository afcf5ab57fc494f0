"""The proxied routes: admit the request, read its body, route it by `model`, hand it on.

The body is parsed once, only to read `model`; the original bytes go upstream (exchange.py).
"""

from __future__ import annotations

import asyncio

import orjson

from gateway.errors import (
    BadRequest,
    GatewayError,
    MethodNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    ShuttingDown,
    TooManyRequests,
)
from gateway.exchange import Forwarder
from gateway.observe import CLIENT_CLOSED, REJECTED, Observer, RequestRecord
from gateway.replicas import Registry
from gateway.types import Receive, Scope, Send

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
    """The request was refused before its body was read to the end.

    The answer closes the connection: the rest of the body may still be on its way, and no
    server should go on reading it (hypercorn closes anyway; uvicorn would read it all).
    """

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        error.headers = (*error.headers, (b"connection", b"close"))
        self.error = error


class Inflight:
    """Requests being forwarded now, the cap on them, and whether the gateway is draining."""

    __slots__ = ("count", "limit", "draining", "_idle")

    def __init__(self, limit: int = 0) -> None:
        self.count = 0
        self.limit = limit
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def admit(self) -> None:
        """Count a request in, or raise the error that refuses it."""
        if self.draining:
            raise ShuttingDown(
                "The gateway is shutting down; retry on another instance.",
                headers=((b"retry-after", b"1"), (b"connection", b"close")),
            )
        if self.limit and self.count >= self.limit:
            raise TooManyRequests(
                f"The gateway is at its limit of {self.limit} concurrent requests.",
                headers=((b"retry-after", b"1"),),
            )
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def __repr__(self) -> str:
        draining = " | draining" if self.draining else ""
        return f"<Inflight [{self.count} requests{draining}]>"


async def read_body(scope: Scope, receive: Receive, *, limit: int, timeout_s: float) -> bytes:
    """The whole request body, refusing more than `limit` bytes without reading on."""
    # Content-Length with Transfer-Encoding never gets here: gateway/framing.py refuses it.
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
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    if not message.get("more_body", False):
        # The usual case: the whole body in one message, no timer needed.
        body: bytes = message.get("body", b"")
        if len(body) > limit:
            raise BodyRefused(_too_large(limit))
        return body
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_rest(receive, message.get("body", b""), limit)
    except TimeoutError:
        raise BodyRefused(
            RequestTimeout(f"The request body did not arrive within {timeout_s:g} seconds.")
        ) from None


async def _read_rest(receive: Receive, first: bytes, limit: int) -> bytes:
    chunks = [first]
    size = len(first)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            # Chunked uploads carry no length up front; stop at the limit, not the end.
            raise BodyRefused(_too_large(limit))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


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


class Proxy:
    """The ASGI app behind every proxied route."""

    __slots__ = (
        "_registry",
        "_forwarder",
        "_observer",
        "_max_body_bytes",
        "_body_timeout_s",
        "inflight",
    )

    def __init__(
        self,
        registry: Registry,
        forwarder: Forwarder,
        *,
        observer: Observer,
        inflight: Inflight,
        max_body_bytes: int,
        body_timeout_s: float,
    ) -> None:
        self._registry = registry
        self._forwarder = forwarder
        self._observer = observer
        self._max_body_bytes = max_body_bytes
        self._body_timeout_s = body_timeout_s
        self.inflight = inflight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = RequestRecord(
            scope["method"], scope["path"], scope.get("client"), self._observer.clock()
        )
        try:
            await self._handle(scope, receive, send, record)
        finally:
            self._observer.done(record)

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, record: RequestRecord
    ) -> None:
        if scope["method"] != "POST":
            await self._refuse(
                MethodNotAllowed(f"{scope['path']} takes POST.", headers=_ALLOW_POST), send, record
            )
            return
        try:
            body = await read_body(
                scope, receive, limit=self._max_body_bytes, timeout_s=self._body_timeout_s
            )
            record.bytes_in = len(body)
            record.model = model_of(body)
            self.inflight.admit()
        except ClientGone:
            record.outcome = CLIENT_CLOSED
            return
        except BodyRefused as refused:
            await self._refuse(refused.error, send, record)
            await _discard_body(receive)
            return
        except GatewayError as error:
            await self._refuse(error, send, record)
            return
        try:
            try:
                replica = self._registry.pick(record.model, body)
            except GatewayError as error:
                await self._refuse(error, send, record)
                return
            await self._forwarder.forward(scope, receive, send, record, replica, body)
        finally:
            self.inflight.leave()

    @staticmethod
    async def _refuse(error: GatewayError, send: Send, record: RequestRecord) -> None:
        record.status = error.status
        record.outcome = REJECTED
        await error.send_to(send)
