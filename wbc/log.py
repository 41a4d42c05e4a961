"""Logging and progress bars: library code logs through `logging`; rich renders both."""

from __future__ import annotations

import logging
import os

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# stderr keeps stdout clean for tables and machine-readable output.
console = Console(stderr=True)


def setup_logging(level: str | int = "INFO") -> None:
    """Configure the root `wbc` logger once (idempotent)."""
    logger = logging.getLogger("wbc")
    if any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.setLevel(level)
        return
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


class _Progress(Progress):
    """Progress whose tasks always have the `info` field the columns render (a task added without
    it raised KeyError at the first refresh, and only where bars are shown: never in tests)."""

    def add_task(self, description, *args, info: str = "", **fields):
        return super().add_task(description, *args, info=info, **fields)


def progress(transient: bool = False) -> Progress:
    """A rich progress bar; silent when WBC_NO_PROGRESS is set (tests, CI logs)."""
    disable = bool(os.environ.get("WBC_NO_PROGRESS"))
    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=disable,
    )
