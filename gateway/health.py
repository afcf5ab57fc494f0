"""Active health checks: every backend, every interval, on the gateway's own loop and session."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import orjson

from gateway.replicas import ModelCard, Registry, Replica

log = logging.getLogger("gateway.health")


class HealthChecker:
    """Checks each replica with GET /health and GET /v1/models and records the outcome.

    A check passes only when both answer 200 and the model list parses; the models listed are
    what the replica is routed for from then on. `run` never raises: a failing backend is a
    state to record, not an error of the checker.
    """

    __slots__ = ("_registry", "_session", "_interval_s", "_timeout_s", "_rounds", "_round_done")

    def __init__(
        self,
        registry: Registry,
        session: aiohttp.ClientSession,
        *,
        interval_s: float,
        timeout_s: float,
    ) -> None:
        self._registry = registry
        self._session = session
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._rounds = 0
        self._round_done = asyncio.Condition()

    async def run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self._interval_s)

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(replica) for replica in self._registry.replicas))
        async with self._round_done:
            self._rounds += 1
            self._round_done.notify_all()

    async def wait_rounds(self, count: int) -> None:
        """Return once `count` more rounds of checks have completed (for tests and startup)."""
        async with self._round_done:
            target = self._rounds + count
            await self._round_done.wait_for(lambda: self._rounds >= target)

    async def _check(self, replica: Replica) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                cards = await self._probe(replica)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            if replica.healthy or not replica.ever_up:
                log.debug("health check of %s failed: %r", replica.backend.url, exc)
            was_up = replica.healthy
            self._registry.record_fail(replica)
            if was_up and not replica.healthy:
                log.warning("backend %s is down: %r", replica.backend.url, exc)
            return
        was_up = replica.healthy
        self._registry.record_pass(replica, cards)
        if replica.healthy and not was_up:
            log.info("backend %s is up, serving %s", replica.backend.url, sorted(replica.cards))

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
