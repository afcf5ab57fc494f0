"""Settings: one pure function of an environment mapping.

Every `GATEWAY_*` variable is declared once in `VARIABLES`; `--help` and the README's table
are printed from the same list. A bad value, an unknown `GATEWAY_*` name (a typo) or a missing
backend list are all collected and reported together, each by name, so a container that fails to
start says everything that is wrong in one message.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.backends import Backend, BackendError, parse_backend_list, parse_model_routes

PREFIX = "GATEWAY_"
MIB = 1024 * 1024
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class SettingsError(ValueError):
    """Startup configuration is invalid; `problems` names each bad variable."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"invalid configuration:\n{lines}")


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    meaning: str


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "GATEWAY_BACKENDS",
        "",
        "Comma-separated base URLs of vLLM servers (http://10.0.0.5:8000,http://10.0.0.6:8000). "
        "Every model id a server lists in /v1/models, LoRA adapters included, is routed to it; "
        "servers listing the same id are replicas of that model.",
    ),
    Variable(
        "GATEWAY_MODELS",
        "",
        "Pinned routes instead of (or besides) discovery: "
        "model-a=http://h1:8000|http://h2:8000;model-b=http://h3:8000. "
        "A pinned server takes the model whether or not its /v1/models lists it.",
    ),
    Variable("GATEWAY_HOST", "0.0.0.0", "Address to listen on."),
    Variable("GATEWAY_PORT", "8080", "Port to listen on."),
    Variable(
        "GATEWAY_HEALTH_INTERVAL_S",
        "5",
        "Seconds between health checks of each backend (GET /health and GET /v1/models).",
    ),
    Variable(
        "GATEWAY_HEALTH_TIMEOUT_S",
        "3",
        "Seconds one health check may take before it counts as failed.",
    ),
    Variable(
        "GATEWAY_HEALTH_FALL",
        "3",
        "Consecutive failed checks that take a replica out of rotation.",
    ),
    Variable(
        "GATEWAY_HEALTH_RISE",
        "2",
        "Consecutive passed checks that bring a replica back "
        "(a backend seen for the first time joins on its first passed check).",
    ),
    Variable(
        "GATEWAY_MAX_BODY_BYTES",
        str(32 * MIB),
        "Largest request body accepted; larger ones get 413 before anything is sent upstream.",
    ),
    Variable(
        "GATEWAY_CONNECT_TIMEOUT_S",
        "5",
        "Seconds to open a TCP connection to a backend; past it the request fails with 504.",
    ),
    Variable(
        "GATEWAY_READ_TIMEOUT_S",
        "600",
        "Longest silence from a backend, waiting for the response headers or between two chunks. "
        "A non-streaming request is silent for its whole generation. There is no total timeout.",
    ),
    Variable(
        "GATEWAY_UPSTREAM_KEEPALIVE_S",
        "4",
        "Seconds an idle pooled connection to a backend is kept. Keep it below the backend's own "
        "keep-alive (uvicorn, which serves vLLM, closes idle connections after 5 s).",
    ),
    Variable("GATEWAY_LOG_LEVEL", "info", "One of " + ", ".join(LOG_LEVELS) + "."),
)

_KNOWN = frozenset(variable.name for variable in VARIABLES)


@dataclass(frozen=True)
class Settings:
    backends: tuple[Backend, ...]
    pinned: Mapping[str, tuple[Backend, ...]]
    host: str = "0.0.0.0"
    port: int = 8080
    health_interval_s: float = 5.0
    health_timeout_s: float = 3.0
    health_fall: int = 3
    health_rise: int = 2
    max_body_bytes: int = 32 * MIB
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0
    upstream_keepalive_s: float = 4.0
    log_level: str = "info"

    @property
    def all_backends(self) -> tuple[Backend, ...]:
        """Every distinct backend, discovered or pinned, in the order first configured."""
        seen: dict[str, Backend] = {backend.url: backend for backend in self.backends}
        for backends in self.pinned.values():
            for backend in backends:
                seen.setdefault(backend.url, backend)
        return tuple(seen.values())

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        problems: list[str] = []
        values: dict[str, str] = {v.name: environ.get(v.name, v.default) for v in VARIABLES}

        for name in sorted(environ):
            if name.startswith(PREFIX) and name not in _KNOWN:
                problems.append(f"{name}: unknown variable (see vllm-gateway --help)")

        def cast(name: str, parse: Callable[[str], Any]) -> Any:
            raw = values[name].strip()
            try:
                return parse(raw)
            except (ValueError, BackendError) as exc:
                problems.append(f"{name}={raw!r}: {exc}")
                return None

        backends = cast("GATEWAY_BACKENDS", parse_backend_list)
        pinned = cast("GATEWAY_MODELS", parse_model_routes)
        if backends == () and pinned == {}:
            problems.append(
                "no backend configured: set GATEWAY_BACKENDS to your vLLM servers' base URLs, "
                "e.g. GATEWAY_BACKENDS=http://127.0.0.1:8000,http://127.0.0.1:8001"
            )
        fields: dict[str, Any] = {
            "backends": backends,
            "pinned": pinned,
            "host": cast("GATEWAY_HOST", _host),
            "port": cast("GATEWAY_PORT", _port),
            "health_interval_s": cast("GATEWAY_HEALTH_INTERVAL_S", _positive_seconds),
            "health_timeout_s": cast("GATEWAY_HEALTH_TIMEOUT_S", _positive_seconds),
            "health_fall": cast("GATEWAY_HEALTH_FALL", _positive_int),
            "health_rise": cast("GATEWAY_HEALTH_RISE", _positive_int),
            "max_body_bytes": cast("GATEWAY_MAX_BODY_BYTES", _positive_int),
            "connect_timeout_s": cast("GATEWAY_CONNECT_TIMEOUT_S", _positive_seconds),
            "read_timeout_s": cast("GATEWAY_READ_TIMEOUT_S", _positive_seconds),
            "upstream_keepalive_s": cast("GATEWAY_UPSTREAM_KEEPALIVE_S", _positive_seconds),
            "log_level": cast("GATEWAY_LOG_LEVEL", _log_level),
        }
        if problems:
            raise SettingsError(problems)
        return cls(**fields)


def help_text() -> str:
    lines = [
        "usage: vllm-gateway [--help] [--version]",
        "",
        "One OpenAI-compatible endpoint in front of many vLLM servers.",
        "Configured by environment variables:",
        "",
    ]
    for variable in VARIABLES:
        default = variable.default or "(unset)"
        lines.append(f"  {variable.name}  [default: {default}]")
        lines.extend(
            textwrap.wrap(variable.meaning, 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
        )
    return "\n".join(lines)


def _host(raw: str) -> str:
    if not raw:
        raise ValueError("must not be empty")
    return raw


def _port(raw: str) -> int:
    port = _positive_int(raw)
    if port > 65535:
        raise ValueError("must be a port number, 1 to 65535")
    return port


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError("must be a whole number") from None
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _positive_seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive number of seconds")
    return value


def _log_level(raw: str) -> str:
    level = raw.lower()
    if level not in LOG_LEVELS:
        raise ValueError("must be one of " + ", ".join(LOG_LEVELS))
    return level
