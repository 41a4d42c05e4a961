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
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("WBC_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torchstain
from PIL import Image

from tools.benchlib import machine, write_section
from wbc.log import setup_logging
from wbc.prepare import PrepareConfig, prepare_store
from wbc.splits import SplitConfig, split_store
from wbc.store import encode_image, open_store


def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (prepare's worker processes)."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def plain_loop(paths: list[Path], template: Path, size: int, stains: bool) -> tuple[float, float]:
    """(images/s, CPU ms/image) of decode -> torchstain normalize -> resize, one image at a time."""
    norm = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    norm.fit(torch.from_numpy(np.array(Image.open(template).convert("RGB"))).permute(2, 0, 1))
    t0, c0 = time.perf_counter(), cpu_seconds()
    fails = 0
    for p in paths:
        img = np.array(Image.open(p).convert("RGB"))
        try:
            out, _, _ = norm.normalize(torch.from_numpy(img).permute(2, 0, 1), stains=stains)
            img = out.clamp(0, 255).to(torch.uint8).numpy()  # HWC int32 -> HWC uint8
        except Exception:  # noqa: BLE001 - the plain loop keeps the original, as such loops do
            fails += 1
        Image.fromarray(img).resize((size, size), Image.BICUBIC)
    n = len(paths)
    return n / (time.perf_counter() - t0), 1000 * (cpu_seconds() - c0) / n


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

    with open(args.manifest, newline="") as f:
        rows = [row["image"] for row in csv.DictReader(f)]
    rng = np.random.default_rng(0)
    subset = [args.manifest.parent / rows[i] for i in sorted(rng.choice(len(rows), args.subset, replace=False))]
    # The plain loop runs before and after prepare (same template, fitted below) to bracket the
    # load other users put on the shared CPU; CPU ms/image is much less sensitive to that load.
    first = subset[0]
    plain_before = plain_loop(subset, first, args.size, stains=True)

    c0 = cpu_seconds()
    r = prepare_store(args.manifest, args.out, PrepareConfig(size=args.size, workers=args.workers),
                      overwrite=True)
    prep_cpu = 1000 * (cpu_seconds() - c0) / r.n_items
    if not args.skip_split:
        split_store(args.out, SplitConfig(test=0.2, folds=5, seed=0), overwrite=True)

    template = args.manifest.parent / r.template["path"]
    plain_after = plain_loop(subset, template, args.size, stains=True)
    plain_nostains = plain_loop(subset, template, args.size, stains=False)
    plain = ((plain_before[0] + plain_after[0]) / 2, (plain_before[1] + plain_after[1]) / 2)

    ns = None
    if args.no_stain_out:
        c0 = cpu_seconds()
        ns = prepare_store(args.manifest, args.no_stain_out,
                           PrepareConfig(size=args.size, stain=False, workers=args.workers), overwrite=True)
        ns_cpu = 1000 * (cpu_seconds() - c0) / ns.n_items
        if not args.skip_split:
            split_store(args.no_stain_out, SplitConfig(test=0.2, folds=5, seed=0), overwrite=True)

    store = open_store(args.out)
    sample = store.images(range(0, len(store), max(1, len(store) // 50)))
    c0 = time.process_time()
    for im in sample:
        encode_image(im, "lzf")
    lzf_ms = 1000 * (time.process_time() - c0) / len(sample)
    store.close()

    tpl = r.template
    lines = [
        "## prepare (`tools/bench_prepare.py`)",
        "",
        (f"`wbc prepare {args.manifest.name}` ({r.n_items} images, Macenko, template auto, {args.size} px, "
        f"lzf, `--workers {args.workers}`) vs a plain per-image torchstain loop (PIL decode -> torch "
        f"backend normalize -> resize, one process) on a seeded subset of {args.subset} of the same "
        "images, measured in the same run."),
        "",
        "| pipeline | images/s (wall) | prepare speed-up | CPU ms / image (all processes) |",
        "|---|---|---|---|",
        (f"| `prepare` end to end (template pass + normalise + compress + HDF5 write) | "
        f"{r.images_per_s:.1f} | 1.00x | {prep_cpu:.1f} |"),
        (f"| plain loop, `normalize()` defaults (also builds H and E images); before / after prepare | "
        f"{plain_before[0]:.1f} / {plain_after[0]:.1f} | {r.images_per_s / plain[0]:.2f}x | {plain[1]:.1f} |"),
        (f"| plain loop, `normalize(stains=False)` (after) | {plain_nostains[0]:.1f} | "
        f"{r.images_per_s / plain_nostains[0]:.2f}x | {plain_nostains[1]:.1f} |"),
    ]
    if ns is not None:
        lines.append(f"| `prepare --no-stain` (decode + resize + compress + write) | {ns.images_per_s:.1f} | "
                     f"- | {ns_cpu:.1f} |")
    lines += [
        "",
        (f"Stain failures: {r.n_stain_failed} of {r.n_written} stored un-normalised "
        f"({', '.join(f'{k} x{v}' for k, v in r.stain_failures.items()) or 'none'}); skipped files: {r.n_skipped}. "
        f"Template: `{tpl['path']}`, medoid of {tpl['candidates'] - tpl['candidates_failed']} stain matrices "
        f"(a seeded subsample of {tpl['candidates']} of the {tpl['candidate_pool']} training images; mean angle "
        f"to the others {tpl['medoid_mean_angle_deg']:.2f} deg). Total prepare time {r.seconds:.0f} s, "
        f"of which the template pass {r.template_seconds:.0f} s. lzf compression of one stored image "
        f"costs {lzf_ms:.1f} ms CPU (measured on {len(sample)} of them)."),
        "",
        (f"Machine: {machine()}. The CPU is shared with other developers' jobs, so absolute figures "
        "may be disturbed; CPU ms/image is the steadier figure. Speed-up = prepare images/s over the plain "
        "loop's (mean of its runs before and after prepare). prepare's CPU also pays for work the plain "
        "loop does not do: the template pass, lzf compression of every image (in the workers), worker "
        "start-up (each imports torch) and the HDF5 writes; its wall-clock gain can only come from the "
        "worker pool, i.e. from idle cores, which a 2-core machine under other users' load does not have."),
    ]
    body = "\n".join(lines)
    print(body)
    if not args.print_only:
        write_section("prepare", body)


if __name__ == "__main__":
    main()
