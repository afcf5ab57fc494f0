"""GATEWAY_WORKERS=2: the real command, a supervisor and two worker processes on one port."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TEST_ENV, StartFake, open_raw
from tests.fakes import FakeVllm
from tests.test_metrics import requests
from tests.test_proxy import CHAT, chat

COMMAND = str(Path(sys.executable).with_name("vllm-gateway"))
REQUEST_ID = re.compile(r"gw-([0-9a-f]{12})-[0-9]+")
BACKEND_UP = re.compile(r"\[([0-9]+)\]: backend \S+ is up")
# Each wait ends on its event; this only bounds a wait for one that never comes. Two fresh
# interpreters starting on a busy two-core machine take a second or two.
DEADLINE_S = 20.0


class Logs:
    """The command's stderr, line by line, for a test to wait on what it logs."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: list[str] = []
        self.closed = False
        self._changed = asyncio.Condition()
        self.reader = asyncio.create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            async with self._changed:
                self.lines.append(line.decode(errors="replace").rstrip())
                self._changed.notify_all()
        async with self._changed:
            self.closed = True
            self._changed.notify_all()

    async def wait_for(self, found: Callable[[list[str]], bool]) -> None:
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: found(self.lines) or self.closed), DEADLINE_S
            )
        assert found(self.lines), "\n".join(self.lines)

    async def wait_until_up(self, pids: int) -> None:
        """Until `pids` distinct worker processes have logged the backend up."""
        await self.wait_for(lambda lines: len(up_pids(lines)) >= pids)


def up_pids(lines: list[str]) -> set[int]:
    return {int(match[1]) for line in lines if (match := BACKEND_UP.search(line))}


@dataclass
class Command:
    process: asyncio.subprocess.Process
    url: str
    logs: Logs

    def workers(self) -> set[int]:
        return worker_pids(self.process.pid)


def worker_pids(parent: int) -> set[int]:
    """The live worker processes of `parent` (not multiprocessing's resource tracker)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        # The command name, in parentheses, may hold spaces: the fields follow the last ")".
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == parent and state not in "ZX" and b"--multiprocessing-fork" in cmdline:
            pids.add(int(entry.name))
    return pids


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in "ZX"


async def exited(pid: int) -> None:
    """Until process `pid` has exited: its pidfd turns readable then (Linux 5.3+)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
    try:
        await asyncio.wait_for(gone, DEADLINE_S)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


@asynccontextmanager
async def gateway_command(
    backend: FakeVllm, server: str, *, wait_up: bool = True, **env: str
) -> AsyncIterator[Command]:
    """`vllm-gateway` with two workers under `server` in front of `backend`, on a free port;
    yielded once both have seen the backend up (`wait_up`), else at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    environ = TEST_ENV | {
        "GATEWAY_BACKENDS": backend.url,
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_WORKERS": "2",
        "GATEWAY_HEALTH_INTERVAL_S": "0.05",
        "GATEWAY_LOG_LEVEL": "info",
        "GATEWAY_SERVER": server,
    }
    process = await asyncio.create_subprocess_exec(
        COMMAND, env=clean | environ | env, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    logs = Logs(process.stderr)
    command = Command(process, f"http://127.0.0.1:{port}", logs)
    workers: set[int] = set()
    try:
        if wait_up:
            await logs.wait_until_up(2)
        workers = command.workers()
        yield command
    finally:
        workers |= command.workers()
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), DEADLINE_S)
        # Whatever a failed test left running: a worker outliving the command would hold its
        # stderr open (and the port) for good.
        for pid in workers | {process.pid}:
            if alive(pid):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        await process.wait()
        await logs.reader


def fresh_connections() -> aiohttp.ClientSession:
    """A client that opens a new TCP connection for every request."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def serving_processes(client: aiohttp.ClientSession, url: str, count: int) -> set[str]:
    """Send `count` requests; the request-id prefixes of the processes that served them.

    Each Forwarder stamps its own random prefix: two prefixes, two processes serving.
    """
    prefixes = set()
    for _ in range(count):
        async with client.post(url + CHAT, data=chat("alpha")) as response:
            assert response.status == 200
            request_id = REQUEST_ID.fullmatch(response.headers["X-Request-Id"])
            assert request_id is not None
            prefixes.add(request_id[1])
    return prefixes


async def test_both_workers_serve_connections_on_the_one_port(
    start_fake: StartFake, server: str
) -> None:
    alpha = await start_fake("alpha")
    async with gateway_command(alpha, server) as gateway, fresh_connections() as client:
        assert len(gateway.workers()) == 2
        # The kernel hashes each connection to a socket: all 64 on one has odds of 2**-63.
        assert len(await serving_processes(client, gateway.url, 64)) == 2


