"""GET /replicas: the replicas as a person at a terminal wants to see them (`curl | jq`)."""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.proxy import Inflight
from gateway.replicas import Registry, Replica


def replica_state(replica: Replica, now: float) -> dict[str, Any]:
    if replica.healthy:
        state = "ejected" if replica.ejected_until else "up"
    else:
        state = "down" if replica.ever_up else "never_up"
    ejected_for = max(0.0, replica.ejected_until - now) if replica.ejected_until else 0.0
    return {
        "url": replica.backend.url,
        "state": state,
        "models": sorted(replica.cards.keys() | replica.pinned),
        "in_flight": replica.inflight,
        "strikes": replica.strikes,
        "ejections": replica.ejections,
        "ejected_for_s": round(ejected_for, 1),
        "probing": replica.probing,
        "health": {"passes": replica.passes, "fails": replica.fails},
    }


def replicas_view(registry: Registry, inflight: Inflight) -> bytes:
    now = time.monotonic()
    return orjson.dumps(
        {
            "in_flight": inflight.count,
            "draining": inflight.draining,
            "startup_window_open": registry.in_startup_window(),
            "never_answered": registry.never_answered(),
            "replicas": [replica_state(replica, now) for replica in registry.replicas],
        },
        option=orjson.OPT_INDENT_2,
    )
