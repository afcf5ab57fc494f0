"""The `vllm-gateway` command as a user runs it: a real process, configured by environment."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

import aiohttp

from tests.conftest import StartFake
from tests.test_proxy import CHAT, chat


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_help_lists_the_variables() -> None:
    result = run_cli("--help", env={})
    assert result.returncode == 0
    assert "GATEWAY_BACKENDS" in result.stdout and "GATEWAY_IDLE_TIMEOUT_S" in result.stdout


def test_bad_configuration_stops_startup_naming_every_bad_variable() -> None:
    result = run_cli(env={"GATEWAY_PORT": "x", "GATEWAY_BACKEND": "http://h:1"})
    assert result.returncode == 2
    assert "GATEWAY_PORT='x'" in result.stderr
    assert "GATEWAY_BACKEND: unknown variable" in result.stderr
    assert "no backend configured" in result.stderr
    assert "Traceback" not in result.stderr


async def test_the_command_serves_and_drains_streams_on_sigterm(
    start_fake: StartFake, server: str, client: aiohttp.ClientSession
) -> None:
    gate = asyncio.Event()
    alpha = await start_fake("alpha", gate=gate)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        env=clean
        | {
            "GATEWAY_BACKENDS": alpha.url,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(port),
            "GATEWAY_HEALTH_INTERVAL_S": "0.05",
            "GATEWAY_SERVER": server,
        },
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # Readiness is the event to wait for: the first passed health check of the backend.
        while True:
            try:
                async with client.get(url + "/ready") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass
            assert process.returncode is None
            await asyncio.sleep(0.05)
        async with client.post(url + CHAT, data=chat("alpha", stream=True)) as stream:
            assert stream.status == 200
            first = await stream.content.readany()
            process.send_signal(signal.SIGTERM)
            async with aiohttp.ClientSession() as fresh:
                while True:
                    async with fresh.get(url + "/ready") as response:
                        if response.status == 503:
                            break
                    await asyncio.sleep(0.02)
            assert process.returncode is None, "the open stream holds the exit back"
            gate.set()
            rest = await stream.content.read()
        assert (first + rest).endswith(b"data: [DONE]\n\n")
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
