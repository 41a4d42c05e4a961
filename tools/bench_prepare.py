"""Time `wbc prepare` on a CSV manifest against a plain per-image torchstain loop, in one run.

Usage: .venv/bin/python tools/bench_prepare.py [--manifest ../shared/data/pbc-lt/manifest.csv]
       [--out cache/images/pbc-lt.h5] [--workers 2] [--subset 300] [--no-stain-out PATH] [--print-only]

1. `prepare_store` (template auto, worker pool, HDF5 writes) on every image of the manifest; the
   store it writes is the real one (default cache/images/pbc-lt.h5), then split 5-fold seed 0.
2. On a seeded subset of the same images, the loop people write: PIL decode -> torchstain
   (torch backend, defaults, fitted on the same template) -> resize; once as written
   (`normalize()` also computes the H and E images) and once with stains=False.
3. Optionally the `--no-stain` store (decode + resize only).
Writes the `prepare` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("WBC_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchstain  # noqa: E402
from PIL import Image  # noqa: E402

from tools.benchlib import machine, write_section  # noqa: E402
from wbc.log import setup_logging  # noqa: E402
from wbc.prepare import PrepareConfig, prepare_store  # noqa: E402
from wbc.splits import SplitConfig, split_store  # noqa: E402


def plain_loop(paths: list[Path], template: Path, size: int, stains: bool) -> float:
    """Images/s of decode -> torchstain normalize -> resize, one image at a time, one process."""
    norm = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    norm.fit(torch.from_numpy(np.array(Image.open(template).convert("RGB"))).permute(2, 0, 1))
    t0 = time.perf_counter()
    fails = 0
    for p in paths:
        img = np.array(Image.open(p).convert("RGB"))
        try:
            out, _, _ = norm.normalize(torch.from_numpy(img).permute(2, 0, 1), stains=stains)
            img = out.clamp(0, 255).to(torch.uint8).numpy()  # HWC int32 -> HWC uint8
        except Exception:  # noqa: BLE001 - the plain loop keeps the original, as such loops do
            fails += 1
        Image.fromarray(img).resize((size, size), Image.BICUBIC)
    return len(paths) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", type=Path, default=Path("../shared/data/pbc-lt/manifest.csv"))
    ap.add_argument("--out", type=Path, default=Path("cache/images/pbc-lt.h5"))
    ap.add_argument("--no-stain-out", type=Path, default=None)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--subset", type=int, default=300)
    ap.add_argument("--size", type=int, default=368)
    ap.add_argument("--skip-split", action="store_true", help="trial runs on tiny manifests")
    ap.add_argument("--print-only", action="store_true")
    args = ap.parse_args()
    setup_logging("WARNING")
    torch.set_num_threads(1)  # the plain loop is single-threaded like each prepare worker

    r = prepare_store(args.manifest, args.out, PrepareConfig(size=args.size, workers=args.workers),
                      overwrite=True)
    if not args.skip_split:
        split_store(args.out, SplitConfig(test=0.2, folds=5, seed=0), overwrite=True)

    with open(args.manifest, newline="") as f:
        rows = [row["image"] for row in csv.DictReader(f)]
    rng = np.random.default_rng(0)
    subset = [args.manifest.parent / rows[i] for i in sorted(rng.choice(len(rows), args.subset, replace=False))]
    template = args.manifest.parent / r.template["path"]
    plain = plain_loop(subset, template, args.size, stains=True)
    plain_nostains = plain_loop(subset, template, args.size, stains=False)

    ns = None
    if args.no_stain_out:
        ns = prepare_store(args.manifest, args.no_stain_out,
                           PrepareConfig(size=args.size, stain=False, workers=args.workers), overwrite=True)
        if not args.skip_split:
            split_store(args.no_stain_out, SplitConfig(test=0.2, folds=5, seed=0), overwrite=True)

    tpl = r.template
    lines = [
        "## prepare (`tools/bench_prepare.py`)",
        "",
        f"`wbc prepare {args.manifest.name}` ({r.n_items} images, Macenko, template auto, {args.size} px, "
        f"lzf, `--workers {args.workers}`) vs a plain per-image torchstain loop (PIL decode -> torch "
        f"backend normalize -> resize, one process) on a seeded subset of {args.subset} of the same "
        "images, measured in the same run.",
        "",
        "| pipeline | images/s | prepare / this |",
        "|---|---|---|",
        f"| `prepare` end to end (template pass + normalise + HDF5 write) | {r.images_per_s:.1f} | 1.00x |",
        f"| plain loop, `normalize()` defaults (also builds H and E images) | {plain:.1f} | "
        f"{r.images_per_s / plain:.2f}x |",
        f"| plain loop, `normalize(stains=False)` | {plain_nostains:.1f} | {r.images_per_s / plain_nostains:.2f}x |",
    ]
    if ns is not None:
        lines.append(f"| `prepare --no-stain` (decode + resize + write) | {ns.images_per_s:.1f} | "
                     f"{r.images_per_s / ns.images_per_s:.2f}x |")
    lines += [
        "",
        f"Stain failures: {r.n_stain_failed} of {r.n_written} stored un-normalised "
        f"({', '.join(f'{k} x{v}' for k, v in r.stain_failures.items()) or 'none'}); skipped files: {r.n_skipped}. "
        f"Template: `{tpl['path']}`, medoid of {tpl['candidates'] - tpl['candidates_failed']} stain matrices "
        f"(a seeded subsample of {tpl['candidates']} of the {tpl['candidate_pool']} training images; mean angle "
        f"to the others {tpl['medoid_mean_angle_deg']:.2f} deg). Total prepare time {r.seconds:.0f} s.",
        "",
        f"Machine: {machine()}. The CPU is shared with other developers' jobs, so absolute figures "
        "may be disturbed; the ratio is the part to read. With 2 cores the gain is mostly the worker "
        "pool (prepare also pays for the template pass and the HDF5 writes).",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.print_only:
        write_section("prepare", body)


if __name__ == "__main__":
    main()
