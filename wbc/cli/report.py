"""`wbc report`: re-render an HTML report from what is on disk (thin wrapper over wbc.report_html)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wbc.cli.app import app
from wbc.cli.options import Device
from wbc.errors import WbcError
from wbc.log import console

GalleryOpt = Annotated[int, typer.Option(
    "--gallery", help="Cells per class in report.html's gallery (misclassified first; 0 = none).")]
SaliencyOpt = Annotated[bool, typer.Option(
    help="Grad-CAM overlay beside each gallery cell (one backbone pass over the gallery cells only).")]


def predictions_html(source: Path, csv_path: Path, out: Path | None = None) -> Path:
    """P.html beside P.csv, with true classes where the source CSV has a label column."""
    from wbc.engine.evaluate.predict import list_images
    from wbc.predict_report import render_predictions

    paths, labels = list_images(source)
    known = {str(p): y for p, y in zip(paths, labels) if y}
    return render_predictions(csv_path, out, labels=known, source=str(source))


@app.command()
def report(
    path: Annotated[Path, typer.Argument(
        help="An evaluate --out folder (report.json), a `wbc predict` CSV, or a Stage-1/cRT run folder "
             "(metrics.jsonl).", show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="HTML file (default: beside the input).")] = None,
    gallery: GalleryOpt = 8,
    saliency: SaliencyOpt = True,
    device: Device = "auto",
    source: Annotated[Path | None, typer.Option(
        help="With a predictions CSV: the folder or CSV given to `wbc predict` (its label column is shown).")] = None,
) -> None:
    """Re-render report.html (evaluation), P.html (predictions) or run.html (training curves) from disk."""
    from wbc.predict_report import render_predictions
    from wbc.report_html import render_report, render_run

    if path.is_dir() and (path / "report.json").is_file():
        html = render_report(path, gallery, saliency, device, out)
    elif path.is_file() and path.suffix.lower() == ".csv":
        html = predictions_html(source, path, out) if source else render_predictions(path, out)
    elif path.is_dir() and any(path.glob("**/metrics.jsonl")):
        html = render_run(path, out)
    else:
        raise WbcError(f"{path}: not an evaluate report folder (report.json), a predictions CSV or a run "
                       "folder with metrics.jsonl")
    console.print(f"open in a browser: {html}")
