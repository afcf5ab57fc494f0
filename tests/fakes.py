"""A fake vLLM server: a real aiohttp web app on a free port, scripted by the test.

It answers like vLLM (/health, /v1/models, OpenAI-shaped completions, SSE streams) and records
what reached it, so a test can assert both what the client saw and what the backend saw.
Tests steer it with events, never with sleeps: `gate` holds a stream after its first chunk,
`hold_headers` holds a response before its headers, `aborted` fires when the client went away.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway.proxy import PROXIED_PATHS

# vLLM serves every route the gateway proxies (and more the gateway refuses to pass).
_POST_PATHS = PROXIED_PATHS


def model_card(
    model_id: str, *, parent: str | None = None, max_model_len: int = 2048
) -> dict[str, Any]:
    """A model entry as vLLM lists it; a LoRA adapter has its base model as `parent`."""
    return {
        "id": model_id,
        "object": "model",
        "created": 1700000000,
        "owned_by": "vllm",
        "root": f"/models/{parent or model_id}" if parent is None else model_id,
        "parent": parent,
        "max_model_len": max_model_len,
        "permission": [],
    }


def sse_events(name: str, count: int) -> list[bytes]:
    """`count` chat.completion.chunk events and the final [DONE], as vLLM frames them."""
    events = []
    for index in range(count):
        chunk = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": name,
            "choices": [{"index": 0, "delta": {"content": f"tok{index} "}, "finish_reason": None}],
        }
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


@dataclass
class Seen:
    """One request as the fake received it."""

    path: str
    headers: CIMultiDict[str]
    body: bytes
    query: str = ""


@dataclass
class FakeVllm:
    """A scripted stand-in for one `vllm serve` process."""

    name: str
    models: list[dict[str, Any]] = field(default_factory=list)
    health_status: int = 200
    # Hold every /health answer until the test sets it (a server too busy to answer).
    health_gate: asyncio.Event | None = None
    models_status: int = 200
    # A stream is these raw chunks, written one write each; by default sse_events(name, 4).
    chunks: list[bytes] | None = None
    # Hold the stream after its first chunk until the test sets it.
    gate: asyncio.Event | None = None
    # Hold the response before its headers until the test sets it.
    hold_headers: asyncio.Event | None = None
    # Answer every POST with this status and body instead (e.g. vLLM's own 400).
    status: int = 200
    error_body: bytes | None = None
    # Pacing of a stream: a wait before the first chunk (a long prefill) and between chunks.
    first_delay_s: float = 0.0
    interval_s: float = 0.0
    # Reset the connection after writing this many chunks, as a crashed server would.
    die_after: int | None = None
    # Close, unanswered, any request that arrives on a reused keep-alive connection: the
    # keep-alive race, where the server closed an idle connection as the client reused it.
    drop_reused: bool = False
    dropped: int = 0
    # As `vllm serve --api-key`: /v1/* needs this bearer key (/health does not).
    required_key: str | None = None
    seen: list[Seen] = field(default_factory=list)
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    health_checks: int = 0
    # Any loopback address: several fakes on one port stand for the pods behind one name.
    host: str = "127.0.0.1"
    port: int = 0
    _runner: web.AppRunner | None = None
    _transports: set[asyncio.BaseTransport] = field(default_factory=set)
    _served_on: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.models:
            self.models = [model_card(self.name)]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stream_chunks(self) -> list[bytes]:
        return self.chunks if self.chunks is not None else sse_events(self.name, 4)

    async def start(self) -> None:
        """Listen on a free port, or on the same port again after `stop`."""
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        for path in _POST_PATHS:
            app.router.add_post(path, self._generate)
        # Cancels a handler when its client disconnects: how the fake notices an abort.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        """Stop listening and reset every connection mid-request, as a killed server would."""
        for transport in self._transports:
            transport.abort()
        self._transports.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _count_on_connection(self, request: web.Request) -> int:
        connection = id(request.protocol)
        self._served_on[connection] = self._served_on.get(connection, 0) + 1
        return self._served_on[connection]

    async def _health(self, request: web.Request) -> web.Response:
        self._count_on_connection(request)
        self.health_checks += 1
        if self.health_gate is not None:
            await self.health_gate.wait()
        return web.Response(status=self.health_status)

    def _refuses(self, request: web.Request) -> bool:
        if self.required_key is None:
            return False
        return request.headers.get("Authorization") != f"Bearer {self.required_key}"

    async def _models(self, request: web.Request) -> web.Response:
        self._count_on_connection(request)
        if self._refuses(request):
            return web.Response(status=401, body=b'{"error": "Unauthorized"}')
        body = orjson.dumps({"object": "list", "data": self.models})
        return web.Response(status=self.models_status, body=body, content_type="application/json")

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        if self._refuses(request):
            return web.Response(status=401, body=b'{"error": "Unauthorized"}')
        body = await request.read()
        self.seen.append(
            Seen(request.path, CIMultiDict(request.headers), body, request.rel_url.raw_query_string)
        )
        self.arrived.set()
        transport = request.transport
        assert transport is not None
        if self._count_on_connection(request) > 1 and self.drop_reused:
            self.dropped += 1
            transport.close()
            raise ConnectionResetError("dropped a reused connection")
        self._transports.add(transport)
        try:
            return await self._answer(request, body)
        except (asyncio.CancelledError, ConnectionResetError):
            self.aborted.set()
            raise
        finally:
            self._transports.discard(request.transport)  # type: ignore[arg-type]

    async def _answer(self, request: web.Request, body: bytes) -> web.StreamResponse:
        if self.hold_headers is not None:
            await self.hold_headers.wait()
        if self.error_body is not None:
            return web.Response(
                status=self.status, body=self.error_body, content_type="application/json"
            )
        document = orjson.loads(body)
        if not document.get("stream"):
            answer = {
                "id": "cmpl-fake",
                "object": "chat.completion",
                "model": document.get("model"),
                "served_by": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
            return web.Response(body=orjson.dumps(answer), content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        response.headers["X-Served-By"] = self.name
        await response.prepare(request)
        if self.first_delay_s:
            await asyncio.sleep(self.first_delay_s)
        for index, chunk in enumerate(self.stream_chunks()):
            if index and self.interval_s:
                await asyncio.sleep(self.interval_s)
            await response.write(chunk)
            if self.die_after is not None and index + 1 >= self.die_after:
                assert request.transport is not None
                request.transport.abort()
                raise ConnectionResetError("died mid-stream")
            if index == 0 and self.gate is not None:
                await self.gate.wait()
        await response.write_eof()
        return response
