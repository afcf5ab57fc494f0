"""The gateway with every routing decision checked against the load bound, for routing_sim.py.

Same settings, same objects and server as the `vllm-gateway` command; the registry's policy
is wrapped so that after each pick it records the chosen replica's requests in flight (this
one included) over (the average in flight over the model's healthy replicas not yet tried,
this one included, + 1): GATEWAY_PREFIX_LOAD_FACTOR bounds it for `prefix`. On SIGTERM it
drains as the gateway does, then prints `load bound: {"peak": R, "picks": N}` and
`routing state: {...}` (the policy's state(): index entries, lookups, hits, spills). Not a
supported way to run the gateway.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Container

import uvloop

from gateway.logs import configure_logging
from gateway.replicas import ModelRoute, Replica
from gateway.routing import Policy, RoutingState
from gateway.server import running, serve_gateway
from gateway.settings import Settings, SettingsError


class Checked(Policy):
    """A policy that records how close each of its picks came to the load bound."""

    __slots__ = ("inner", "peak", "picks")

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.peak = 0.0
        self.picks = 0

    def pick(
        self, route: ModelRoute, body: bytes, exclude: Container[Replica] = ()
    ) -> Replica | None:
        chosen = self.inner.pick(route, body, exclude)
        if chosen is not None:
            # As the policy saw them: this request is not counted in flight yet.
            loads = [r.inflight for r in route.replicas if r.healthy and r not in exclude]
            total = sum(loads) + 1
            self.peak = max(self.peak, (chosen.inflight + 1) / (total / len(loads) + 1))
            self.picks += 1
        return chosen

    def state(self, replicas: object) -> RoutingState:
        return self.inner.state(replicas)  # type: ignore[arg-type]


async def serve(settings: Settings) -> tuple[Checked, RoutingState]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with running(settings) as gateway:
        checked = Checked(gateway.registry.policy)
        gateway.registry.policy = checked
        await serve_gateway(gateway, settings, shutdown_trigger=stop.wait)
        state = checked.inner.state(gateway.registry.replicas)
    return checked, state


def main() -> int:
    try:
        settings = Settings.from_environ(os.environ)
    except SettingsError as exc:
        print(f"serve_checked: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, with_pid=False)
    checked, state = uvloop.run(serve(settings))
    print("load bound: " + json.dumps({"peak": checked.peak, "picks": checked.picks}))
    print("routing state: " + json.dumps(dataclasses.asdict(state)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
