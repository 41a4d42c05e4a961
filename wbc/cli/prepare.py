"""`wbc prepare`, `wbc split`, `wbc info`: thin wrappers over wbc.prepare, wbc.splits, wbc.store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from wbc.cli.app import app
from wbc.cli.options import Device, Out, Overwrite, Seed
from wbc.log import console

ProcWorkers = Annotated[int, typer.Option(
    "--workers", help="Threads (batched backend) or processes (torchstain) for decoding + Macenko "
                      "(-1 = all CPUs up to 8, 0 = in this process).")]
StainBackend = Annotated[str, typer.Option(
    "--stain-backend", help="batched (wbc's torch Macenko on --device, in batches) or torchstain "
                            "(per image; the reference, within 1 grey level).")]


@app.command()
def prepare(
    source: Annotated[Path, typer.Argument(help="Class-folder tree, CSV manifest (image,label[,split,group]) or WBCBench parquet file/dir.")],
    out: Out,
    template: Annotated[str, typer.Option(help="'auto' (medoid of the training images' stain matrices) or a reference image path.")] = "auto",
    no_stain: Annotated[bool, typer.Option("--no-stain", help="Store resized originals (Macenko off ablation).")] = False,
    size: Annotated[int, typer.Option(help="Stored image side in pixels.")] = 368,
    workers: ProcWorkers = -1,
    max_template_candidates: Annotated[int, typer.Option(help="Template auto: at most this many candidates (seeded subsample).")] = 500,
    seed: Seed = 0,
    stain_backend: StainBackend = "batched",
    device: Device = "auto",
    compression: Annotated[str, typer.Option(
        help="Codec of the stored images: zstd (fastest, smallest; readers need hdf5plugin, which "
             "wbc imports), lzf (any h5py reads it), gzip, none.")] = "zstd",
    overwrite: Overwrite = False,
) -> None:
    """Decode, Macenko-normalise, resize and store a labelled image set in an HDF5 store (resumable)."""
    from wbc.prepare import PrepareConfig, prepare_store

    cfg = PrepareConfig(size=size, stain=not no_stain, template=template, workers=workers,
                        max_template_candidates=max_template_candidates, seed=seed,
                        stain_backend=stain_backend, device=device, compression=compression)
    r = prepare_store(source, out, cfg, overwrite=overwrite)
    tpl = f"template {r.template['path']}" if r.template else "no stain normalisation"
    console.print(f"{r.out}: {r.n_written} images stored, {r.n_skipped} skipped (see {r.skipped_csv}), "
                  f"{r.n_stain_failed} stored un-normalised (stain_ok=False); {tpl}; "
                  + ("already complete, nothing done" if r.resumed_from == r.n_items else
                     f"{r.images_per_s:.1f} images/s" + (f" (resumed at {r.resumed_from})" if r.resumed_from else "")))
    for reason, n in sorted(r.stain_failures.items(), key=lambda kv: -kv[1]):
        console.print(f"  stain failure: {reason} x{n}")


@app.command()
def split(
    store: Annotated[Path, typer.Argument(help="HDF5 image store from `wbc prepare`.")],
    test: Annotated[float, typer.Option(help="Held-out test fraction (unused when the source marks a test split).")] = 0.2,
    folds: Annotated[int, typer.Option(help="Stratified CV folds on the rest.")] = 5,
    seed: Seed = 0,
    ignore_source_split: Annotated[bool, typer.Option("--ignore-source-split", help="Carve the test set even if the source marks one.")] = False,
    overwrite: Overwrite = False,
) -> None:
    """Held-out test + stratified K-fold CV (grouped by patient when known), stored in the store."""
    from wbc.splits import SplitConfig, split_store

    info = split_store(store, SplitConfig(test=test, folds=folds, seed=seed,
                                          use_source_split=not ignore_source_split), overwrite=overwrite)
    how = "source's test split" if info["source_test_used"] else f"{info['test_fraction']:.1%} held out"
    console.print(f"{store}: test {info['n_test']} ({how}), folds {info['n_fold']}, "
                  f"{'grouped by patient' if info['grouped'] else 'no groups'}, split id {info['split_id']}")


@app.command()
def info(
    store: Annotated[Path, typer.Argument(help="HDF5 image store.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Class counts per split and fold, stain failures, skipped files and provenance of a store."""
    from wbc.store import store_info

    d = store_info(store)
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    out = Console()
    t = Table(title=f"{store}: {d['n']} images {d['size']}x{d['size']}")
    t.add_column("class")
    for part in d["counts"]:
        t.add_column(part, justify="right")
    t.add_column("stain failed", justify="right")
    for i, name in enumerate(d["classes"]):
        t.add_row(name, *(str(c[i]) for c in d["counts"].values()), str(d["stain_failed"][i]))
    t.add_row("total", *(str(sum(c)) for c in d["counts"].values()), str(d["n_stain_failed"]), style="bold")
    out.print(t)
    p = d["provenance"]
    tpl = p.get("template") or {}
    meta = Table(show_header=False, title="provenance")
    rows = {
        "content id": d["content_id"],
        "compression": d["compression"],
        "stain": p.get("stain"),
        "template": f"{tpl.get('path')} ({tpl.get('spec')}"
                    + (f", medoid of {tpl['candidates'] - tpl['candidates_failed']} candidates)" if "candidates" in tpl else ")")
        if tpl else "-",
        "stain matrix (H, E)": json.dumps(_round(p.get("stain_matrix"))),
        "max concentrations": json.dumps(_round(p.get("max_conc"))),
        "stain failures": ", ".join(f"{k} x{v}" for k, v in (p.get("stain_failures") or {}).items()) or "none",
        "skipped files": f"{d['n_skipped']}" + (f" ({', '.join(f'{k} x{v}' for k, v in d['skipped_reasons'].items())})" if d["n_skipped"] else ""),
        "source": json.dumps(p.get("source")),
        "split": json.dumps({k: d["split"][k] for k in ("test", "folds", "seed", "grouped", "source_test_used", "split_id") if k in d["split"]}) if d["split"] else "not split (run `wbc split`)",
        "wbc / torchstain": f"{p.get('wbc_version')} / {p.get('torchstain_version', '-')}",
    }
    for k, v in rows.items():
        meta.add_row(k, str(v))
    out.print(meta)


def _round(x):
    if x is None:
        return None
    if isinstance(x, list):
        return [_round(v) for v in x]
    return round(float(x), 4)
