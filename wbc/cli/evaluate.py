"""`wbc evaluate`, `wbc predict`, `wbc ensemble save`: thin wrappers over wbc.engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wbc.cli.app import app, ensemble_app
from wbc.cli.options import Device, Out
from wbc.errors import WbcError
from wbc.log import console

ModelOpt = Annotated[
    list[str],
    typer.Option(
        "--model",
        "-m",
        help="NAME:CACHE[:HEAD], repeatable; '{fold}' in paths is replaced by each fold index. "
        "Without HEAD only the Supervised row (Stage-1 logits) is scored.",
    ),
]


def parse_folds(text: str) -> list[int]:
    try:
        folds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise WbcError(f"--folds must be comma-separated integers, got {text!r}") from None
    if not folds:
        raise WbcError("--folds is empty")
    return folds


def parse_model(text: str, folds: list[int]):
    from wbc.engine.evaluate import ModelSpec

    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise WbcError(f"--model {text!r}: expected NAME:CACHE or NAME:CACHE:HEAD")
    name, cache, head = parts[0], parts[1], parts[2] if len(parts) == 3 else None
    caches = tuple(Path(cache.replace("{fold}", str(k))) for k in folds)
    heads = tuple(Path(head.replace("{fold}", str(k))) for k in folds) if head else ()
    return ModelSpec(name, caches, heads)


@app.command()
def evaluate(
    model: ModelOpt = None,
    folds: Annotated[str, typer.Option(help="Fold indices, e.g. 0,1,2,3,4.")] = "0,1,2,3,4",
    out: Out = Path("reports/table1"),
    calibrate: Annotated[bool, typer.Option(help="Fit a temperature per member on its validation fold.")] = False,
    title: Annotated[str, typer.Option(help="Report title.")] = "Held-out test",
    ensembles: Annotated[bool, typer.Option(help="Add pairwise and all-model ensemble rows.")] = True,
) -> None:
    """Table 1 on the held-out test: supervised, decoupled and ensemble rows, mean +- std over folds."""
    from wbc.engine.evaluate import evaluate_table
    from wbc.report import rich_table, write_report

    if model is None:
        model = []
    fold_list = parse_folds(folds)
    models = [parse_model(m, fold_list) for m in model]
    rows, classes = evaluate_table(models, fold_list, calibrate=calibrate, ensembles=ensembles)
    paths = write_report(rows, classes, out, title, extra={"folds": fold_list, "calibrated": calibrate})
    console.print(rich_table(rows, title))
    console.print(f"report: {paths['md']}  json: {paths['json']}  confusion: {paths['png']}")


@ensemble_app.command("save")
def ensemble_save(
    member: Annotated[list[str], typer.Option("--member", help="CHECKPOINT[:HEAD], repeatable.")],
    store: Annotated[Path, typer.Option(help="Image store whose stain template the members were trained on.")],
    views: Annotated[str, typer.Option(help="View set name or comma-separated view names.")] = "d4",
    out: Out = Path("ensemble.yaml"),
) -> None:
    """Write ENSEMBLE.yaml (checkpoints, heads, stain template, class names, views) for `wbc predict`."""
    from wbc.engine.predict import save_ensemble

    path = save_ensemble(member, store, views, out)
    console.print(f"ensemble written: {path}")


@app.command()
def predict(
    images: Annotated[Path, typer.Argument(help="Folder of images (searched recursively) or CSV with an 'image' column.")],
    ensemble: Annotated[Path, typer.Option(help="ENSEMBLE.yaml from `wbc ensemble save`.")],
    out: Out = Path("predictions.csv"),
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    device: Device = "auto",
) -> None:
    """Classify new cells with the full path: stain template, resize/crop, K views, members, averaging."""
    from wbc.engine.predict import predict as run_predict

    result = run_predict(images, ensemble, out, batch_size=batch_size, device=device)
    console.print(f"{result.n_ok} images classified -> {result.out}")
    if result.failed:
        console.print(f"[yellow]{len(result.failed)} images could not be read; listed in {result.failed_path}[/]")
