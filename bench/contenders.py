"""The proxies a benchmark run compares, each started as its own process pinned to one core.

A contender knows how to find itself (``missing()`` says why it cannot run here), how to start
in front of one upstream (``command()``) and its version. ``start()`` runs one, waits until a
real stream passes through it, and stops it afterwards. ``direct`` is no process at all: the
load generator talks to the fake vLLM itself, which gives the baseline every proxy adds to.
``bare-hypercorn``, ``bare-uvicorn`` and ``bare-granian`` are the floor under the gateway: a bare
proxy under the same server, so that what the gateway costs beyond them is its own code's.

Contenders installed by ``make bench-deps`` live in their own virtualenvs under
``<venv>/contenders/NAME`` (their pins would fight the gateway's), found from ``sys.prefix``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CONTENDER_VENVS = Path(sys.prefix) / "contenders"
NGINX_TEMPLATE = BENCH / "nginx.conf.template"


@dataclass(frozen=True)
class Target:
    """Where the load goes, and the process tree whose CPU and memory it costs (None: direct)."""

    name: str
    url: str
    pid: int | None
    log: Path | None = None


class StartFailed(RuntimeError):
    """A contender did not come up; the message says why, with the tail of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The runner's environment without any GATEWAY_* (an unknown one stops the gateway)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(extra)
    return env


def _venv_tool(venv: str, tool: str) -> Path | None:
    for path in (CONTENDER_VENVS / venv / "bin" / tool, Path(sys.executable).parent / tool):
        if path.exists():
            return path
    found = shutil.which(tool)
    return Path(found) if found else None


def _dist_version(venv: str, dist: str) -> str:
    """A package's version from its dist-info folder in a contender's virtualenv."""
    pattern = f"lib/python*/site-packages/{dist.replace('-', '_')}-*.dist-info"
    for info in (CONTENDER_VENVS / venv).glob(pattern):
        return info.name.removesuffix(".dist-info").split("-")[1]
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def _server_missing(*modules: str) -> str | None:
    for module in modules:
        try:
            metadata.version(module)
        except metadata.PackageNotFoundError:
            return f"{module} is not installed (make install, bench/requirements.txt)"
    return None


class Contender:
    """One proxy under test. Subclasses fill in how to find, start and name it."""

    name = ""
    about = ""
    reduced = False  # too slow for the full load: scenarios shrink (see Plan.for_contender)
    # Re-encodes the stream (LiteLLM moves finish_reason into an event of its own), so the
    # event count per stream is not checked.
    rewrites_events = False
    start_timeout_s = 30.0

    def missing(self) -> str | None:
        """Why this contender cannot run here, or None."""
        return None

    def version(self) -> str:
        return ""

    def command(self, upstream: str, model: str, port: int, workdir: Path) -> list[str]:
        raise NotImplementedError

    def env(self, upstream: str, model: str, port: int) -> dict[str, str]:
        return clean_env({})

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class Direct(Contender):
    name = "direct"
    about = "the load generator straight to the fake vLLM: the baseline"


class Gateway(Contender):
    name = "gateway"
    about = "vllm-gateway, its normal command (hypercorn on uvloop)"

    def missing(self) -> str | None:
        return None if self._argv() else "the vllm-gateway command is not installed"

    def _argv(self) -> list[str]:
        tool = Path(sys.executable).parent / "vllm-gateway"
        return [str(tool)] if tool.exists() else []

    def version(self) -> str:
        return metadata.version("vllm-gateway")

    def command(self, upstream: str, model: str, port: int, workdir: Path) -> list[str]:
        return self._argv()

    def env(self, upstream: str, model: str, port: int) -> dict[str, str]:
        return clean_env(
            {
                "GATEWAY_MODELS": f"{model}={upstream}",
                "GATEWAY_HOST": "127.0.0.1",
                "GATEWAY_PORT": str(port),
                "GATEWAY_LOG_LEVEL": "warning",
                "GATEWAY_DRAIN_TIMEOUT_S": "1",
            }
        )


