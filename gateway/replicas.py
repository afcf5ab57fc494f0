"""Replicas and the routing table: which servers serve a model, which are up, who is next.

All state lives on the event loop's thread and is only touched between awaits, so no lock is
needed. The health checker writes (`record_pass`, `record_fail`); requests read (`pick`),
which asks the routing policy (routing.py) to choose among a model's replicas.
"""

from __future__ import annotations

import time
from collections.abc import Container, Iterable, Mapping
from typing import Any

import orjson
from yarl import URL

from gateway.backends import Backend
from gateway.errors import ModelNotFound, NoHealthyReplica
from gateway.routing import Policy, RoundRobin, RoutingState

ModelCard = dict[str, Any]


class Epoch:
    """One unbroken stretch of a replica in rotation.

    Routing memory (the prefix index) points at an epoch, never at a replica. When the replica
    goes down, is ejected or leaves, its epoch ends (`replica` becomes None): what was recorded
    under it is no longer trusted, and no longer keeps the replica alive. A replica that comes
    back does so under a new epoch, with nothing remembered.
    """

    __slots__ = ("replica", "number")

    def __init__(self, replica: Replica, number: int) -> None:
        self.replica: Replica | None = replica
        self.number = number

    def __repr__(self) -> str:
        return f"<Epoch {self.number} [{'live' if self.replica is not None else 'ended'}]>"


