"""Routing policies: which replica of a model a request goes to (GATEWAY_ROUTING).

Rules every policy keeps, whatever it prefers:
- Only a healthy replica that this request has not tried yet is chosen, so a retry goes to
  a replica not yet tried.
- An ejected replica gets nothing until its backoff ends; then one request at a time probes
  it. When every healthy replica is ejected, one of them is tried anyway (Envoy's panic mode).
- A policy keeps no replica of its own: it chooses among the route's replicas as they are at
  that moment, so a replica may leave the route between two requests. What it remembers of
  a replica (the prefix index) names the replica's `Epoch`, which ends when the replica goes
  down, is ejected or leaves, so a replica that comes back starts with a clean slate.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Container, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final

from gateway.prefix_index import PrefixIndex, block_keys, prompt_start, span

if TYPE_CHECKING:
    from gateway.replicas import ModelRoute, Replica

ROUTING_POLICIES: Final = ("round_robin", "least_loaded", "prefix")
# Where `prefix` sends a prompt its index cannot route (GATEWAY_PREFIX_MISS); auto: hash
# when the gateway runs several workers, else least_loaded.
MISS_POLICIES: Final = ("auto", "least_loaded", "hash")

# A known prefix routes the request only when it covers at least this share of the bytes
# its whole blocks cover.
# A new conversation that shares only a system prompt with what one replica has seen is then
# spread like any new request (the other replicas compute the prompt once and hold it too),
# while the next turn of a conversation, which resends all of the previous one, follows it.
# Below the threshold the cache would save less than half of the prefill anyway.
MIN_MATCH: Final = 0.5


@dataclass(frozen=True)
class ReplicaLoad:
    url: str
    inflight: int


@dataclass(frozen=True)
class RoutingState:
    """What a policy is doing, for the gateway's metrics and replica view."""

    policy: str
    index_entries: int
    index_capacity: int
    # Requests whose prompt blocks were looked up, and those routed by a known prefix (a live
    # replica held at least MIN_MATCH of their blocks), whether or not the bound then let it.
    index_lookups: int
    index_hits: int
    # Requests the load bound sent away from the replica that held their prefix.
    bound_spills: int
    # This gateway's requests in flight on each replica, in the registry's order.
    inflight: tuple[ReplicaLoad, ...]

    @property
    def index_hit_ratio(self) -> float:
        return self.index_hits / self.index_lookups if self.index_lookups else 0.0


def _loads(replicas: Iterable[Replica]) -> tuple[ReplicaLoad, ...]:
    return tuple(ReplicaLoad(replica.backend.url, replica.inflight) for replica in replicas)


def available(route: ModelRoute, exclude: Container[Replica]) -> tuple[list[Replica], bool]:
    """The replicas a request may go to now, in turn from the route's cursor, and whether
    they are panic-mode ones (every healthy, untried replica is ejected)."""
    replicas = route.replicas
    count = len(replicas)
    start = route.cursor
    now = 0.0
    ready: list[Replica] = []
    ejected: list[Replica] = []
    for offset in range(count):
        replica = replicas[(start + offset) % count]
        if not replica.healthy or replica in exclude:
            continue
        if replica.ejected_until:
            now = now or time.monotonic()
            if now < replica.ejected_until or replica.probing:
                ejected.append(replica)
                continue
        ready.append(replica)
    return (ready, False) if ready else (ejected, True)


def take(route: ModelRoute, replica: Replica, panic: bool) -> Replica:
    """Commit to `replica`: the turn moves past it, and an ejected one is now being probed."""
    route.cursor = route.replicas.index(replica) + 1
    if replica.ejected_until and not panic:
        replica.probing = True
    return replica


def least_loaded(candidates: list[Replica]) -> Replica:
    """The fewest requests in flight; the first in turn among equals (ties go round-robin)."""
    best = candidates[0]
    for replica in candidates:
        if replica.inflight < best.inflight:
            best = replica
    return best


class Policy:
    """Chooses a replica of a route for one request; one object per gateway."""

    __slots__ = ()
    name: ClassVar[str] = ""

    def pick(
        self, route: ModelRoute, body: bytes, exclude: Container[Replica] = ()
    ) -> Replica | None:
        """The replica for this request, or None when the model has none to offer."""
        raise NotImplementedError

    def state(self, replicas: Iterable[Replica]) -> RoutingState:
        return RoutingState(self.name, 0, 0, 0, 0, 0, _loads(replicas))

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


class RoundRobin(Policy):
    """Each healthy replica in turn."""

    __slots__ = ()
    name = "round_robin"

    def pick(
        self, route: ModelRoute, body: bytes, exclude: Container[Replica] = ()
    ) -> Replica | None:
        # The default policy, so it walks the route without building a candidate list.
        replicas = route.replicas
        count = len(replicas)
        now = 0.0
        fallback: Replica | None = None
        for offset in range(count):
            index = (route.cursor + offset) % count
            replica = replicas[index]
            if not replica.healthy or replica in exclude:
                continue
            if replica.ejected_until:
                now = now or time.monotonic()
                if now < replica.ejected_until or replica.probing:
                    fallback = fallback or replica
                    continue
                replica.probing = True
            route.cursor = index + 1
            return replica
        return fallback


