"""The log format, set up the same way by the command and by each of its worker processes."""

from __future__ import annotations

import logging


def configure_logging(level: str, *, with_pid: bool) -> None:
    """Log to stderr at `level`; `with_pid` tags each line with the process that wrote it.

    With several workers their lines interleave on one stderr: the pid says whose each one is.
    """
    origin = "%(name)s[%(process)d]" if with_pid else "%(name)s"
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {origin}: %(message)s",
    )
