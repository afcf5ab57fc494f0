"""A fake vLLM OpenAI server built to never be the bottleneck of a gateway benchmark.

It speaks just enough HTTP/1.1 (keep-alive, Content-Length request bodies, pipelined requests
answered in order) on a raw asyncio Protocol, and streams pre-built SSE bytes: a 16-event burst
is one ``transport.write`` of a cached buffer. Per request, the body fields ``fake_events`` /
``fake_interval_ms`` (or headers ``x-fake-events`` / ``x-fake-interval-ms``) override the
defaults; body fields survive a proxy that forwards the body untouched, headers may not.

``GET /stats`` counts connections and streams, so a bench can see how fast a proxy closes its
upstream once the client has gone (``streams_aborted``, ``last_abort_unix``).

With a cache model (``--sim``, ``cache_model.py``) a completion is timed like a vLLM engine's
instead: queued for a running slot, prefill of the prompt tokens its prefix cache does not
hold, then ``max_tokens`` tokens of decode; the first event goes at the end of the prefill,
the others at the end of the decode. ``GET /metrics`` then serves vLLM's prefix-cache and
request counters, and ``POST /reset_prefix_cache`` empties the cache as vLLM's does.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys
import time
from collections.abc import Callable
from typing import Self, cast

try:
    from bench import fake_payloads as payloads
    from bench.cache_model import CacheModel, CacheSpec, Cluster, prompt_text
except ImportError:  # run as a script: bench/ itself is sys.path[0]
    import fake_payloads as payloads  # type: ignore[import-not-found, no-redef]
    from cache_model import (  # type: ignore[import-not-found, no-redef]
        CacheModel,
        CacheSpec,
        Cluster,
        prompt_text,
    )

MAX_HEAD_BYTES = 64 * 1024


class FakeStats:
    """Counters served at ``GET /stats``; ``reset()`` keeps the live gauges."""

    __slots__ = (
        "active_streams",
        "connections_total",
        "first_abort_unix",
        "last_abort_unix",
        "open_connections",
        "requests_total",
        "streams_aborted",
        "streams_completed",
        "streams_started",
    )

    def __init__(self) -> None:
        self.open_connections = 0
        self.active_streams = 0
        self.reset()

    def reset(self) -> None:
        self.connections_total = 0
        self.requests_total = 0
        self.streams_started = 0
        self.streams_completed = 0
        self.streams_aborted = 0
        self.first_abort_unix = 0.0
        self.last_abort_unix = 0.0

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return (
            f"<FakeStats [Connections: {self.open_connections} open | Streams: "
            f"{self.active_streams} active, {self.streams_completed} completed, "
            f"{self.streams_aborted} aborted]>"
        )


class Pacer:
    """Paced streams due in the same millisecond share one timer: thousands of slow streams
    cost one timer callback per tick instead of one TimerHandle per event. An entry left by
    a dropped connection fires harmlessly (``tick`` checks the stream is still live)."""

    __slots__ = ("buckets", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buckets: dict[int, list[_Connection]] = {}

    def schedule(self, conn: _Connection, at: float) -> None:
        key = math.ceil(at * 1000)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = []
            self.loop.call_at(key / 1000, self._fire, key)
        bucket.append(conn)

    def _fire(self, key: int) -> None:
        for conn in self.buckets.pop(key):
            conn.tick()

    def __repr__(self) -> str:
        return f"<Pacer [{sum(map(len, self.buckets.values()))} streams waiting]>"


class FakeVllm:
    """One listening fake; ``close()`` also drops every open connection."""

    __slots__ = ("_events", "cache", "config", "connections", "pacer", "server", "stats")

    def __init__(
        self, config: payloads.FakeConfig, pacer: Pacer, cache: CacheModel | None = None
    ) -> None:
        self.config = config
        self.pacer = pacer
        self.cache = cache
        self.stats = FakeStats()
        self.server: asyncio.Server | None = None
        self.connections: set[_Connection] = set()
        self._events: dict[tuple[bool, str], payloads.EventBytes] = {}
        for model in config.models:
            for chat in (True, False):
                self._events[(chat, model)] = payloads.EventBytes(
                    chat=chat, model=model, config=config
                )

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.sockets
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        assert self.server is not None and self.server.sockets
        host = self.server.sockets[0].getsockname()[0]
        return f"http://{host}:{self.port}"

    def events_for(self, chat: bool, model: str) -> payloads.EventBytes | None:
        return self._events.get((chat, model))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.abort()

    async def wait_closed(self) -> None:
        if self.server is not None:
            await self.server.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    def __repr__(self) -> str:
        return f"<FakeVllm {self.config.models} {self.stats!r}>"


class _Connection(asyncio.Protocol):
    """One client connection. Requests are answered strictly in order: while a paced stream
    is running, later pipelined requests wait in ``buf``."""

    __slots__ = (
        "buf",
        "count",
        "events",
        "fake",
        "index",
        "interval",
        "keep_alive",
        "loop",
        "next_at",
        "streaming",
        "task",
        "transport",
    )

    def __init__(self, fake: FakeVllm) -> None:
        self.fake = fake
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.streaming = False
        self.keep_alive = True
        self.events: payloads.EventBytes | None = None
        self.index = 0
        self.count = 0
        self.interval = 0.0
        self.next_at = 0.0
        self.task: asyncio.Task[None] | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence a cast, not a check.
        self.transport = cast(asyncio.Transport, transport)
        self.fake.connections.add(self)
        stats = self.fake.stats
        stats.open_connections += 1
        stats.connections_total += 1

    def connection_lost(self, exc: Exception | None) -> None:
        stats = self.fake.stats
        stats.open_connections -= 1
        self.fake.connections.discard(self)
        if self.task is not None:
            self.task.cancel()
        if self.streaming:
            self.streaming = False
            stats.active_streams -= 1
            stats.streams_aborted += 1
            now = time.time()
            stats.last_abort_unix = now
            if not stats.first_abort_unix:
                stats.first_abort_unix = now
        self.transport = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.streaming:
            self._process()

    def _process(self) -> None:
        buf = self.buf
        while buf and not self.streaming and self.transport is not None and self.keep_alive:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    self._finish(
                        payloads.error(431, "request head too large", "BadRequestError"), close=True
                    )
                return
            lines = bytes(buf[:end]).split(b"\r\n")
            parts = lines[0].split(b" ")
            if len(parts) != 3:
                self._finish(
                    payloads.error(400, "malformed request line", "BadRequestError"), close=True
                )
                return
            method, target, version = parts
            headers: dict[bytes, bytes] = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if b"chunked" in headers.get(b"transfer-encoding", b""):
                self._finish(
                    payloads.error(
                        501, "chunked request bodies are not supported", "NotImplementedError"
                    ),
                    close=True,
                )
                return
            try:
                length = int(headers.get(b"content-length", b"0"))
            except ValueError:
                self._finish(
                    payloads.error(400, "bad content-length", "BadRequestError"), close=True
                )
                return
            if len(buf) < end + 4 + length:
                return
            body = bytes(buf[end + 4 : end + 4 + length])
            del buf[: end + 4 + length]
            connection = headers.get(b"connection", b"").lower()
            self.keep_alive = (
                connection != b"close" if version == b"HTTP/1.1" else connection == b"keep-alive"
            )
            self.fake.stats.requests_total += 1
            self._dispatch(method, target.partition(b"?")[0], headers, body)

    def _finish(self, data: bytes, *, close: bool = False) -> None:
        assert self.transport is not None
        self.transport.write(data)
        if close or not self.keep_alive:
            self.keep_alive = False
            self.transport.close()

    def _dispatch(
        self, method: bytes, path: bytes, headers: dict[bytes, bytes], body: bytes
    ) -> None:
        fake = self.fake
        if path in (b"/v1/chat/completions", b"/v1/completions"):
            if method != b"POST":
                self._finish(payloads.error(405, "use POST", "BadRequestError"))
            else:
                self._completion(path == b"/v1/chat/completions", headers, body)
        elif path == b"/health" and method in (b"GET", b"HEAD"):
            self._finish(payloads.response(200, b""))
        elif path == b"/v1/models" and method == b"GET":
            self._finish(payloads.response(200, payloads.models_body(fake.config)))
        elif path == b"/stats" and method == b"GET":
            self._finish(payloads.response(200, payloads.dumps(self._stats())))
        elif path == b"/stats/reset" and method == b"POST":
            fake.stats.reset()
            if fake.cache is not None and fake.cache.cluster is not None:
                fake.cache.cluster.reset()
            self._finish(payloads.response(200, payloads.dumps(self._stats())))
        elif path == b"/metrics" and method == b"GET" and fake.cache is not None:
            self._finish(payloads.response(200, fake.cache.metrics(fake.config.models[0])))
        elif path == b"/reset_prefix_cache" and method == b"POST" and fake.cache is not None:
            fake.cache.reset()
            self._finish(payloads.response(200, b""))
        else:
            self._finish(
                payloads.error(404, f"no route {path.decode(errors='replace')}", "NotFoundError")
            )

    def _stats(self) -> dict[str, float]:
        stats = self.fake.stats.as_dict()
        cache = self.fake.cache
        if cache is not None and cache.cluster is not None:
            stats["cluster_peak_ratio"] = cache.cluster.peak_ratio
            stats["cluster_arrivals"] = cache.cluster.arrivals
        return stats

    def _completion(self, chat: bool, headers: dict[bytes, bytes], body: bytes) -> None:
        config = self.fake.config
        try:
            request = payloads.loads(body)
            if not isinstance(request, dict):
                raise TypeError("the body is not a JSON object")
            model = request.get("model")
            count = int(headers.get(b"x-fake-events") or request.get("fake_events", config.events))
            interval_ms = float(
                headers.get(b"x-fake-interval-ms")
                or request.get("fake_interval_ms", config.interval_ms)
            )
        except (ValueError, TypeError) as exc:
            self._finish(payloads.error(400, f"invalid request: {exc}", "BadRequestError"))
            return
        events = self.fake.events_for(chat, model) if isinstance(model, str) else None
        if events is None or not isinstance(model, str):
            self._finish(
                payloads.error(404, f"The model `{model}` does not exist.", "NotFoundError")
            )
            return
        if count < 1:
            self._finish(payloads.error(400, "fake_events must be >= 1", "BadRequestError"))
            return
        if self.fake.cache is not None:
            tokens = request.get("max_tokens")
            count = tokens if isinstance(tokens, int) and tokens > 0 else count
            self.streaming = True
            self.task = self.loop.create_task(self._simulate(request, events, count))
            return
        if not request.get("stream"):
            self._finish(payloads.response(200, events.full_body(count)))
            return
        stats = self.fake.stats
        stats.streams_started += 1
        if interval_ms <= 0 and count <= payloads.MAX_CACHED_BURST_EVENTS:
            stats.streams_completed += 1
            self._finish(events.burst(count))
            return
        assert self.transport is not None
        stats.active_streams += 1
        self.streaming = True
        self.events, self.count, self.index = events, count, 0
        self.interval = interval_ms / 1000.0
        self.transport.write(payloads.SSE_HEAD)
        self.next_at = self.loop.time()
        self.tick()

    async def _simulate(
        self, request: dict[str, object], events: payloads.EventBytes, count: int
    ) -> None:
        """One request through the cache model: the first event at the end of the prefill,
        the rest at the end of the decode."""
        cache = self.fake.cache
        assert cache is not None and self.transport is not None
        stats = self.fake.stats
        stream = bool(request.get("stream"))
        blocks, tokens = cache.blocks_of(prompt_text(request))
        stats.streams_started += 1
        stats.active_streams += 1
        async with cache.admitted():
            await cache.prefill(blocks, tokens)
            if stream:
                self.transport.write(payloads.SSE_HEAD + events.event(0, count))
            await cache.decode(count)
        stats.active_streams -= 1
        stats.streams_completed += 1
        self.streaming = False
        self.task = None
        if not stream:
            self._finish(payloads.response(200, events.full_body(count)))
        else:
            rest = b"".join(events.event(index, count) for index in range(1, count))
            self._finish(rest + payloads.DONE_AND_END)
        if self.buf and self.keep_alive:
            self._process()

    def tick(self) -> None:
        # Pacing runs on absolute deadlines so that timer lateness does not accumulate.
        transport, events = self.transport, self.events
        if transport is None or events is None or not self.streaming:
            return
        if self.interval <= 0:
            while self.index < self.count - 1 and not transport.is_closing():
                transport.write(events.event(self.index, self.count))
                self.index += 1
                if transport.get_write_buffer_size() > 1 << 20:
                    # Long unpaced streams yield so a slow reader cannot make us buffer it all.
                    self.fake.pacer.schedule(self, self.loop.time() + 0.001)
                    return
        if self.index < self.count - 1:
            transport.write(events.event(self.index, self.count))
            self.index += 1
            self.next_at += self.interval
            self.fake.pacer.schedule(self, self.next_at)
            return
        self.streaming = False
        stats = self.fake.stats
        stats.active_streams -= 1
        stats.streams_completed += 1
        self._finish(events.event(self.index, self.count) + payloads.DONE_AND_END)
        if self.buf and self.keep_alive:
            self._process()


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    models: tuple[str, ...] = ("fake-model",),
    events: int = 16,
    interval_ms: float = 0.0,
    max_model_len: int = 8192,
    backlog: int = 4096,
    cache: CacheSpec | None = None,
    cluster: Cluster | None = None,
) -> FakeVllm:
    """Start listening and return the running fake (``port`` 0 picks a free one).

    With ``cache``, completions are timed by a cache model of their own; fakes given the
    same ``cluster`` report where a router's load landed across them.
    """
    loop = asyncio.get_running_loop()
    fake = FakeVllm(
        payloads.FakeConfig(
            models=models,
            events=events,
            interval_ms=interval_ms,
            max_model_len=max_model_len,
            created=int(time.time()),
        ),
        Pacer(loop),
        CacheModel(cache, cluster) if cache is not None else None,
    )
    fake.server = await loop.create_server(lambda: _Connection(fake), host, port, backlog=backlog)
    return fake


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--model", action="append", help="served model name (repeatable)")
    parser.add_argument("--events", type=int, default=16, help="SSE events per stream")
    parser.add_argument(
        "--interval-ms",
        type=float,
        default=0.0,
        help="gap between events; 0 sends the whole stream at once",
    )
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument(
        "--replicas", type=int, default=1, help="serve this many fakes, each on its own port"
    )
    sim = parser.add_argument_group("cache model (cache_model.py; defaults: Llama-3.1-8B, H100)")
    sim.add_argument("--sim", action="store_true", help="time completions by the cache model")
    defaults = CacheSpec()
    sim.add_argument("--cache-blocks", type=int, default=defaults.cache_blocks)
    sim.add_argument("--block-tokens", type=int, default=defaults.block_tokens)
    sim.add_argument("--prefill-us-per-token", type=float, default=defaults.prefill_us_per_token)
    sim.add_argument("--decode-ms-per-token", type=float, default=defaults.decode_ms_per_token)
    sim.add_argument("--max-running", type=int, default=defaults.max_running)
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> None:
    cache = None
    if args.sim:
        cache = CacheSpec(
            cache_blocks=args.cache_blocks,
            block_tokens=args.block_tokens,
            prefill_us_per_token=args.prefill_us_per_token,
            decode_ms_per_token=args.decode_ms_per_token,
            max_running=args.max_running,
        )
    cluster = Cluster()
    fakes = []
    for number in range(args.replicas):
        fakes.append(
            await serve(
                args.host,
                args.port if number == 0 else 0,
                models=tuple(args.model or ["fake-model"]),
                events=args.events,
                interval_ms=args.interval_ms,
                max_model_len=args.max_model_len,
                cache=cache,
                cluster=cluster,
            )
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Tests and scripts wait for this line (it carries the real port when --port 0).
    for fake in fakes:
        print(f"fake_vllm listening on {fake.url}", flush=True)
    await stop.wait()
    for fake in fakes:
        fake.close()
        await fake.wait_closed()


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if not args.no_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            print("uvloop not installed, using the default loop", file=sys.stderr)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_main(args))


if __name__ == "__main__":
    main()
