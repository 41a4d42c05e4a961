"""Typer options declared once as Annotated aliases and reused by every command."""

from pathlib import Path
from typing import Annotated

import typer

Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing complete output.")]
Seed = Annotated[int, typer.Option(help="Random seed (recorded in the output's config).")]
Device = Annotated[str, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output path.")]
Fold = Annotated[str, typer.Option(help="Validation fold index (0..K-1) or 'all'.")]
Workers = Annotated[int, typer.Option(help="DataLoader worker processes (0 = main process).")]
