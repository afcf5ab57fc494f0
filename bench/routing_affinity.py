"""Does a conversation stay on one replica when several gateway processes route it?

    python bench/routing_affinity.py
    python bench/routing_affinity.py --users 256 --rounds 6 --replicas 2,8 --processes 1,2,4

Each gateway worker (GATEWAY_WORKERS) and each gateway pod keeps its own prefix index, and a
client's requests reach them as its connections land. This drives the gateway's own
`PrefixAffinity` objects, one per process, with the multi-round chat workload's request
bodies (chat_workload.py), each turn sent through a process drawn at random, one request at
a time (nothing in flight, so the load bound never steps in). Reported for each miss policy
(GATEWAY_PREFIX_MISS): the share of next turns that went to the replica that served the turn
before (where the cache is), and the busiest replica's share of the requests. Routing only:
no server, no timing.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import orjson

if __package__ in (None, ""):  # run as a script: make `bench.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.chat_workload import ChatSpec, User, words  # noqa: E402
from gateway.backends import Backend  # noqa: E402
from gateway.replicas import ModelRoute, Replica  # noqa: E402
from gateway.routing import MISS_POLICIES, PrefixAffinity  # noqa: E402

MODEL = "m"


def run(
    *, processes: int, replicas: int, miss: str, spec: ChatSpec, seed: int
) -> tuple[float, float]:
    """(next turns on the previous turn's replica, busiest replica's share)."""
    rng = random.Random(seed)
    pool = [Replica(Backend(f"http://10.0.0.{n + 1}:8000")) for n in range(replicas)]
    for replica in pool:
        replica.healthy = True
    routers = [
        (
            ModelRoute(MODEL, pool),
            PrefixAffinity(
                capacity=160_000, load_factor=1.5, block_bytes=256, hash_misses=miss == "hash"
            ),
        )
        for _ in range(processes)
    ]
    system = words(random.Random(seed), spec.system_words)
    users = [User(number, spec, system) for number in range(spec.users)]
    turns_left = {user.number: spec.rounds for user in users}
    last: dict[int, Replica] = {}
    stayed = moved = 0
    served = dict.fromkeys(pool, 0)
    active = list(users)
    while active:
        user = rng.choice(active)
        route, policy = rng.choice(routers)
        chosen = policy.pick(route, orjson.dumps(user.request()))
        assert chosen is not None
        served[chosen] += 1
        if user.number in last:
            if last[user.number] is chosen:
                stayed += 1
            else:
                moved += 1
        last[user.number] = chosen
        user.answered(words(user.rng, spec.answer_tokens))
        turns_left[user.number] -= 1
        if not turns_left[user.number]:
            active.remove(user)
    return stayed / max(1, stayed + moved), max(served.values()) / sum(served.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--users", type=int, default=128)
    add("--rounds", type=int, default=6)
    add("--system-words", type=int, default=600)
    add("--context-words", type=int, default=1200)
    add("--answer-words", type=int, default=100)
    add("--replicas", default="2,8", help="comma-separated")
    add("--processes", default="1,2,4", help="gateway processes, comma-separated")
    add("--seeds", type=int, default=3, help="runs per case; the table shows their mean")
    args = parser.parse_args()
    spec = ChatSpec(
        url="",
        model=MODEL,
        users=args.users,
        rounds=args.rounds,
        system_words=args.system_words,
        context_words=args.context_words,
        question_words=20,
        answer_tokens=args.answer_words,
    )
    print(
        f"{args.users} users x {args.rounds} rounds, system prompt {args.system_words} words, "
        f"own context {args.context_words}, mean of {args.seeds} seeds\n"
    )
    print("| replicas | gateway processes | GATEWAY_PREFIX_MISS | next turn stays | busiest |")
    print("|---|---|---|---|---|")
    for replicas in (int(n) for n in args.replicas.split(",")):
        for processes in (int(n) for n in args.processes.split(",")):
            for miss in MISS_POLICIES:
                results = [
                    run(processes=processes, replicas=replicas, miss=miss, spec=spec, seed=seed)
                    for seed in range(1, args.seeds + 1)
                ]
                stays = sum(r[0] for r in results) / len(results)
                busiest = sum(r[1] for r in results) / len(results)
                print(f"| {replicas} | {processes} | {miss} | {stays:.2f} | {busiest:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
