"""Typer options declared once as Annotated aliases and reused by every command."""

from pathlib import Path
from typing import Annotated

import typer

Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing complete output.")]
Seed = Annotated[int, typer.Option(help="Random seed (recorded in the output's config).")]
Device = Annotated[str, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output path.")]
Fold = Annotated[str, typer.Option(help="Validation fold index (0..K-1), a comma list such as 0,1, or 'all'.")]
Workers = Annotated[int, typer.Option(help="DataLoader worker processes (0 = main process).")]
LabelMapOption = Annotated[
    str | None,
    typer.Option(
        "--label-map",
        help="Map model classes to an external set's labels: MODEL=SET,... (e.g. SNE=NE,BNE=NE) "
        "or a .yaml/.csv file; classes with the same name map to each other.",
    ),
]
Degradations = Annotated[
    list[str] | None,
    typer.Option(
        "--degradation",
        help="Degradation to apply (repeatable): gaussian_noise, gaussian_blur, illumination, "
        "jpeg, stain_jitter, none. Default: all.",
    ),
]
ZoomOpt = Annotated[str | None, typer.Option(
    help="Rescale each image's content within its frame before the store's resize, to match the training "
    "cells' scale (another camera or tighter crops): 0.6 = cells 0.6x as wide, padded with the background; "
    "'auto' estimates it from the images without labels. Default: an adapted file's zoom, else 1.")]
