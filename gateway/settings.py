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
from importlib.util import find_spec
from typing import Any

from gateway.backends import Backend, BackendError, parse_backend_list, parse_model_routes
from gateway.prefix_index import ENTRY_BYTES
from gateway.routing import MISS_POLICIES, ROUTING_POLICIES

PREFIX = "GATEWAY_"
MIB = 1024 * 1024
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
SERVERS = ("hypercorn", "uvicorn")
# What each server needs beyond the gateway's own dependencies.
_SERVER_MODULES = {"hypercorn": (), "uvicorn": ("uvicorn", "httptools")}
LOG_FORMATS = ("text", "json")


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
        "servers listing the same id are replicas of that model. An http:// host name stands "
        "for every address it resolves to (a headless Kubernetes Service), re-resolved every "
        "health interval.",
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
        "GATEWAY_WORKERS",
        "1",
        "Worker processes serving the port, for a container with several cores: one per core "
        "it may use. Each is a whole gateway with its own health checks and its own "
        "round-robin. 1: a single process, no supervisor.",
    ),
    Variable(
        "GATEWAY_SERVER",
        "hypercorn",
        "The HTTP server: hypercorn (HTTP/1.1 and HTTP/2), or uvicorn (HTTP/1.1 only, with "
        "httptools: about half hypercorn's CPU per request and per streamed event; install "
        "'vllm-gateway[uvicorn]', the Docker image has it).",
    ),
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
        "GATEWAY_HEADERS_TIMEOUT_S",
        "600",
        "Seconds a backend may take to send its response headers, across all retries. "
        "vLLM sends a stream's headers at once but a non-streaming answer's only when the "
        "whole generation is done: raise this for long non-streaming generations.",
    ),
    Variable(
        "GATEWAY_IDLE_TIMEOUT_S",
        "300",
        "Longest silence between two chunks of a response once its headers are in (a long "
        "prefill before the first token counts). There is no total timeout.",
    ),
    Variable(
        "GATEWAY_BODY_TIMEOUT_S",
        "30",
        "Seconds a client may take to send its request body; past it, 408.",
    ),
    Variable(
        "GATEWAY_RETRIES",
        "2",
        "Retries of a request on another replica, only before anything was sent to the "
        "client: on connection refused or reset, connect timeout, a pooled connection closed "
        "by the backend, or a 502/503/504 answer. Never on a 4xx, never mid-stream.",
    ),
    Variable(
        "GATEWAY_EJECT_FAILURES",
        "5",
        "Consecutive failed requests (connect errors, resets, 5xx) that eject a replica "
        "from rotation before its health checks notice.",
    ),
    Variable(
        "GATEWAY_EJECT_BASE_S",
        "30",
        "Seconds of the first ejection; each further ejection of the same replica lasts this "
        "much longer. Afterwards one request probes it.",
    ),
    Variable("GATEWAY_EJECT_MAX_S", "300", "Longest ejection, in seconds."),
    Variable(
        "GATEWAY_ROUTING",
        "round_robin",
        "How a request picks among a model's replicas: round_robin (each in turn), "
        "least_loaded (fewest of this gateway's requests in flight, ties in turn) or prefix "
        "(the replica that already holds the longest prefix of the prompt in its cache, "
        "within a load bound; see Routing).",
    ),
    Variable(
        "GATEWAY_PREFIX_INDEX_ENTRIES",
        "160000",
        f"With GATEWAY_ROUTING=prefix: prompt blocks remembered (the least recently used "
        f"forgotten first), all models together. At the default an entry costs "
        f"{ENTRY_BYTES} bytes, about {round(160000 * ENTRY_BYTES / MIB)} MiB in all.",
    ),
    Variable(
        "GATEWAY_PREFIX_LOAD_FACTOR",
        "1.5",
        "With GATEWAY_ROUTING=prefix: the load bound c. A replica takes a request for the "
        "prefix it holds only while its requests in flight, this one included, stay within "
        "c x (the model's average in flight, this one included, + 1); past it, the "
        "least-loaded replica takes it. At least 1.",
    ),
    Variable(
        "GATEWAY_PREFIX_BLOCK_BYTES",
        "256",
        "With GATEWAY_ROUTING=prefix: the prompt is hashed in blocks of the request body, "
        "the first 16 of this many bytes (about 64 tokens of English), each further 16 twice "
        "as long as the 16 before; 64 to 65536.",
    ),
    Variable(
        "GATEWAY_PREFIX_MISS",
        "auto",
        "With GATEWAY_ROUTING=prefix: where a prompt goes whose prefix tells no replica apart "
        "(a new conversation): least_loaded (the most even balance, right for one gateway "
        "process) or hash (rendezvous hashing on the prompt up to where it stops being "
        "shared, so every gateway process sends a conversation to the same replica). auto: "
        "hash with GATEWAY_WORKERS above 1, else least_loaded; set hash when several gateway "
        "pods route the same replicas. Within the load bound either way.",
    ),
    Variable(
        "GATEWAY_MAX_CONCURRENCY",
        "0",
        "Requests forwarded at once by this gateway; past it, 429 at once. 0: no cap.",
    ),
    Variable(
        "GATEWAY_DRAIN_TIMEOUT_S",
        "30",
        "On SIGTERM: /ready turns 503 and new requests get 503 at once, and streams in "
        "flight get this many seconds to finish before the gateway exits.",
    ),
    Variable(
        "GATEWAY_API_KEYS",
        "",
        "Keys clients must send as 'Authorization: Bearer KEY' on every route but /health and "
        "/ready: comma-separated, or the path of a file with one key a line. Unset: no auth.",
    ),
    Variable(
        "GATEWAY_BACKEND_API_KEY",
        "",
        "Key sent to the vLLM servers (started with --api-key). The client's own "
        "Authorization header is never forwarded.",
    ),
    Variable(
        "GATEWAY_KEEPALIVE_S",
        "5",
        "Seconds an idle client connection is kept open for its next request. Whatever pools "
        "connections to the gateway (a load balancer, an ingress, a client library) must "
        "drop them sooner, or a request sent as the gateway closes one fails: raise this "
        "above their idle timeout (AWS ALB and ingress-nginx keep 60 s). Under hypercorn the "
        "same timer bounds the time a request's headers may take to arrive (slowloris); "
        "under uvicorn that stays 5 s.",
    ),
    Variable(
        "GATEWAY_UPSTREAM_KEEPALIVE_S",
        "4",
        "Seconds an idle pooled connection to a backend is kept. Keep it below the backend's own "
        "keep-alive (uvicorn, which serves vLLM, closes idle connections after 5 s).",
    ),
    Variable(
        "GATEWAY_STARTUP_WINDOW_S",
        "1200",
        "Seconds after startup during which an unknown model answers 503 (not yet) rather "
        "than 404 while some backend has never answered: a large model can take many minutes "
        "to load. Past it, unknown models answer 404 and the log names the backends that "
        "never came up.",
    ),
    Variable("GATEWAY_LOG_LEVEL", "info", "One of " + ", ".join(LOG_LEVELS) + "."),
    Variable(
        "GATEWAY_LOG_FORMAT",
        "text",
        "One of text, json: the format of every log line, the access log's included.",
    ),
    Variable(
        "GATEWAY_ACCESS_LOG",
        "on",
        "on or off: one line per proxied request, written when it ends (a stream cut off by "
        "its client or its backend included).",
    ),
    Variable(
        "GATEWAY_METRICS_DIR",
        "",
        "With GATEWAY_WORKERS above 1: the directory where workers share their metrics, "
        "emptied at startup (in Kubernetes, an in-memory emptyDir). Unset: a fresh directory "
        "under the system's temporary directory.",
    ),
)

