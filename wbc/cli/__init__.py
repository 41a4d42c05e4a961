"""`wbc` command line: thin wrappers over library functions (each command module registers itself)."""

from __future__ import annotations

import importlib
import sys

import typer

# Importing the modules registers their commands on `app`.
from wbc.cli import adapt, evaluate, extract, heads, prepare, robustness, train  # noqa: F401
from wbc.cli import interpolate as _interpolate  # noqa: F401  (wbc interpolate)
from wbc.cli import report as _report  # noqa: F401  (wbc report)
from wbc.cli.app import app
from wbc.errors import WbcError
from wbc.log import console, setup_logging


def _click_types(name: str) -> tuple[type, ...]:
    """`name` from typer's vendored click (typer >= 0.29) and from click itself (older typer)."""
    found = []
    for mod in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_USAGE = _click_types("ClickException")
_EXIT = (typer.Exit, *_click_types("Exit"))
_ABORT = (typer.Abort, KeyboardInterrupt, *_click_types("Abort"))
_HELP = _click_types("NoArgsIsHelpError")


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {' '.join(message.split())}", markup=True, highlight=False,
                  soft_wrap=True)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user, usage and file-system errors print one line and exit 2 (never a
    traceback); Ctrl-C exits 130 with completed work kept."""
    setup_logging()
    try:
        rc = app(args=argv, standalone_mode=False, prog_name="wbc")
    except WbcError as e:
        _fail(str(e))  # one line (soft-wrapped), also in logs
    except _EXIT as e:
        sys.exit(e.exit_code)
    except _ABORT:
        rc = 130
    except _HELP as e:  # `wbc` or `wbc cache` alone: the help is what was asked for
        console.print(e.format_message(), markup=False, highlight=False)
        sys.exit(0)
    except _USAGE as e:
        where = e.ctx.command_path if getattr(e, "ctx", None) is not None else "wbc"
        _fail(f"{e.format_message()} (see `{where} --help`)")
    except OSError as e:  # a path the user gave: missing, unreadable, read-only, disk full
        what = f"{e.filename}: " if e.filename else ""
        _fail(f"{what}{e.strerror or e}")
    # Outside standalone mode typer returns Exit(130) for Ctrl-C instead of raising it.
    if rc == 130:
        console.print("interrupted: completed work is kept; rerun the same command to resume")
    if isinstance(rc, int) and rc:
        sys.exit(rc)
