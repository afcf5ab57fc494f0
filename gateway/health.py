"""Active health checks: every backend, every interval, on the gateway's own loop and session.

Each round first resolves the backends configured by host name (DNS discovery), then checks
every replica. The resolver is passed in: tests give one they control.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

import aiohttp
import orjson

from gateway.backends import Backend
from gateway.metrics import Metrics
from gateway.replicas import ModelCard, Registry, Replica

log = logging.getLogger("gateway.health")

# host, port -> the addresses the name stands for now.
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address of `host`: IPv4 when it has any (a dual-stack pod would otherwise be
    two replicas), else IPv6."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v4 = [str(info[4][0]) for info in infos if info[0] == socket.AF_INET]
    v6 = [str(info[4][0]) for info in infos if info[0] == socket.AF_INET6]
    return list(dict.fromkeys(v4 or v6))


class HealthChecker:
    """Checks each replica with GET /health and GET /v1/models and records the outcome.

    A check passes only when both answer 200 and the model list parses; the models listed are
    what the replica is routed for from then on. `run` never raises: a failing backend is a
    state to record, not an error of the checker.
    """

    __slots__ = (
        "_registry",
        "_session",
        "_interval_s",
        "_timeout_s",
        "_metrics",
        "_on_round",
        "_resolve",
        "_rounds",
        "_round_done",
    )

    def __init__(
        self,
        registry: Registry,
        session: aiohttp.ClientSession,
        *,
        interval_s: float,
        timeout_s: float,
        metrics: Metrics,
        on_round: Callable[[], None] = lambda: None,
        resolve: Resolver = resolve_host,
    ) -> None:
        self._registry = registry
        self._session = session
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._metrics = metrics
        self._on_round = on_round
        self._resolve = resolve
        self._rounds = 0
        self._round_done = asyncio.Condition()

    async def run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self._interval_s)

    async def check_all(self) -> None:
        registry = self._registry
        names = registry.names_to_resolve()
        if names:
            await asyncio.gather(*(self._discover(source) for source in names))
        await asyncio.gather(*(self._check(replica) for replica in registry.replicas))
        silent = registry.startup_window_closed()
        if silent:
            log.warning(
                "startup window over: %s never answered a health check; unknown models now "
                "answer 404",
                ", ".join(silent),
            )
        self._on_round()
        async with self._round_done:
            self._rounds += 1
            self._round_done.notify_all()

    async def wait_rounds(self, count: int) -> None:
        """Return once `count` more rounds of checks have completed (for tests and startup)."""
        async with self._round_done:
            target = self._rounds + count
            await self._round_done.wait_for(lambda: self._rounds >= target)

    async def first_round(self) -> None:
        """Return once one round of checks has completed (at once if one has)."""
        async with self._round_done:
            await self._round_done.wait_for(lambda: self._rounds >= 1)

    async def _discover(self, source: Backend) -> None:
        host = source.base.raw_host or ""
        try:
            async with asyncio.timeout(self._timeout_s):
                addresses = await self._resolve(host, source.port)
        except (OSError, TimeoutError) as exc:
            # Keep the replicas of the last answer: a DNS hiccup is not a vanished backend.
            log.warning("cannot resolve %s: %r", host, exc)
            return
        if addresses:
            before = {replica.backend.url for replica in self._registry.replicas}
            self._registry.set_addresses(source, addresses)
            after = {replica.backend.url for replica in self._registry.replicas}
            if before != after:
                log.info(
                    "%s resolves to %s (joined: %s; left: %s)",
                    source.url,
                    ", ".join(addresses),
                    ", ".join(sorted(after - before)) or "-",
                    ", ".join(sorted(before - after)) or "-",
                )

    async def _check(self, replica: Replica) -> None:
        answered, replica.answered = replica.answered, False
        try:
            async with asyncio.timeout(self._timeout_s):
                cards = await self._probe(replica)
        except TimeoutError as exc:
            if answered and replica.healthy:
                # Too slow to answer a check, yet it answered a request since the last one:
                # busy, not down. Taking it out would turn its load into errors elsewhere.
                log.debug("health check of %s timed out while it serves", replica.backend.url)
                self._metrics.health_check(None)
                return
            self._failed(replica, exc)
            return
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            self._failed(replica, exc)
            return
        self._metrics.health_check(True)
        was_up = replica.healthy
        self._registry.record_pass(replica, cards)
        if replica.healthy and not was_up:
            log.info("backend %s is up, serving %s", replica.backend.url, sorted(replica.cards))

    def _failed(self, replica: Replica, exc: BaseException) -> None:
        if replica.healthy or not replica.ever_up:
            log.debug("health check of %s failed: %r", replica.backend.url, exc)
        self._metrics.health_check(False)
        was_up = replica.healthy
        self._registry.record_fail(replica)
        if was_up and not replica.healthy:
            log.warning("backend %s is down: %r", replica.backend.url, exc)

    async def _probe(self, replica: Replica) -> list[ModelCard]:
        async with self._session.get(replica.url("/health")) as response:
            if response.status != 200:
                raise ValueError(f"/health answered {response.status}")
            await response.read()
        async with self._session.get(replica.url("/v1/models")) as response:
            if response.status != 200:
                raise ValueError(f"/v1/models answered {response.status}")
            listing = orjson.loads(await response.read())
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list):
            raise ValueError("/v1/models has no data list")
        return [card for card in data if isinstance(card, dict) and isinstance(card.get("id"), str)]

    def __repr__(self) -> str:
        return f"<HealthChecker [rounds {self._rounds} | every {self._interval_s} s]>"
