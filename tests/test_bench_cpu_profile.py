"""Smoke tests of bench/cpu_profile.py: py-spy's samples are charged to the right shares."""

from __future__ import annotations

import collections

from bench import cpu_profile as profile

# Three stacks in py-spy's raw format, as `--subprocesses` writes them.
COLLAPSED = [
    'process 7:"python -m gateway";run (uvloop/__init__.py:92);'
    "Runner.run (asyncio/runners.py:118) 40",
    'process 7:"python -m gateway";_handle (hypercorn/asyncio/task_group.py:27);'
    "Forwarder._relay (gateway/exchange.py:210);"
    "H11Protocol.stream_send (hypercorn/protocol/h11.py:127) 30",
    "ClientSession._request (aiohttp/client.py:819) 20",
    "Forwarder._open (gateway/exchange.py:159) 10",
    "",
]


def test_samples_are_charged_to_the_innermost_frame() -> None:
    """A sample counts for the frame running when it was taken, not for its callers."""
    counts = profile.innermost_frames(COLLAPSED)
    assert counts == collections.Counter(
        {
            "Runner.run (asyncio/runners.py:118)": 40,
            "H11Protocol.stream_send (hypercorn/protocol/h11.py:127)": 30,
            "ClientSession._request (aiohttp/client.py:819)": 20,
            "Forwarder._open (gateway/exchange.py:159)": 10,
        }
    )


def test_shares_are_microseconds_per_request() -> None:
    """At 1,000 samples/s one sample is 1 ms; over 10 requests that is 100 µs per request."""
    result = profile.Profile(
        contender="gateway",
        scenario="burst",
        units=10,
        unit="request",
        rate_hz=1000,
        samples=profile.innermost_frames(COLLAPSED),
    )
    assert result.by_group() == {
        "event loop (native)": 4000.0,
        "server: hypercorn + h11": 3000.0,
        "upstream client: aiohttp": 2000.0,
        "the gateway's own code": 1000.0,
    }
    rendered = profile.table([result])
    assert "| server: hypercorn + h11 | 3000.0 |" in rendered
    assert "**10000.0**" in rendered
