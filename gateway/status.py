"""GET /replicas: the replicas as a person at a terminal wants to see them (`curl | jq`)."""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.proxy import Inflight
from gateway.replicas import Registry, Replica
from gateway.routing import RoutingState


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


def routing_view(state: RoutingState) -> dict[str, Any]:
    view: dict[str, Any] = {"policy": state.policy}
    if state.index_capacity:
        view["prefix_index"] = {
            "entries": state.index_entries,
            "capacity": state.index_capacity,
            "lookups": state.index_lookups,
            "hits": state.index_hits,
            "hit_ratio": round(state.index_hit_ratio, 3),
            "load_bound_spills": state.bound_spills,
        }
    return view


def replicas_view(registry: Registry, inflight: Inflight) -> bytes:
    now = time.monotonic()
    return orjson.dumps(
        {
            "in_flight": inflight.count,
            "draining": inflight.draining,
            "startup_window_open": registry.in_startup_window(),
            "never_answered": registry.never_answered(),
            "routing": routing_view(registry.routing_state()),
            "replicas": [replica_state(replica, now) for replica in registry.replicas],
        },
        option=orjson.OPT_INDENT_2,
    )
