"""`wbc evaluate`, `wbc predict`, `wbc ensemble save`: thin wrappers over wbc.engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wbc.cli.app import app, ensemble_app
from wbc.cli.options import Device, LabelMapOption, Out, ZoomOpt
from wbc.cli.report import GalleryOpt, SaliencyOpt
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


def parse_model(text: str, folds: list[int]):
    from wbc.engine.evaluate.table1 import ModelSpec

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
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Report directory (default reports/table1; reports/external with --external).")] = None,
    calibrate: Annotated[bool, typer.Option(help="Fit a temperature per member on its validation fold.")] = False,
    title: Annotated[str | None, typer.Option(help="Report title.")] = None,
    ensembles: Annotated[bool, typer.Option(help="Add pairwise and all-model ensemble rows.")] = True,
    ensemble: Annotated[Path | None, typer.Option(
        help="ENSEMBLE.yaml (`wbc ensemble save`) or ADAPTED.yaml (`wbc adapt`), with --external.")] = None,
    external: Annotated[Path | None, typer.Option(
        help="Labelled set from elsewhere: CSV with image,label columns or a folder of class folders; "
        "classified through the full predict path of --ensemble.")] = None,
    label_map: LabelMapOption = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch (with --external).")] = 32,
    zoom: ZoomOpt = None,
    device: Device = "auto",
    ablation: Annotated[Path | None, typer.Option(
        help="A `wbc ablate` output folder: report.html draws its grid as a heat map.")] = None,
    gallery: GalleryOpt = 8,
    saliency: SaliencyOpt = True,
) -> None:
    """Table 1 on the held-out test (supervised, decoupled and ensemble rows, mean +- std over folds),
    or with --external an ensemble scored on a labelled set from elsewhere."""
    from wbc.fsutil import check_writable

    is_external = external is not None or ensemble is not None
    out = out or Path("reports/external" if is_external else "reports/table1")
    check_writable(out, "report directory")  # before scoring, not after
    if is_external:
        if model:
            raise WbcError("--model scores cached features, --external an --ensemble's images: give one or the other")
        _external(ensemble, external, label_map, out, batch_size, device, title, zoom)
        return
    from wbc.engine.evaluate.table1 import evaluate_table
    from wbc.report.rows import rich_table
    from wbc.report.table1 import class_counts_line, write_report
    from wbc.report_html import render_report, report_sources

    title = title or "Held-out test"
    if model is None:
        model = []
    from wbc.folds import parse_fold_list

    fold_list = parse_fold_list(folds, "--folds")
    models = [parse_model(m, fold_list) for m in model]
    if ablation is not None and not (ablation / "ablate.csv").is_file():
        raise WbcError(f"--ablation {ablation}: no ablate.csv there (give a `wbc ablate --out` folder)")
    rows, classes = evaluate_table(models, fold_list, calibrate=calibrate, ensembles=ensembles)
    sources = {**report_sources(models, fold_list), "ablation": str(ablation.resolve()) if ablation else None}
    paths = write_report(rows, classes, out, title,
                         extra={"folds": fold_list, "calibrated": calibrate, "sources": sources})
    console.print(rich_table(rows, title))
    console.print(f"held-out test: {rows[0].folds[0]['n']} cells; {class_counts_line(rows[0], classes)}")
    html = render_report(out, gallery, saliency, device)
    console.print(f"report: {paths['md']}  json: {paths['json']}  confusion: {paths['png']}")
    console.print(f"open in a browser: {html}")


def _external(ensemble, external, label_map, out, batch_size, device, title, zoom) -> None:
    from wbc.engine.evaluate.external import evaluate_external
    from wbc.report.external import rich_rows

    if ensemble is None or external is None:
        raise WbcError("external evaluation needs both --ensemble ENSEMBLE.yaml and --external MANIFEST")
    res = evaluate_external(ensemble, external, out, label_map, batch_size=batch_size, device=device,
                            title=title, zoom=zoom)
    console.print(rich_rows(res.rows, f"{external} ({res.rows[-1].folds[0]['n']} images scored)"))
    lm = res.label_map
    console.print(f"model classes with no counterpart: {', '.join(lm.unmapped_model) or 'none'}; "
                  f"set labels the model cannot produce: {', '.join(lm.unscorable) or 'none'}")
    if res.failed:
        console.print(f"[yellow]{len(res.failed)} images could not be read; listed in {res.paths['failed']}[/]")
    console.print(f"report: {res.paths['md']}  json: {res.paths['json']}  confusion: {res.paths['png']}")
    from wbc.report_html import render_report

    console.print(f"open in a browser: {render_report(out, 0, False, device)}")


@ensemble_app.command("save")
def ensemble_save(
    member: Annotated[list[str], typer.Option("--member", help="CHECKPOINT[:HEAD], repeatable.")],
    store: Annotated[Path, typer.Option(help="Image store whose stain template the members were trained on.")],
    views: Annotated[str, typer.Option(help="View set name or comma-separated view names.")] = "d4",
    out: Out = Path("ensemble.yaml"),
    cache: Annotated[list[Path] | None, typer.Option(
        "--cache", help="The member's feature cache, once per --member in the same order "
        "(optional; `wbc robustness` needs it).")] = None,
) -> None:
    """Write ENSEMBLE.yaml (checkpoints, heads, stain template, class names, views) for `wbc predict`."""
    from wbc.ensemble import save_ensemble
    from wbc.fsutil import check_writable

    check_writable(out, "ensemble file")
    path = save_ensemble(member, store, views, out, caches=cache or None)
    console.print(f"ensemble written: {path}")


@app.command()
def predict(
    images: Annotated[Path, typer.Argument(help="Folder of images (searched recursively) or CSV with an 'image' column.")],
    ensemble: Annotated[Path, typer.Option(help="ENSEMBLE.yaml from `wbc ensemble save`, or ADAPTED.yaml "
                                           "from `wbc adapt`.")],
    out: Out = Path("predictions.csv"),
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    zoom: ZoomOpt = None,
    device: Device = "auto",
) -> None:
    """Classify new cells with the full path: stain template, resize/crop, K views, members, averaging."""
    from wbc.cli.report import predictions_html
    from wbc.engine.evaluate.predict import predict as run_predict

    result = run_predict(images, ensemble, out, batch_size=batch_size, device=device, zoom=zoom)
    console.print(f"{result.n_ok} images classified -> {result.out}")
    console.print(f"open in a browser: {predictions_html(images, result.out)}")
    if result.failed:
        console.print(f"[yellow]{len(result.failed)} images could not be read; listed in {result.failed_path}[/]")
