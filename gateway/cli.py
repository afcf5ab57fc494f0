"""The `vllm-gateway` command: settings from the environment, then serve on uvloop."""

from __future__ import annotations

import logging
import os
import resource
import sys
from collections.abc import Mapping, Sequence

import uvloop

from gateway import __version__
from gateway.logs import configure_logging
from gateway.server import serve
from gateway.settings import Settings, SettingsError, help_text
from gateway.workers import supervise


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in args):
        print(help_text())
        return 0
    if "--version" in args:
        print(f"vllm-gateway {__version__}")
        return 0
    if args:
        print(
            f"vllm-gateway: unexpected arguments {args}; it is configured by GATEWAY_* "
            "environment variables (see --help)",
            file=sys.stderr,
        )
        return 2
    try:
        settings = Settings.from_environ(os.environ if environ is None else environ)
    except SettingsError as exc:
        print(f"vllm-gateway: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, with_pid=settings.workers > 1)
    logging.getLogger("gateway").info(
        "vllm-gateway %s on %s:%d, %d backends, %d %s, server %s",
        __version__,
        settings.host,
        settings.port,
        len(settings.all_backends),
        settings.workers,
        "worker" if settings.workers == 1 else "workers",
        settings.server,
    )
    # Before any worker starts: they inherit the limit.
    _raise_open_file_limit()
    if settings.workers > 1:
        return supervise(settings)
    uvloop.run(serve(settings))
    return 0


def _raise_open_file_limit() -> None:
    # Each open stream holds two sockets (client and backend); the common soft limit of
    # 1024 would cap the gateway near 500 streams. Raise it to the hard limit, as nginx's
    # worker_rlimit_nofile does.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            logging.getLogger("gateway").warning("could not raise the open-file limit")
