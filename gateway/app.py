"""The ASGI application: an explicit route table, nothing reaches a backend by accident."""

from __future__ import annotations

from collections.abc import Callable

from starlette.routing import BaseRoute, Route, Router

from gateway.auth import OPEN_PATHS, ApiKeys
from gateway.errors import MethodNotAllowed, RouteNotFound, send_json
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.metrics import Metrics
from gateway.observe import CLIENT_CLOSED, REJECTED, Observer, RequestRecord
from gateway.proxy import PROXIED_PATHS, Inflight, Proxy
from gateway.replicas import Registry
from gateway.types import ASGIApp, Message, Receive, Scope, Send

_ALLOW_GET = ((b"allow", b"GET, HEAD"),)


class _GetEndpoint:
    __slots__ = ()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await MethodNotAllowed(f"{scope['path']} takes GET.", headers=_ALLOW_GET).send_to(send)
            return
        status, body = self.answer()
        await send_json(send, status, body)

    def answer(self) -> tuple[int, bytes]:
        raise NotImplementedError


class ModelsEndpoint(_GetEndpoint):
    """GET /v1/models: every model of every healthy backend, once, with vLLM's own fields."""

    __slots__ = ("_registry",)

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def answer(self) -> tuple[int, bytes]:
        return 200, self._registry.models_body()


class HealthEndpoint(_GetEndpoint):
    """GET /health: 200 while the gateway process runs (liveness)."""

    __slots__ = ()

    def answer(self) -> tuple[int, bytes]:
        return 200, b'{"status":"ok"}'


class ReadyEndpoint(_GetEndpoint):
    """GET /ready: 200 while at least one model has a healthy replica and the gateway is not
    draining (readiness, for a load balancer or Kubernetes in front)."""

    __slots__ = ("_registry", "_inflight")

    def __init__(self, registry: Registry, inflight: Inflight) -> None:
        self._registry = registry
        self._inflight = inflight

    def answer(self) -> tuple[int, bytes]:
        if self._inflight.draining:
            return 503, b'{"status":"draining"}'
        if self._registry.ready():
            return 200, b'{"status":"ready"}'
        return 503, b'{"status":"no model has a healthy replica"}'


class MetricsEndpoint:
    """GET /metrics: Prometheus text, every worker's summed when there are several."""

    __slots__ = ("_metrics", "_refresh")

    def __init__(self, metrics: Metrics, refresh: Callable[[], None]) -> None:
        self._metrics = metrics
        self._refresh = refresh

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await MethodNotAllowed(f"{scope['path']} takes GET.", headers=_ALLOW_GET).send_to(send)
            return
        self._refresh()
        body = self._metrics.exposition()
        headers = [
            (b"content-type", METRICS_CONTENT_TYPE),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class ReplicasEndpoint(_GetEndpoint):
    """GET /replicas: each backend's state, for a person at a terminal (`curl | jq`)."""

    __slots__ = ("_view",)

    def __init__(self, view: Callable[[], bytes]) -> None:
        self._view = view

    def answer(self) -> tuple[int, bytes]:
        return 200, self._view()


async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await RouteNotFound(f"Unknown route: {scope['method']} {scope['path']}.").send_to(send)


class GatewayApp:
    """The proxied routes by one set lookup, everything else through the Starlette router.

    Measured on the 16-event burst benchmark, Starlette's route matching (a regex per route
    and a scope copy) cost about 6% of the gateway's CPU per request: the proxied routes are
    plain paths, so they skip it. The proxy records its own requests for the metrics and the
    access log; every other answer is recorded here, its `send` watched for status and size.
    """

    __slots__ = ("_proxy", "_paths", "_router", "_keys", "_observer")

    def __init__(
        self, proxy: Proxy, router: Router, *, keys: ApiKeys | None, observer: Observer
    ) -> None:
        self._proxy = proxy
        self._paths = frozenset(PROXIED_PATHS)
        self._router = router
        self._keys = keys
        self._observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._router(scope, receive, send)
            return
        path = scope["path"]
        keys = self._keys
        if path in self._paths and (keys is None or keys.accepts(scope)):
            await self._proxy(scope, receive, send)
            return
        record = RequestRecord(scope["method"], path, scope.get("client"), self._observer.clock())

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            else:
                record.bytes_out += len(message.get("body", b""))
            await send(message)

        try:
            if keys is not None and path not in OPEN_PATHS and not keys.accepts(scope):
                await keys.refusal().send_to(watched)
            else:
                await self._router(scope, receive, watched)
        finally:
            if record.status >= 400 or not record.status:
                record.outcome = REJECTED if record.status else CLIENT_CLOSED
            self._observer.done(record)


def build_app(
    registry: Registry,
    proxy: Proxy,
    *,
    api_keys: frozenset[str],
    observer: Observer,
    metrics: Metrics,
    refresh_metrics: Callable[[], None],
    replicas_view: Callable[[], bytes],
) -> ASGIApp:
    routes: list[BaseRoute] = [
        Route("/v1/models", ModelsEndpoint(registry)),
        Route("/health", HealthEndpoint()),
        Route("/ready", ReadyEndpoint(registry, proxy.inflight)),
        Route("/metrics", MetricsEndpoint(metrics, refresh_metrics)),
        Route("/replicas", ReplicasEndpoint(replicas_view)),
    ]
    # redirect_slashes would answer a POST to "/v1/completions/" with a redirect that
    # clients do not follow for POST; an unknown path is simply unknown.
    router = Router(routes, redirect_slashes=False, default=not_found)
    keys = ApiKeys(api_keys) if api_keys else None
    return GatewayApp(proxy, router, keys=keys, observer=observer)
