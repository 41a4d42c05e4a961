"""Reports: Table 1 as markdown (best **bold**, second <u>underlined</u>) and rich, JSON, figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rich.table import Table

from wbc.engine.evaluate import RowResult
from wbc.metrics import HEADLINE

LABELS = {"mf1": "MF1", "bacc": "BAcc", "mp": "MP", "mspec": "MSpec", "ece": "ECE"}
LOWER_IS_BETTER = {"ece"}


def ranks(values: list[float], lower_better: bool = False) -> list[int]:
    """0 for the best value, 1 for the second best (ties share a rank), 2 for the rest."""
    distinct = sorted(set(np.round(values, 6)), reverse=not lower_better)
    top = distinct[:2]
    return [top.index(v) if v in top else 2 for v in np.round(values, 6)]


def _cells(rows: list[RowResult], keys) -> list[list[tuple[str, int]]]:
    """Per row, per metric: ('73.1 ± 2.0', rank) with values in percent (ECE too)."""
    cols = []
    for k in keys:
        means = [r.stat(k)[0] for r in rows]
        rk = ranks(means, k in LOWER_IS_BETTER)
        cols.append([(f"{100 * r.stat(k)[0]:.1f} ± {100 * r.stat(k)[1]:.1f}", rk[i]) for i, r in enumerate(rows)])
    return [list(c) for c in zip(*cols)]


def markdown_table(rows: list[RowResult], keys=(*HEADLINE, "ece")) -> str:
    head = "| Model | " + " | ".join(LABELS[k] for k in keys) + " |"
    sep = "|---|" + "---:|" * len(keys)
    lines = [head, sep]
    for r, cells in zip(rows, _cells(rows, keys)):
        fmt = [f"**{t}**" if rk == 0 else f"<u>{t}</u>" if rk == 1 else t for t, rk in cells]
        lines.append(f"| {r.name} | " + " | ".join(fmt) + " |")
    return "\n".join(lines)


def rich_table(rows: list[RowResult], title: str, keys=(*HEADLINE, "ece")) -> Table:
    t = Table(title=title)
    t.add_column("Model")
    for k in keys:
        t.add_column(LABELS[k], justify="right")
    for r, cells in zip(rows, _cells(rows, keys)):
        fmt = [f"[bold]{s}[/]" if rk == 0 else f"[underline]{s}[/]" if rk == 1 else s for s, rk in cells]
        t.add_row(r.name, *fmt)
    return t


def per_class_table(rows: list[RowResult], class_names: list[str]) -> str:
    """Per-class F1 (mean over folds, percent) for each row, as markdown."""
    lines = ["| Model | " + " | ".join(class_names) + " |", "|---|" + "---:|" * len(class_names)]
    for r in rows:
        f1 = np.mean([f["f1_per_class"] for f in r.folds], axis=0)
        lines.append(f"| {r.name} | " + " | ".join(f"{100 * v:.1f}" for v in f1) + " |")
    return "\n".join(lines)


def best_row(rows: list[RowResult], key: str = "mf1") -> RowResult:
    return max(rows, key=lambda r: r.stat(key)[0])


def to_json(rows: list[RowResult], class_names: list[str], extra: dict | None = None) -> dict:
    return {
        "class_names": class_names,
        **(extra or {}),
        "rows": [
            {
                "name": r.name,
                "kind": r.kind,
                "members": list(r.members),
                **{k: {"mean": r.stat(k)[0], "std": r.stat(k)[1]} for k in (*HEADLINE, "ece")},
                "folds": r.folds,
                "confusion": r.confusion.tolist() if r.confusion is not None else None,
            }
            for r in rows
        ],
    }


def confusion_png(cm: np.ndarray, class_names: list[str], title: str, path: Path, subtitle: str = "") -> Path:
    """Counts and row-normalised confusion matrices side by side (lineage order, colour bars)."""
    from wbc.figures import confusion_figure, save_png

    return save_png(confusion_figure(cm, class_names, title, subtitle), path)


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