class GatewayUvicorn(Gateway):
    name = "gateway-uvicorn"
    about = "vllm-gateway with GATEWAY_SERVER=uvicorn (uvicorn + httptools on uvloop)"

    def missing(self) -> str | None:
        return _server_missing("uvicorn", "httptools") or super().missing()

    def version(self) -> str:
        return f"{metadata.version('vllm-gateway')}, uvicorn {metadata.version('uvicorn')}"

    def env(self, upstream: str, model: str, port: int) -> dict[str, str]:
        return super().env(upstream, model, port) | {"GATEWAY_SERVER": "uvicorn"}


class GatewayGranian(Gateway):
    name = "gateway-granian"
    about = (
        "the same gateway app under granian, one Rust runtime thread, uvloop "
        "(bench/serve_granian.py): the candidate server not chosen"
    )

    def missing(self) -> str | None:
        return _server_missing("granian")

    def version(self) -> str:
        return f"{metadata.version('vllm-gateway')}, granian {metadata.version('granian')}"

    def command(self, upstream: str, model: str, port: int, workdir: Path) -> list[str]:
        return [sys.executable, str(BENCH / "serve_granian.py")]


class BareHypercorn(Contender):
    """The server floor: what the server and aiohttp cost with no gateway code at all."""

    name = "bare-hypercorn"
    about = (
        "the floor under `gateway`: a bare ASGI proxy (bench/bare_proxy.py), one pooled "
        "aiohttp session, chunks relayed as they come, under the same hypercorn config"
    )
    server = "hypercorn"

    def version(self) -> str:
        return (
            f"{self.server} {metadata.version(self.server)}, aiohttp {metadata.version('aiohttp')}"
        )

    def command(self, upstream: str, model: str, port: int, workdir: Path) -> list[str]:
        return [sys.executable, str(BENCH / "bare_proxy.py"), self.server, "--port", str(port)]

    def env(self, upstream: str, model: str, port: int) -> dict[str, str]:
        return clean_env({"BARE_UPSTREAM": upstream})


class BareUvicorn(BareHypercorn):
    name = "bare-uvicorn"
    about = (
        "the floor under `gateway-uvicorn`: the same bare proxy served exactly as the gateway "
        "serves itself under uvicorn (gateway/uvicorn_server.py)"
    )
    server = "uvicorn"

    def missing(self) -> str | None:
        return _server_missing("uvicorn", "httptools")


class BareGranian(BareHypercorn):
    name = "bare-granian"
    about = "the floor under `gateway-granian`: the same bare proxy under granian"
    server = "granian"

    def missing(self) -> str | None:
        return _server_missing("granian")


class Nginx(Contender):
    name = "nginx"
    about = "nginx, one worker, proxy_buffering off, keep-alive upstream (nginx.conf.template)"

    def missing(self) -> str | None:
        return None if self._binary() else "no nginx binary (make bench-deps installs nginx-light)"

    def _binary(self) -> str | None:
        return shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None
        )

    def version(self) -> str:
        binary = self._binary()
        if not binary:
            return ""
        out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
        found = re.search(r"nginx/(\S+)", out.stderr + out.stdout)
        return found.group(1) if found else "?"

    def command(self, upstream: str, model: str, port: int, workdir: Path) -> list[str]:
        conf = workdir / "nginx.conf"
        text = NGINX_TEMPLATE.read_text()
        for key, value in {
            "@PREFIX@": str(workdir),
            "@PORT@": str(port),
            "@UPSTREAM@": upstream.removeprefix("http://"),
        }.items():
            text = text.replace(key, value)
        conf.write_text(text)
        # -e: without it nginx first opens its compiled-in error log under /var/log.
        return [str(self._binary()), "-p", str(workdir), "-c", str(conf), "-e", "stderr"]


