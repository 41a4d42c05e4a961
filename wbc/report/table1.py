"""`wbc evaluate`'s report: Table 1 (report.md, report.json, report.npz, confusion.png)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from wbc.report.rows import (
    RowResult,
    best_row,
    confusion_png,
    markdown_table,
    per_class_table,
    to_json,
)


def confusion_subtitle(row: RowResult) -> str:
    """'n = 900 cells x 2 folds' models, Macro-F1 78.4 ± 1.0' for a Table-1 row."""
    n, f = row.folds[0]["n"], len(row.folds)
    mf1, sd = row.stat("mf1")
    folds = f" x {f} folds' models (summed)" if f > 1 else ""
    return f"{row.name}: n = {n} cells{folds}, Macro-F1 {100 * mf1:.1f}" + (f" ± {100 * sd:.1f}" if f > 1 else "")


def class_counts_line(row: RowResult, class_names: list[str]) -> str:
    """'n per class: PMY 100, MY 100, ...' (lineage order) from the summed confusion matrix."""
    from wbc.figures import lineage_order

    support = np.asarray(row.confusion).sum(1) // max(len(row.folds), 1)
    return "n per class: " + ", ".join(f"{class_names[i]} {int(support[i])}" for i in lineage_order(class_names))


def save_arrays(rows: list[RowResult], path: Path) -> Path:
    """report.npz (no pickle): probs (R, F, N, C) float32 per row and fold, labels (N,), index (N,)."""
    probs = np.stack([np.stack(r.probs) for r in rows]).astype(np.float32)
    np.savez_compressed(path, probs=probs, labels=np.asarray(rows[0].labels, np.int64),
                        index=np.asarray(rows[0].index, np.int64))
    return path


def write_report(rows: list[RowResult], class_names: list[str], out_dir: Path, title: str,
                 extra: dict | None = None) -> dict[str, Path]:
    """report.md, report.json, report.npz (arrays for report.html) and confusion.png (best MF1 row)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    best = best_row(rows)
    n = best.folds[0]["n"]
    store = ((extra or {}).get("sources") or {}).get("store")
    scored = f" (fold -1 rows of image store {store})" if store else ""
    md = [f"# {title}", "", f"Held-out test{scored}: {n} cells; {class_counts_line(best, class_names)}.", "",
          markdown_table(rows), "",
          ("Values are percent, mean ± std over folds; best **bold**, second <u>underlined</u>; "
          "ECE: lower is better."), ""]
    absent = sorted({class_names[i] for r in rows for f in r.folds for i in f["absent"]})
    if absent:
        md += [f"Classes absent from the test set (not averaged): {', '.join(absent)}", ""]
    md += ["## Per-class F1", "", per_class_table(rows, class_names), "",
           f"Confusion matrix of the best row ({best.name}), summed over folds: confusion.png", ""]
    paths = {"md": out_dir / "report.md", "json": out_dir / "report.json", "png": out_dir / "confusion.png"}
    paths["md"].write_text("\n".join(md))
    doc = to_json(rows, class_names, {"title": title, **(extra or {})})
    paths["json"].write_text(json.dumps(doc, indent=1, default=float))
    (out_dir / "report.npz").unlink(missing_ok=True)  # never pair this report with older arrays
    if all(r.probs for r in rows):
        paths["npz"] = save_arrays(rows, out_dir / "report.npz")
    confusion_png(best.confusion, class_names, title, paths["png"], confusion_subtitle(best))
    return paths