async def test_a_killed_worker_is_replaced_and_its_queued_connections_answered(
    start_fake: StartFake, server: str
) -> None:
    alpha = await start_fake("alpha")
    async with gateway_command(alpha, server) as gateway, fresh_connections() as client:
        before = gateway.workers()
        assert len(before) == 2
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        await exited(victim)

        # About half of these land on the dead worker's socket, which the supervisor keeps
        # open: they wait in its queue for the replacement instead of being refused.
        async def health() -> int:
            async with client.get(gateway.url + "/health") as response:
                return response.status

        statuses = await asyncio.gather(*(health() for _ in range(32)))
        assert statuses == [200] * 32
        # The supervisor logs the restart once the replacement process exists.
        await gateway.logs.wait_for(lambda lines: any(" restarted: pid " in line for line in lines))
        assert len(gateway.workers()) == 2
        replacement = gateway.workers() - before
        assert len(replacement) == 1
        await gateway.logs.wait_for(lambda lines: replacement <= up_pids(lines))
        async with client.post(gateway.url + CHAT, data=chat("alpha")) as response:
            assert response.status == 200
        logged = "\n".join(gateway.logs.lines)
        assert f"(pid {victim}) was killed by SIGKILL; restarting it" in logged
        assert f"restarted: pid {replacement.pop()}" in logged


async def test_sigterm_drains_every_worker_then_the_supervisor_exits_0(
    start_fake: StartFake, server: str, client: aiohttp.ClientSession
) -> None:
    gate = asyncio.Event()
    alpha = await start_fake("alpha", gate=gate)
    async with gateway_command(alpha, server, GATEWAY_DRAIN_TIMEOUT_S="30") as gateway:
        workers = gateway.workers()
        assert len(workers) == 2
        async with client.post(gateway.url + CHAT, data=chat("alpha", stream=True)) as stream:
            first = await stream.content.readany()
            gateway.process.send_signal(signal.SIGTERM)
            # The worker holding the stream got the supervisor's SIGTERM and is draining.
            await gateway.logs.wait_for(
                lambda lines: any("draining: 1 requests in flight" in line for line in lines)
            )
            assert alive(gateway.process.pid), "the open stream holds the exit back"
            gate.set()
            rest = await stream.content.read()
        assert (first + rest).endswith(b"data: [DONE]\n\n")
        assert await asyncio.wait_for(gateway.process.wait(), DEADLINE_S) == 0
        assert not any(alive(pid) for pid in workers)


async def test_workers_do_not_outlive_a_supervisor_killed_with_sigkill(
    start_fake: StartFake, server: str
) -> None:
    alpha = await start_fake("alpha")
    async with gateway_command(alpha, server) as gateway:
        workers = gateway.workers()
        assert len(workers) == 2
        gateway.process.kill()
        assert await gateway.process.wait() == -signal.SIGKILL
        for pid in workers:
            await exited(pid)
        assert not any(alive(pid) for pid in workers)


async def test_any_worker_scrapes_the_sum_of_all_and_a_killed_one_keeps_its_counts(
    start_fake: StartFake, server: str
) -> None:
    alpha = await start_fake("alpha")
    async with gateway_command(alpha, server) as gateway, fresh_connections() as client:
        prefixes = await serving_processes(client, gateway.url, 32)
        assert len(prefixes) == 2, "both workers served some of the requests"

        async def served() -> float:
            async with client.get(gateway.url + "/metrics") as response:
                samples = {
                    (s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(await response.text())
                    for s in family.samples
                }
            return requests(samples, model="alpha", route=CHAT, outcome="ok")

        # Each worker moves its counts to the shared files after each round of health checks
        # (every 0.05 s here): once a scrape shows all 32, every later one does, whichever
        # worker answers it (fresh connections land on either).
        async with asyncio.timeout(DEADLINE_S):
            while await served() != 32.0:
                pass
        assert [await served() for _ in range(16)] == [32.0] * 16

        victim = min(gateway.workers())
        os.kill(victim, signal.SIGKILL)
        await exited(victim)
        await gateway.logs.wait_for(lambda lines: any(" restarted: pid " in line for line in lines))
        # The dead worker's requests stay counted: no scrape sees the counter go backwards.
        assert [await served() for _ in range(16)] == [32.0] * 16


async def test_workers_serve_only_once_they_have_checked_the_backends(
    start_fake: StartFake, server: str
) -> None:
    # A pinned model has its route before any check; a worker serving before its first
    # round would answer it "no healthy replica".
    checks = asyncio.Event()
    alpha = await start_fake("alpha", health_gate=checks)
    async with gateway_command(
        alpha,
        server,
        wait_up=False,
        GATEWAY_MODELS=f"alpha={alpha.url}",
        GATEWAY_HEALTH_TIMEOUT_S="10",
    ) as gateway:
        # Each worker's first check has reached the backend (so the supervisor's sockets
        # listen), and hangs there.
        while alpha.health_checks < 2:
            await asyncio.sleep(0.01)
        body = chat("alpha")
        request = (
            f"POST {CHAT} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        # Requests sent while the first checks hang wait in the sockets' queues...
        streams = []
        for _ in range(8):
            reader, writer = await open_raw(gateway.url)
            writer.write(request)
            await writer.drain()
            streams.append((reader, writer))
        checks.set()
        # ...and are served once the checks are in.
        for reader, writer in streams:
            answer = await asyncio.wait_for(reader.read(), DEADLINE_S)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
