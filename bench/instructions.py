"""Instructions per request: the gateway's cost counted by callgrind, not timed.

On a shared or drifting machine a 5% difference in CPU per request hides in the noise of any
timing. Instruction counts do not drift: valgrind counts every instruction the gateway's
process executes (all its threads: the log writer's too) whatever else the machine does. The
gateway runs under `valgrind --tool=callgrind` in front of the fake vLLM; a client sends N
sequential 16-event streams, then the gateway is stopped. Two runs with N1 and N2 requests
give (I2 - I1) / (N2 - N1): startup and shutdown cancel out.

    python bench/instructions.py                         # this checkout's gateway
    python bench/instructions.py --python OTHER/.venv/bin/python   # another checkout's
    python bench/instructions.py --env GATEWAY_ACCESS_LOG=off      # what the access log costs

Needs valgrind (Debian: valgrind). Under callgrind the gateway runs about 50x slower: a run
of the defaults takes a few minutes. Python's hash seed is fixed so runs repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

if __package__ in (None, ""):  # run as a script: make `bench.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import MODEL, fake_vllm  # noqa: E402

SUMMARY = re.compile(rb"^(?:summary|totals): (\d+)", re.M)
BODY = (
    b'{"model": "' + MODEL.encode() + b'", "stream": true, "max_tokens": 16, '
    b'"messages": [{"role": "user", "content": "Hello there"}]}'
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_up(url: str, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    async with aiohttp.ClientSession() as client:
        while True:
            try:
                async with client.get(url + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start under valgrind")
            await asyncio.sleep(0.5)


async def send_streams(url: str, count: int, headers: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as client:
        for _ in range(count):
            async with client.post(
                url + "/v1/chat/completions",
                data=BODY,
                headers={"Content-Type": "application/json"} | headers,
            ) as response:
                body = await response.read()
                if response.status != 200 or not body.endswith(b"data: [DONE]\n\n"):
                    raise RuntimeError(f"bad answer {response.status}: {body[-200:]!r}")


async def count(
    python: str, requests: int, env: dict[str, str], workdir: Path, headers: dict[str, str]
) -> int:
    """Instructions executed by one gateway process that served `requests` streams."""
    async with fake_vllm(None) as (upstream, _):
        port = free_port()
        out = workdir / f"callgrind.{requests}.{len(os.listdir(workdir))}.out"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        environ |= {
            "PYTHONHASHSEED": "0",
            "GATEWAY_MODELS": f"{MODEL}={upstream}",
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(port),
            "GATEWAY_LOG_LEVEL": "warning",
            # One round of checks at startup and none while counting.
            "GATEWAY_HEALTH_INTERVAL_S": "3600",
            "GATEWAY_DRAIN_TIMEOUT_S": "1",
        } | env
        with open(workdir / f"gateway.{requests}.log", "wb") as log:
            proc = subprocess.Popen(
                [
                    "valgrind",
                    "--tool=callgrind",
                    f"--callgrind-out-file={out}",
                    python,
                    "-m",
                    "gateway",
                ],
                env=environ,
                # Not a checkout: `-m gateway` must import the gateway of `python`'s venv.
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_up(url, 600)
            await send_streams(url, requests, headers)
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 300)
    match = SUMMARY.search(out.read_bytes())
    if match is None:
        raise RuntimeError(f"no instruction total in {out}")
    return int(match[1])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="python of the gateway's venv")
    parser.add_argument("--low", type=int, default=50, help="requests of the first run")
    parser.add_argument("--high", type=int, default=250, help="requests of the second run")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the gateway")
    parser.add_argument(
        "--per-event",
        action="store_true",
        help="instead: --high streams of 16 and of 64 paced events (one chunk each, even "
        "under valgrind): the difference is the cost of 48 events a stream",
    )
    parser.add_argument(
        "--interval-ms",
        type=int,
        default=20,
        help="with --per-event: between events; under valgrind the gateway takes a few ms "
        "an event, and closer events would reach it several to a chunk",
    )
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory(prefix="gateway-instructions-") as tmp:
        if args.per_event:
            paced = {"x-fake-interval-ms": str(args.interval_ms)}
            short = await count(
                args.python, args.high, env, Path(tmp), paced | {"x-fake-events": "16"}
            )
            long = await count(
                args.python, args.high, env, Path(tmp), paced | {"x-fake-events": "64"}
            )
            per_event = (long - short) / (args.high * 48)
            print(
                f"{args.python}: {short:,} instructions with {args.high} streams of 16 paced "
                f"events, {long:,} of 64: {per_event:,.0f} per event"
            )
            return
        low = await count(args.python, args.low, env, Path(tmp), {})
        high = await count(args.python, args.high, env, Path(tmp), {})
    per_request = (high - low) / (args.high - args.low)
    print(
        f"{args.python}: {low:,} instructions with {args.low} requests, {high:,} with "
        f"{args.high}: {per_request:,.0f} per 16-event request"
    )


if __name__ == "__main__":
    asyncio.run(main())
