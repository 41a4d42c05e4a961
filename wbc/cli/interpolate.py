"""`wbc interpolate`: WiSE-FT weight-space ensembles of a Stage-1 checkpoint (wbc.engine.stage1.interpolate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wbc.cli.app import app
from wbc.cli.options import Overwrite
from wbc.log import console


@app.command("interpolate")
def interpolate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Fine-tuned Stage-1 best.pt.")],
    alpha: Annotated[list[float], typer.Option("--alpha", help="Weight of the fine-tuned model, 0..1 (repeatable): 0 = pretrained backbone, 1 = the checkpoint.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Writes OUT/alpha-A/fold{K}/best.pt per alpha.")],
    pretrained: Annotated[str | None, typer.Option(help="Pretrained weights to interpolate towards (hub, package or a file); default: the run's own.")] = None,
    recalibrate_bn: Annotated[bool, typer.Option("--recalibrate-bn", help="Re-estimate BatchNorm statistics on the fold's training images after interpolating (recommended before `wbc adapt`).")] = False,
    store: Annotated[Path | None, typer.Option(help="Training store for --recalibrate-bn; default: the one the checkpoint records.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Interpolate a fine-tuned backbone's weights with its pretrained ones (WiSE-FT): keeps what ImageNet knew."""
    from wbc.engine.stage1.interpolate import interpolate

    for path in interpolate(checkpoint, alpha, out, pretrained=pretrained, overwrite=overwrite,
                            recalibrate_bn=recalibrate_bn, store=store):
        console.print(str(path))