class Replica:
    """One backend server, its health and the models it serves."""

    __slots__ = (
        "backend",
        "healthy",
        "ever_up",
        "passes",
        "fails",
        "strikes",
        "ejections",
        "ejected_until",
        "probing",
        "cards",
        "pinned",
        "inflight",
        "answered",
        "epoch",
        "_urls",
    )

    def __init__(self, backend: Backend, *, pinned: Iterable[str] = ()) -> None:
        self.backend = backend
        # Active checks: routable only while `healthy`.
        self.healthy = False
        self.ever_up = False
        self.passes = 0
        self.fails = 0
        # Passive checks, from real traffic: consecutive failed requests, times ejected, and
        # until when (time.monotonic()); 0.0 when not ejected.
        self.strikes = 0
        self.ejections = 0
        self.ejected_until = 0.0
        self.probing = False
        # Discovered from the server's /v1/models: id -> the server's own model card.
        self.cards: dict[str, ModelCard] = {}
        self.pinned = frozenset(pinned)
        # Requests of this gateway on this replica now: from the upstream request being sent
        # until its response is released (exchange.py keeps it; routing policies read it).
        self.inflight = 0
        # Whether a request got its answer from it since its last health check: a check
        # that times out then means busy (vLLM's API server slow to answer /health under
        # load), not down.
        self.answered = False
        self.epoch = Epoch(self, 1)
        self._urls: dict[str, URL] = {}

    def new_epoch(self) -> None:
        """End the current epoch (down, ejected or gone) and start the next one."""
        self.epoch.replica = None
        self.epoch = Epoch(self, self.epoch.number + 1)

    def serves(self, model: str) -> bool:
        return model in self.cards or model in self.pinned

    def url(self, path: str) -> URL:
        """The upstream URL for a route path, built once per replica and path."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = self.backend.endpoint(path)
        return url

    def url_with_query(self, path: str, query: bytes) -> URL:
        return URL(f"{self.backend.url}{path}?{query.decode('latin-1')}", encoded=True)

    def __repr__(self) -> str:
        state = "up" if self.healthy else "down"
        if self.ejected_until:
            state += ", ejected"
        models = ",".join(sorted(self.cards.keys() | self.pinned))
        return (
            f"<Replica {self.backend.url} [{state} | passes {self.passes}, fails {self.fails},"
            f" strikes {self.strikes} | in flight {self.inflight} | epoch {self.epoch.number}"
            f" | models {models or '-'}]>"
        )


class ModelRoute:
    """The replicas that serve one model, and whose turn it is among them."""

    __slots__ = ("model", "replicas", "cursor")

    def __init__(self, model: str, replicas: list[Replica], cursor: int = 0) -> None:
        self.model = model
        self.replicas = replicas
        # Where the next round-robin turn starts (also breaks least-loaded ties).
        self.cursor = cursor

    def __repr__(self) -> str:
        up = sum(1 for replica in self.replicas if replica.healthy)
        return f"<ModelRoute {self.model} [{up} of {len(self.replicas)} replicas up]>"


class Registry:
    """Every replica, the routing table built from them, and the merged /v1/models answer.

    A configured backend whose host is a name (http only: an https name is kept for its
    certificate) stands for every address the name resolves to, one replica each: a headless
    Kubernetes Service lists a StatefulSet's pods that way. `set_addresses` applies each new
    resolution: a new address is a new replica, joining through its health checks; a vanished
    one leaves the routes at once, while its requests in flight finish on the object they hold.
    """

    __slots__ = (
        "replicas",
        "_sources",
        "_pins",
        "policy",
        "_fall",
        "_rise",
        "_eject_after",
        "_eject_base_s",
        "_eject_max_s",
        "_retry_after",
        "_routes",
        "_models_body",
        "_created",
        "_started",
        "_startup_window_s",
        "_window_reported",
    )

    def __init__(
        self,
        backends: Iterable[Backend],
        pinned: Mapping[str, Iterable[Backend]],
        *,
        fall: int,
        rise: int,
        retry_after_s: int,
        eject_after: int = 5,
        eject_base_s: float = 30.0,
        eject_max_s: float = 300.0,
        startup_window_s: float = 1200.0,
        policy: Policy | None = None,
    ) -> None:
        pins: dict[str, set[str]] = {}
        for model, model_backends in pinned.items():
            for backend in model_backends:
                pins.setdefault(backend.url, set()).add(model)
        ordered: dict[str, Backend] = {backend.url: backend for backend in backends}
        for model_backends in pinned.values():
            for backend in model_backends:
                ordered.setdefault(backend.url, backend)
        self._pins = {url: frozenset(models) for url, models in pins.items()}
        # Configured backend URL -> its replicas: one for an address, those of the last
        # resolution for a name (none before the first).
        self._sources: dict[str, list[Replica]] = {}
        self.replicas: tuple[Replica, ...] = ()
        for url, backend in ordered.items():
            static = backend.address is not None
            self._sources[url] = (
                [Replica(backend, pinned=self._pins.get(url, ()))] if static else []
            )
        self.policy = policy or RoundRobin()
        self._fall = fall
        self._rise = rise
        self._eject_after = eject_after
        self._eject_base_s = eject_base_s
        self._eject_max_s = eject_max_s
        self._retry_after = ((b"retry-after", str(retry_after_s).encode()),)
        self._created = int(time.time())
        self._started = time.monotonic()
        self._startup_window_s = startup_window_s
        self._window_reported = False
        self._routes: dict[str, ModelRoute] = {}
        self._models_body = b""
        self._rebuild()

    def names_to_resolve(self) -> list[Backend]:
        """The configured backends whose host is a name to resolve (each health round)."""
        return [
            Backend(url) for url, replicas in self._sources.items() if Backend(url).address is None
        ]

    def set_addresses(self, source: Backend, addresses: Iterable[str]) -> None:
        """The addresses `source`'s name resolves to now: add and remove replicas to match."""
        current = self._sources.get(source.url)
        if current is None:
            return
        by_url = {replica.backend.url: replica for replica in current}
        fresh: list[Replica] = []
        for address in dict.fromkeys(addresses):
            backend = source.at(address)
            replica = by_url.get(backend.url)
            if replica is None:
                replica = Replica(backend, pinned=self._pins.get(source.url, ()))
            fresh.append(replica)
        if [r.backend.url for r in fresh] == [r.backend.url for r in current]:
            return
        self._sources[source.url] = fresh
        self._rebuild()

    def never_answered(self) -> list[str]:
        """Backends (as configured) of which no replica has passed a health check yet."""
        return [
            url
            for url, replicas in self._sources.items()
            if not any(replica.ever_up for replica in replicas)
        ]

    def in_startup_window(self) -> bool:
        return time.monotonic() - self._started < self._startup_window_s

    def startup_window_closed(self) -> list[str]:
        """Once, when the startup window has just closed: the backends never heard from."""
        if self._window_reported or self.in_startup_window():
            return []
        self._window_reported = True
        return self.never_answered()

    def knows(self, model: str) -> bool:
        return model in self._routes

    def pick(self, model: str, body: bytes = b"") -> Replica:
        """The replica to send a request for `model` to, or the error to answer."""
        route = self._routes.get(model)
        if route is None:
            if self.in_startup_window() and self.never_answered():
                # A server that has never answered may be the one serving this model (vLLM
                # takes minutes to load), so say "not yet" rather than "no such model"; past
                # the window, a backend still silent is more likely a typo than a slow load.
                raise NoHealthyReplica(
                    f"The model `{model}` is not available yet: some backends have not come up.",
                    headers=self._retry_after,
                )
            raise ModelNotFound(f"The model `{model}` does not exist.", param="model")
        replica = self.policy.pick(route, body)
        if replica is None:
            raise NoHealthyReplica(
                f"The model `{model}` has no healthy replica right now.",
                headers=self._retry_after,
            )
        return replica

    def pick_another(
        self, model: str, tried: Container[Replica], body: bytes = b""
    ) -> Replica | None:
        """A replica of `model` not yet tried for this request, for a retry."""
        route = self._routes.get(model)
        return None if route is None else self.policy.pick(route, body, tried)

    def routing_state(self) -> RoutingState:
        """The policy in force, its index and every replica's requests in flight."""
        return self.policy.state(self.replicas)

    def record_success(self, replica: Replica) -> None:
        """A request got an answer that was not a 5xx: the replica works."""
        replica.strikes = 0
        replica.answered = True
        if replica.probing or replica.ejected_until:
            replica.probing = False
            replica.ejected_until = 0.0

    def record_failure(self, replica: Replica) -> None:
        """A request failed to connect, was reset, or got a 5xx. Enough in a row eject it.

        The backoff grows with each ejection (as Envoy's outlier detection does), so a
        replica that keeps failing is tried less and less often.
        """
        replica.strikes += 1
        if replica.probing or replica.strikes >= self._eject_after:
            replica.probing = False
            replica.strikes = 0
            replica.ejections += 1
            backoff = min(self._eject_base_s * replica.ejections, self._eject_max_s)
            replica.ejected_until = time.monotonic() + backoff
            replica.new_epoch()

    def record_pass(self, replica: Replica, cards: list[ModelCard]) -> None:
        if replica.ejected_until and time.monotonic() >= replica.ejected_until:
            # Backoff over and the server answers its checks: back into rotation.
            replica.ejected_until = 0.0
            replica.probing = False
        replica.fails = 0
        replica.passes += 1
        was = (replica.healthy, replica.cards)
        replica.cards = {card["id"]: card for card in cards}
        if not replica.healthy and (not replica.ever_up or replica.passes >= self._rise):
            replica.healthy = True
            replica.ever_up = True
        if (replica.healthy, replica.cards) != was:
            self._rebuild()

    def record_fail(self, replica: Replica) -> None:
        replica.passes = 0
        replica.fails += 1
        if replica.healthy and replica.fails >= self._fall:
            replica.healthy = False
            replica.new_epoch()
            self._rebuild()

    def ready(self) -> bool:
        return any(
            replica.healthy and (replica.cards or replica.pinned) for replica in self.replicas
        )

    def models_body(self) -> bytes:
        return self._models_body

    def _rebuild(self) -> None:
        self.replicas = tuple(
            replica for replicas in self._sources.values() for replica in replicas
        )
        # A down replica keeps the models it last listed, so its models stay known (503, not
        # 404) while it restarts; a healthy one that stops listing a model (a LoRA adapter
        # unloaded) stops getting it at once.
        members: dict[str, list[Replica]] = {}
        for replica in self.replicas:
            for model in replica.cards.keys() | replica.pinned:
                members.setdefault(model, []).append(replica)
        old = self._routes
        self._routes = {
            model: ModelRoute(model, replicas, old[model].cursor if model in old else 0)
            for model, replicas in members.items()
        }
        cards: dict[str, ModelCard] = {}
        for replica in self.replicas:
            if not replica.healthy:
                continue
            for model_id, card in replica.cards.items():
                cards.setdefault(model_id, card)
            for model_id in sorted(replica.pinned):
                cards.setdefault(model_id, self._pinned_card(model_id))
        self._models_body = orjson.dumps({"object": "list", "data": list(cards.values())})

    def _pinned_card(self, model: str) -> ModelCard:
        return {
            "id": model,
            "object": "model",
            "created": self._created,
            "owned_by": "vllm-gateway",
            "root": model,
            "parent": None,
        }

    def __repr__(self) -> str:
        up = sum(1 for replica in self.replicas if replica.healthy)
        down = len(self.replicas) - up
        return (
            f"<Registry [Replicas: {up} up, {down} down | Models: {len(self._routes)}"
            f" | Routing: {self.policy.name}]>"
        )
