"""`wbc extract` and `wbc cache info`: thin wrappers over wbc.engine.extract.run and wbc.cache."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from wbc.cli.app import app, cache_app
from wbc.cli.options import Device, Out, Overwrite
from wbc.engine.extract.config import ExtractConfig
from wbc.log import console

_E = ExtractConfig()  # defaults come from the config, so the CLI never disagrees with the library


@app.command("extract")
def extract_cmd(
    source: Annotated[Path, typer.Argument(help="Stage-1 best.pt, its fold directory, or a run with one fold.")],
    store: Annotated[Path, typer.Option("--store", help="HDF5 image store; every row is embedded.")],
    out: Out,
    views: Annotated[str, typer.Option(help="View set (d4, rotations, flips, identity) or comma-separated views.")] = _E.views,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass, each x K views (0 = 32 GPU / 8 CPU).")] = _E.batch_size,
    workers: Annotated[int, typer.Option(help="Loader worker processes (-1 = auto: 0 on CPU, 8 on GPU).")] = _E.workers,
    device: Device = _E.device,
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA.")] = _E.amp,
    chunk_rows: Annotated[int, typer.Option(help="Rows per cache chunk (0 = ~4 MiB of features).")] = _E.chunk_rows,
    overwrite: Overwrite = _E.overwrite,
    other_store: Annotated[bool, typer.Option("--other-store", help="Allow a store the checkpoint was not trained on (external test set).")] = _E.other_store,
) -> None:
    """Embed every image of a store with a frozen Stage-1 backbone under K test-time views (Zarr cache)."""
    cfg = ExtractConfig(views=views, batch_size=batch_size, workers=workers, device=device, amp=amp,
                        chunk_rows=chunk_rows, overwrite=overwrite, other_store=other_store)
    from wbc.engine.extract.run import extract  # torch: after the options are checked

    s = extract(source, store, out, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        t = s["timings"]
        console.print(f"{s['path']}: {s['rows']} images x {len(s['views'])} views, dim {s['dim']}; "
                      f"{s['blocks_written']} of {s['blocks']} row blocks written now; "
                      f"{t['images_per_s']:.1f} images/s ({t['views_per_s']:.1f} views/s)")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@cache_app.command("info")
def info_cmd(
    path: Annotated[Path, typer.Argument(help="Feature cache (.zarr directory).")],
    group: Annotated[str | None, typer.Option(help="A named variant group (degraded images).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Shapes, views, provenance, completeness and size on disk of a feature cache."""
    from wbc.cache import cache_info

    info = cache_info(path, group)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    table = Table(title=str(path) + (f" [{group}]" if group else ""), show_header=False)
    done = f"{info['blocks_done']} of {info['blocks']} row blocks"
    rows = {
        "complete": "yes" if info["complete"] else f"NO ({done}; rerun `wbc extract` to resume)",
        "features": f"{info['shapes']['features']} float16, chunks {info['chunks']}",
        "stage1_logits": str(info["shapes"]["stage1_logits"]),
        "rows by fold": ", ".join(f"{k}: {v}" for k, v in info["rows_by_fold"].items()),
        "views": ", ".join(info["views"] or []),
        "classes": ", ".join(info["class_names"] or []),
        "backbone": str(info["backbone"]),
        "checkpoint sha256": str(info["checkpoint_sha256"]),
        "store content id": str(info["store_content_id"]),
        "image transform": str(info["image_transform"] or "none"),
        "wbc version": str(info["wbc_version"]),
        "timings": json.dumps(info["timings"]) if info["timings"] else "-",
        "size on disk": _human(info["size_bytes"]) + (" (with variants)" if info["variants"] else ""),
        "variants": ", ".join(info["variants"]) or "-",
    }
    for k, v in rows.items():
        table.add_row(k, v)
    Console().print(table)
