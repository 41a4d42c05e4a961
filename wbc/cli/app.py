"""The typer application; command modules register on it (see wbc/cli/__init__.py)."""

import typer

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