_KNOWN = frozenset(variable.name for variable in VARIABLES)
# Never echoed back in an error message: it would land in the logs.
_SECRET = frozenset({"GATEWAY_API_KEYS", "GATEWAY_BACKEND_API_KEY"})


@dataclass(frozen=True)
class Settings:
    backends: tuple[Backend, ...]
    pinned: Mapping[str, tuple[Backend, ...]]
    host: str = "0.0.0.0"
    port: int = 8080
    workers: int = 1
    server: str = "hypercorn"
    health_interval_s: float = 5.0
    health_timeout_s: float = 3.0
    health_fall: int = 3
    health_rise: int = 2
    max_body_bytes: int = 32 * MIB
    connect_timeout_s: float = 5.0
    headers_timeout_s: float = 600.0
    idle_timeout_s: float = 300.0
    body_timeout_s: float = 30.0
    retries: int = 2
    eject_failures: int = 5
    eject_base_s: float = 30.0
    eject_max_s: float = 300.0
    routing: str = "round_robin"
    prefix_index_entries: int = 160000
    prefix_load_factor: float = 1.5
    prefix_block_bytes: int = 256
    prefix_miss: str = "auto"
    max_concurrency: int = 0
    drain_timeout_s: float = 30.0
    api_keys: frozenset[str] = frozenset()
    backend_api_key: str = ""
    keepalive_s: float = 5.0
    upstream_keepalive_s: float = 4.0
    startup_window_s: float = 1200.0
    log_level: str = "info"
    log_format: str = "text"
    access_log: bool = True
    metrics_dir: str = ""

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
                shown = name if name in _SECRET else f"{name}={raw!r}"
                problems.append(f"{shown}: {exc}")
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
            "workers": cast("GATEWAY_WORKERS", _positive_int),
            "server": cast("GATEWAY_SERVER", _server),
            "health_interval_s": cast("GATEWAY_HEALTH_INTERVAL_S", _positive_seconds),
            "health_timeout_s": cast("GATEWAY_HEALTH_TIMEOUT_S", _positive_seconds),
            "health_fall": cast("GATEWAY_HEALTH_FALL", _positive_int),
            "health_rise": cast("GATEWAY_HEALTH_RISE", _positive_int),
            "max_body_bytes": cast("GATEWAY_MAX_BODY_BYTES", _positive_int),
            "connect_timeout_s": cast("GATEWAY_CONNECT_TIMEOUT_S", _positive_seconds),
            "headers_timeout_s": cast("GATEWAY_HEADERS_TIMEOUT_S", _positive_seconds),
            "idle_timeout_s": cast("GATEWAY_IDLE_TIMEOUT_S", _positive_seconds),
            "body_timeout_s": cast("GATEWAY_BODY_TIMEOUT_S", _positive_seconds),
            "retries": cast("GATEWAY_RETRIES", _whole),
            "eject_failures": cast("GATEWAY_EJECT_FAILURES", _positive_int),
            "eject_base_s": cast("GATEWAY_EJECT_BASE_S", _positive_seconds),
            "eject_max_s": cast("GATEWAY_EJECT_MAX_S", _positive_seconds),
            "routing": cast("GATEWAY_ROUTING", _one_of(ROUTING_POLICIES)),
            "prefix_index_entries": cast("GATEWAY_PREFIX_INDEX_ENTRIES", _positive_int),
            "prefix_load_factor": cast("GATEWAY_PREFIX_LOAD_FACTOR", _load_factor),
            "prefix_block_bytes": cast("GATEWAY_PREFIX_BLOCK_BYTES", _block_bytes),
            "prefix_miss": cast("GATEWAY_PREFIX_MISS", _one_of(MISS_POLICIES)),
            "max_concurrency": cast("GATEWAY_MAX_CONCURRENCY", _whole),
            "drain_timeout_s": cast("GATEWAY_DRAIN_TIMEOUT_S", _positive_seconds),
            "api_keys": cast("GATEWAY_API_KEYS", _api_keys),
            "backend_api_key": cast("GATEWAY_BACKEND_API_KEY", _header_value),
            "keepalive_s": cast("GATEWAY_KEEPALIVE_S", _positive_seconds),
            "upstream_keepalive_s": cast("GATEWAY_UPSTREAM_KEEPALIVE_S", _positive_seconds),
            "startup_window_s": cast("GATEWAY_STARTUP_WINDOW_S", _positive_seconds),
            "log_level": cast("GATEWAY_LOG_LEVEL", _one_of(LOG_LEVELS)),
            "log_format": cast("GATEWAY_LOG_FORMAT", _one_of(LOG_FORMATS)),
            "access_log": cast("GATEWAY_ACCESS_LOG", _on_off),
            "metrics_dir": values["GATEWAY_METRICS_DIR"].strip(),
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


