"""`wbc` command line: thin wrappers over library functions (each command module registers itself)."""

from __future__ import annotations

import sys

import click

# Importing the modules registers their commands on `app`.
from wbc.cli import evaluate, extract, heads, prepare, robustness, train  # noqa: F401
from wbc.cli import interpolate as _interpolate  # noqa: F401
from wbc.cli.app import app
from wbc.errors import WbcError
from wbc.log import console, setup_logging


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes print one line and exit 2; never a traceback for them."""
    setup_logging()
    try:
        rc = app(args=argv, standalone_mode=False)
    except WbcError as e:
        console.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)  # one line, also in logs
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        rc = 130
    # Outside standalone mode typer returns Exit(130) for Ctrl-C instead of raising it.
    if rc == 130:
        console.print("interrupted: completed work is kept; rerun the same command to resume")
    if isinstance(rc, int) and rc:
        sys.exit(rc)
