"""Messages of the `videobert` commands through the standard `logging` module: the `videobert` logger, whose
records the commands print as plain lines on stdout, rank 0's only (other ranks': warnings and errors, prefixed
with the rank), at the level of `--log-level`."""
from __future__ import annotations

import logging
import os
import sys

LOGGER = logging.getLogger("videobert")
LEVELS = ("debug", "info", "warning", "error")


class RankFilter(logging.Filter):
    """Passes every record of rank 0 (env RANK), and the warnings and errors of other ranks prefixed "rank N: "."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether `record` is printed (other ranks' warnings get their rank in front)."""
        if self.rank == 0:
            return True
        if record.levelno < logging.WARNING:
            return False
        record.msg, record.args = f"rank {self.rank}: {record.getMessage()}", None
        return True


class _Stdout(logging.StreamHandler):
    """A handler writing to whatever sys.stdout is when a record comes (a redirected or captured one too)."""

    @property
    def stream(self):
        """The current sys.stdout."""
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass  # always the current sys.stdout


def configure_logging(level: str = "info") -> None:
    """Print the `videobert` logger's records at `level` and above as plain lines on stdout (see `RankFilter`);
    calling it again replaces the previous set-up."""
    handler = _Stdout()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(RankFilter(int(os.environ.get("RANK", "0"))))
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level.upper())
    LOGGER.propagate = False
