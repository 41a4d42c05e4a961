"""`wbc evaluate --external`'s report: one labelled set, each row a single value (no folds):
report.md, report.json, confusion.png, predictions.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from rich.table import Table

from wbc.labelmap import LabelMap
from wbc.report.rows import (
    KEYS,
    LABELS,
    RowResult,
    confusion_png,
    marked,
    per_class_table,
    ranked_cells,
    to_json,
)
from wbc.selective import selective_markdown


def write_predictions(path: Path, paths: list[Path], labels: list[str], probs: np.ndarray,
                       lm: LabelMap, scored=None) -> Path:
    """Per image: its label, the predicted set label, the model's own class, coverage,
    confidence, ood_score, review, probs."""
    mass = probs @ lm.matrix()
    n = len(paths)
    ood = scored.ood if scored is not None and scored.ood is not None else [None] * n
    review = scored.review if scored is not None and scored.review is not None else [None] * n
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "predicted", "model_class", "coverage", "confidence", "ood_score",
                    "review", *[f"prob_{c}" for c in lm.model_classes]])
        for p, y, q, m, o, r in zip(paths, labels, probs, mass, ood, review):
            w.writerow([str(p), y, lm.scored_labels[int(m.argmax())], lm.model_classes[int(q.argmax())],
                        f"{m.sum():.4f}", f"{q.max():.4f}", "" if o is None else f"{o:.3f}",
                        "" if r is None else bool(r), *[f"{v:.4f}" for v in q]])
    return path


def _ranked(rows: list[RowResult]) -> list[list[tuple[str, int]]]:
    return ranked_cells(rows, KEYS, lambda r, k: r.folds[0][k], lambda r, k: f"{100 * r.folds[0][k]:.1f}")


def markdown_rows(rows: list[RowResult]) -> str:
    """Single-set table: values in percent, best **bold**, second <u>underlined</u>."""
    lines = ["| Model | " + " | ".join(LABELS[k] for k in KEYS) + " | coverage | n |",
             "|---|" + "---:|" * (len(KEYS) + 2)]
    for r, cells in zip(rows, _ranked(rows)):
        f = r.folds[0]
        lines.append(f"| {r.name} | " + " | ".join(marked(cells)) + f" | {100 * f['coverage']:.1f} | {f['n']} |")
    return "\n".join(lines)


def rich_rows(rows: list[RowResult], title: str) -> Table:
    t = Table(title=title)
    t.add_column("Model")
    for k in KEYS:
        t.add_column(LABELS[k], justify="right")
    t.add_column("n", justify="right")
    for r, cells in zip(rows, _ranked(rows)):
        t.add_row(r.name, *marked(cells, "rich"), str(r.folds[0]["n"]))
    return t


def write_external_report(rows: list[RowResult], lm: LabelMap, out: Path, title: str,
                          extra: dict) -> dict[str, Path]:
    """report.md, report.json and confusion.png (the ensemble row) under out."""
    out.mkdir(parents=True, exist_ok=True)
    labels = lm.scored_labels
    md = [f"# {title}", "", (f"{extra['n_scored']} of {extra['n_images']} images scored over the set's "
          f"labels {', '.join(labels)}."), "", markdown_rows(rows), "",
          ("Values are percent; best **bold**, second <u>underlined</u>; ECE: lower is better. "
          "Coverage: mean probability the model put on classes that map to a set label."), "",
          "## Label map", "", "| model class | set label |", "|---|---|"]
    md += [f"| {c} | {lm.mapping.get(c, '(no counterpart: probability dropped)')} |" for c in lm.model_classes]
    md += ["", f"Model classes with no counterpart in the set: {', '.join(lm.unmapped_model) or 'none'}",
           "", f"Set labels the model cannot produce (not scored): {', '.join(lm.unscorable) or 'none'}"]
    if extra["dropped"]:
        md += ["", "Images left out of the metrics (label not producible): "
               + ", ".join(f"{k} x{v}" for k, v in extra["dropped"].items())]
    if extra["failed"]:
        md += ["", f"Unreadable images (not scored, listed in failed.csv): {len(extra['failed'])}"]
    absent = sorted({labels[i] for r in rows for i in r.folds[0]["absent"]})
    if absent:
        md += ["", f"Labels with no scored image (not averaged): {', '.join(absent)}"]
    md += selective_markdown(extra.get("selective"))
    md += ["", "## Per-class F1", "", per_class_table(rows, labels), "",
           f"Confusion matrix of {rows[-1].name}: confusion.png", ""]
    paths = {"md": out / "report.md", "json": out / "report.json", "png": out / "confusion.png"}
    paths["md"].write_text("\n".join(md))
    doc = to_json(rows, labels, {**extra, "label_map": lm.to_dict(), "unmapped_model": lm.unmapped_model,
                                 "unscorable": lm.unscorable})
    paths["json"].write_text(json.dumps(doc, indent=1, default=float))
    f = rows[-1].folds[0]
    confusion_png(rows[-1].confusion, labels, title, paths["png"],
                  f"{rows[-1].name}: n = {f['n']} cells, Macro-F1 {100 * f['mf1']:.1f}")
    return paths
