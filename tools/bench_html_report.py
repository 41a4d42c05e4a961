"""Time report.html for PBC-LT's 900 held-out test cells against the evaluate step, in one run.

Measured on the same machine, one after the other:
  extract   the backbone pass evaluation rests on: the 900 test rows x 8 views (a throw-away cache)
  evaluate  `wbc evaluate`'s library work on the cache: Table-1 rows, report.md/json/npz, confusion.png
  render    report.html from that folder (figures, gallery of 8 cells per class, Grad-CAM on them)
  render without saliency maps, for the share of Grad-CAM
Writes the section "HTML report (issue 16)" of BENCHMARKS.md.

    python tools/bench_html_report.py --store ../main/cache/images/pbc-lt.h5 \
        --checkpoint ../main/cache/xlab/runs/lite0-c160/fold0/best.pt \
        --cache ../main/cache/xlab/features/lite0-c160-fold0.zarr --out cache/bench-html
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.benchlib import machine, write_section


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, required=True, help="Stage-1 best.pt the cache was made from")
    p.add_argument("--cache", type=Path, required=True, help="its feature cache (all rows)")
    p.add_argument("--out", type=Path, default=Path("cache/bench-html"))
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--section", default="HTML report (issue 16)")
    a = p.parse_args()

    import torch

    from wbc.engine.evaluate import ModelSpec, evaluate_table
    from wbc.engine.extract import ExtractConfig, extract
    from wbc.engine.stage2 import crt
    from wbc.report import write_report
    from wbc.report_html import render_report, report_sources
    from wbc.store import open_store

    torch.set_num_threads(max(1, torch.get_num_threads()))
    a.out.mkdir(parents=True, exist_ok=True)
    head_dir = a.out / "crt"
    if not (head_dir / f"fold{a.fold}" / "head.pt").is_file():
        crt(str(a.cache), head_dir, a.fold)  # the paper's default cRT head, seconds on the cache
    head = head_dir / f"fold{a.fold}" / "head.pt"

    test_rows = open_store(a.store).indices("test")
    tmp = a.out / "test-rows.zarr"
    shutil.rmtree(tmp, ignore_errors=True)
    _, t_extract = timed(extract, a.checkpoint, a.store, tmp, ExtractConfig(workers=0), rows=test_rows)
    shutil.rmtree(tmp, ignore_errors=True)

    models = [ModelSpec("lite0", (a.cache,), (head,))]
    rep = a.out / "report"

    def evaluate_step():
        rows, classes = evaluate_table(models, [a.fold])
        write_report(rows, classes, rep, "PBC-LT held-out test",
                     extra={"folds": [a.fold], "sources": report_sources(models, [a.fold])})
        return rows

    rows, t_eval = timed(evaluate_step)
    html, t_render = timed(render_report, rep, 8, True, "cpu")
    _, t_plain = timed(render_report, rep, 8, False, "cpu", rep / "report-no-saliency.html")
    n = rows[0].folds[0]["n"]
    step = t_extract + t_eval
    body = "\n".join([
        f"## {a.section}",
        "",
        f"Machine: {machine()}. `python tools/bench_html_report.py` (one run; the other helpers' jobs shared the CPU).",
        (f"Data: PBC-LT held-out test, n = {n} cells; lite0 fold {a.fold} (`{a.checkpoint}`), its 8-view cache and a "
        "default cRT head; gallery 8 cells per class (72) with Grad-CAM."),
        "",
        "| step | seconds |",
        "|---|---:|",
        f"| extract: backbone pass over the {len(test_rows)} test cells x 8 views | {t_extract:.1f} |",
        f"| evaluate on the cache (Table-1 rows, report.md/json/npz, confusion.png) | {t_eval:.1f} |",
        f"| **render report.html** (figures, gallery, Grad-CAM) | {t_render:.1f} |",
        f"| render report.html without Grad-CAM | {t_plain:.1f} |",
        "",
        (f"- render / (extract + evaluate), the whole evaluate step for these cells: "
        f"**{100 * t_render / step:.1f}%** (target < 10%)"),
        f"- render / evaluate on an already extracted cache: {100 * t_render / t_eval:.0f}%"
        + ("" if t_render < 0.1 * t_eval else ": the figures and the gallery's Grad-CAM cost more than reading "
           "cached logits, so against that step alone the target is not met"),
        f"- report.html size: {html.stat().st_size / 1e6:.2f} MB (images embedded)",
    ])
    write_section(a.section, body)
    print(body)


if __name__ == "__main__":
    main()