class LeastLoaded(Policy):
    """The replica with the fewest of this gateway's requests in flight."""

    __slots__ = ()
    name = "least_loaded"

    def pick(
        self, route: ModelRoute, body: bytes, exclude: Container[Replica] = ()
    ) -> Replica | None:
        candidates, panic = available(route, exclude)
        if not candidates:
            return None
        return take(route, least_loaded(candidates), panic)


class PrefixAffinity(Policy):
    """The replica that last served the longest known prefix of the prompt, within a load bound.

    Consistent hashing with bounded loads: a replica takes a request only while its in-flight
    count, this request included, stays within `load_factor` x (the average in flight over
    the model's available replicas, this request included, + 1). Past the bound the
    least-loaded replica takes it, and the index records it there.

    A prompt with no prefix that tells the replicas apart (a new conversation) goes to the
    least-loaded replica, or with `hash_misses` to the first replica within the bound in
    rendezvous order of the prompt's anchor (`PrefixIndex.anchor`). Each gateway process has
    its own index, so with several of them (workers, pods) the turns of one conversation
    reach processes that have not seen it; hashed, the conversation goes to the same replica
    from every one of them, at the price of a balance that is only as even as the hash.
    """

    __slots__ = (
        "load_factor",
        "block_bytes",
        "hash_misses",
        "index",
        "lookups",
        "hits",
        "spills",
    )
    name = "prefix"

    def __init__(
        self, *, capacity: int, load_factor: float, block_bytes: int, hash_misses: bool = False
    ) -> None:
        self.load_factor = load_factor
        self.block_bytes = block_bytes
        self.hash_misses = hash_misses
        self.index = PrefixIndex(capacity)
        self.lookups = 0
        self.hits = 0
        self.spills = 0

    def pick(
        self, route: ModelRoute, body: bytes, exclude: Container[Replica] = ()
    ) -> Replica | None:
        candidates, panic = available(route, exclude)
        if not candidates:
            return None
        if len(route.replicas) < 2:
            # A lone replica: nothing to choose, nothing worth remembering.
            return take(route, candidates[0], panic)
        keys = block_keys(body, route.model, self.block_bytes)
        if not keys:
            return take(route, least_loaded(candidates), panic)
        self.lookups += 1
        depth, owner = self.index.deepest(keys)
        choice = None
        if owner is not None and owner.replica in candidates and self._enough(depth, len(keys)):
            self.hits += 1
            choice = owner.replica
            if not self._within_bound(choice, candidates):
                self.spills += 1
                choice = None
        elif self.hash_misses:
            choice = self._home(body, self.index.anchor(keys), candidates)
        if choice is None:
            choice = least_loaded(candidates)
        self.index.record(keys, choice.epoch, exclude)
        return take(route, choice, panic)

    def _home(self, body: bytes, anchor: int, candidates: list[Replica]) -> Replica:
        """The first candidate within the bound in the rendezvous order of the prompt's first
        `anchor` blocks, the same order in every process: keyed BLAKE2 of bytes and URLs
        (Python's own hash is seeded per process). A replica leaving moves only its own
        conversations. The least-loaded candidate is always within the bound (c >= 1)."""
        start = prompt_start(body)
        seed = hashlib.blake2b(
            memoryview(body)[start : start + span(anchor, self.block_bytes)], digest_size=16
        ).digest()
        ranked = sorted(
            candidates,
            key=lambda replica: hashlib.blake2b(
                replica.backend.url.encode(), key=seed, digest_size=8
            ).digest(),
            reverse=True,
        )
        return next(r for r in ranked if self._within_bound(r, candidates))

    def _enough(self, depth: int, blocks: int) -> bool:
        return span(depth, self.block_bytes) >= MIN_MATCH * span(blocks, self.block_bytes)

    def _within_bound(self, replica: Replica, candidates: list[Replica]) -> bool:
        # inflight + 1 <= c * ((total + 1) / n + 1), multiplied out by n.
        total = 1
        for candidate in candidates:
            total += candidate.inflight
        count = len(candidates)
        return (replica.inflight + 1) * count <= self.load_factor * (total + count)

    def state(self, replicas: Iterable[Replica]) -> RoutingState:
        index = self.index
        return RoutingState(
            self.name,
            len(index),
            index.capacity,
            self.lookups,
            self.hits,
            self.spills,
            _loads(replicas),
        )

    def __repr__(self) -> str:
        index = self.index
        return (
            f"<PrefixAffinity [c {self.load_factor:g}, blocks of {self.block_bytes} B,"
            f" misses {'hashed' if self.hash_misses else 'least loaded'}"
            f" | index {len(index)} of {index.capacity} entries, {self.hits} hits of"
            f" {self.lookups} lookups | {self.spills} spills]>"
        )


def make_policy(
    name: str,
    *,
    index_entries: int,
    load_factor: float,
    block_bytes: int,
    miss: str = "auto",
    workers: int = 1,
) -> Policy:
    """The policy GATEWAY_ROUTING names (settings has checked the names)."""
    if name == "prefix":
        return PrefixAffinity(
            capacity=index_entries,
            load_factor=load_factor,
            block_bytes=block_bytes,
            hash_misses=miss == "hash" or (miss == "auto" and workers > 1),
        )
    if name == "least_loaded":
        return LeastLoaded()
    return RoundRobin()
