"""The typer application; command modules register on it (see wbc/cli/__init__.py)."""

from typing import Annotated

import typer

import wbc

app = typer.Typer(
    name="wbc",
    help="White blood cell classification: prepare -> split -> train -> extract -> crt -> evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cache_app = typer.Typer(help="Inspect Zarr feature caches.", no_args_is_help=True)
ensemble_app = typer.Typer(help="Save and inspect ensembles for `wbc predict`.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(ensemble_app, name="ensemble")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"wbc {wbc.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the wbc version and exit.")] = False,
) -> None:
    """White blood cell classification: prepare -> split -> train -> extract -> crt -> evaluate."""