def _whole(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError("must be a whole number") from None
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _header_value(raw: str) -> str:
    if any(ord(char) < 0x21 or ord(char) > 0x7E for char in raw):
        raise ValueError("must be printable ASCII without spaces")
    return raw


def _api_keys(raw: str) -> frozenset[str]:
    if not raw:
        return frozenset()
    if "/" in raw and "," not in raw:
        # A path: one key a line, as a mounted Kubernetes or Docker secret would be.
        try:
            with open(raw, encoding="utf-8") as file:
                lines = file.read().splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read the key file ({exc.strerror})") from None
        keys = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        if not keys:
            raise ValueError("the key file holds no key")
    else:
        keys = [key.strip() for key in raw.split(",") if key.strip()]
    for key in keys:
        _header_value(key)
    return frozenset(keys)


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


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    """A parser of one of `choices`, in any case."""

    def parse(raw: str) -> str:
        name = raw.lower()
        if name not in choices:
            raise ValueError("must be one of " + ", ".join(choices))
        return name

    return parse


def _server(raw: str) -> str:
    server = _one_of(SERVERS)(raw)
    if any(find_spec(module) is None for module in _SERVER_MODULES[server]):
        raise ValueError(f"{server} is not installed: pip install 'vllm-gateway[{server}]'")
    return server


def _load_factor(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("must be a number") from None
    if not math.isfinite(value) or value < 1:
        raise ValueError("must be a number of at least 1")
    return value


def _block_bytes(raw: str) -> int:
    value = _positive_int(raw)
    if not 64 <= value <= 65536:
        raise ValueError("must be 64 to 65536")
    return value


def _on_off(raw: str) -> bool:
    word = raw.lower()
    if word in ("on", "true", "1", "yes"):
        return True
    if word in ("off", "false", "0", "no"):
        return False
    raise ValueError("must be on or off")