class VllmRouter(Contender):
    name = "vllm-router"
    about = "vLLM's Rust router (PyPI vllm-router), one static worker, round robin"

    def missing(self) -> str | None:
        if _venv_tool("vllm-router", "vllm-router") is None:
            return "vllm-router is not installed (make bench-deps)"
        return None

    def version(self) -> str:
        return _dist_version("vllm-router", "vllm-router")

    def command(self, upstream: str, model: str, port: int, workdir: Path) -> list[str]:
        tool = _venv_tool("vllm-router", "vllm-router")
        return [
            str(tool),
            "--worker-urls",
            upstream,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--policy",
            "round_robin",
            "--log-level",
            "warning",
        ]


class Litellm(Contender):
    name = "litellm"
    about = "LiteLLM proxy, one worker, openai/<model> pointed at the fake's /v1"
    reduced = True
    rewrites_events = True
    start_timeout_s = 180.0  # over a minute to import on a loaded core

    def missing(self) -> str | None:
        if _venv_tool("litellm", "litellm") is None:
            return "litellm is not installed (make bench-deps)"
        return None

    def version(self) -> str:
        return _dist_version("litellm", "litellm")

    def command(self, upstream: str, model: str, port: int, workdir: Path) -> list[str]:
        config = workdir / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            f"  - model_name: {model}\n"
            "    litellm_params:\n"
            f"      model: openai/{model}\n"
            f"      api_base: {upstream}/v1\n"
            "      api_key: unused\n"
            "litellm_settings:\n"
            "  telemetry: false\n"
            "  set_verbose: false\n"
            # Without a master key it refuses to start unless told this is a local setup;
            # with one, every request would need its Authorization header.
            "general_settings:\n"
            "  dangerously_permit_weak_or_unset_master_key: true\n"
        )
        tool = _venv_tool("litellm", "litellm")
        return [str(tool), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]

    def env(self, upstream: str, model: str, port: int) -> dict[str, str]:
        # No network here: the cost map must come from the package, not be fetched.
        return clean_env({"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"})


ALL: tuple[Contender, ...] = (
    Direct(),
    Gateway(),
    BareHypercorn(),
    GatewayUvicorn(),
    BareUvicorn(),
    GatewayGranian(),
    BareGranian(),
    Nginx(),
    VllmRouter(),
    Litellm(),
)


def by_name(names: list[str] | None) -> list[Contender]:
    if not names:
        return list(ALL)
    known = {c.name: c for c in ALL}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown contenders {unknown}; known: {', '.join(known)}")
    return [known[n] for n in names]


def pinned(argv: list[str], core: int | None) -> list[str]:
    return ["taskset", "-c", str(core), *argv] if core is not None else argv


async def probe(url: str, request: bytes, *, timeout_s: float = 5.0) -> bool:
    """True when one streamed request through ``url`` comes back 200 and whole."""
    host, _, port = url.removeprefix("http://").partition(":")
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(request)
                data = b""
                while b"[DONE]" not in data:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    data += chunk
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
    return data.startswith(b"HTTP/1.1 200") and b"[DONE]" in data


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])[-800:]


async def _stop(proc: asyncio.subprocess.Process, timeout_s: float = 10.0) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def start(
    contender: Contender,
    *,
    upstream: str,
    model: str,
    probe_request: bytes,
    workdir: Path,
    core: int | None,
) -> AsyncIterator[Target]:
    """Run ``contender`` in front of ``upstream`` until the block ends; the Target is yielded
    only once a real stream has passed through it."""
    if isinstance(contender, Direct):
        yield Target(contender.name, upstream, None)
        return
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{contender.name}.log"
    argv = pinned(contender.command(upstream, model, port, workdir), core)
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=contender.env(upstream, model, port),
            cwd=workdir,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + contender.start_timeout_s
        while not await probe(url, probe_request):
            if proc.returncode is not None:
                raise StartFailed(f"exited with status {proc.returncode}: {_tail(log)}")
            if time.monotonic() > deadline:
                raise StartFailed(
                    f"no stream came through in {contender.start_timeout_s:.0f} s: {_tail(log)}"
                )
            await asyncio.sleep(0.1)
        yield Target(contender.name, url, proc.pid, log)
    finally:
        await _stop(proc)
