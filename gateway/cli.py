"""The `vllm-gateway` command: settings from the environment, then serve on uvloop."""

from __future__ import annotations

import logging
import os
import resource
import sys
from collections.abc import Mapping, Sequence

import uvloop

from gateway import __version__
from gateway.logs import LineWriter, configure_logging
from gateway.server import serve
from gateway.settings import Settings, SettingsError, help_text
from gateway.workers import supervise


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["plan"]:
        # Imported here: the planner shares nothing with the server.
        from gateway.plan.command import main as plan

        return plan(args[1:], environ)
    if any(arg in ("-h", "--help") for arg in args):
        print(help_text())
        print("\nSubcommand: vllm-gateway plan --help: how to set --gpu-memory-utilization")
        print("when several vLLM servers share GPUs.")
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
    # The supervisor of several workers serves nothing: it logs straight to stderr.
    writer = LineWriter() if settings.workers == 1 else None
    configure_logging(
        settings.log_level,
        with_pid=settings.workers > 1,
        form=settings.log_format,
        writer=writer,
    )
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
    if writer is None:
        return supervise(settings)
    try:
        uvloop.run(serve(settings, writer=writer))
    finally:
        writer.close()
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
