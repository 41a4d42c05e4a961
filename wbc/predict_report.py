"""P.html beside `wbc predict --out P.csv`: a differential count and the cells grouped by class.

Built from P.csv and the image files it names (nothing is re-classified). Columns used: image,
predicted, prob_<class>; when present (newer `wbc predict`), `review` (cells flagged for a human),
`confidence` and `ood_score`. Without `confidence` the maximum probability is used. Within a
class, flagged cells come first, then the least confident: the ones a reviewer should look at.
A `label` column (or labels from the source CSV) adds the true class to each cell.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np

from wbc.errors import WbcError
from wbc.figures import lineage_order
from wbc.html import esc, jpeg_uri, page, prob_bars, table, write_page

log = logging.getLogger(__name__)
TRUE = {"1", "true", "yes", "y", "t"}


def read_predictions(path: Path) -> tuple[list[dict], list[str]]:
    """Rows of P.csv and the class names (from its prob_<class> columns)."""
    path = Path(path)
    if not path.is_file():
        raise WbcError(f"{path}: predictions file not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        cols = reader.fieldnames or []
    classes = [c.removeprefix("prob_") for c in cols if c.startswith("prob_")]
    if "image" not in cols or "predicted" not in cols or not classes:
        raise WbcError(f"{path}: not a `wbc predict` CSV (needs image, predicted and prob_<class> columns)")
    return rows, classes


def _resolve(path: str, base: Path) -> Path:
    """An image path from P.csv: as written (relative to where predict ran), else relative to P.csv."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else base / p


def _thumb(path: str, base: Path) -> str:
    from PIL import Image

    p = _resolve(path, base)
    try:
        with Image.open(p) as im:
            return f'<img alt="{esc(p.name)}" src="{jpeg_uri(np.asarray(im.convert("RGB")))}">'
    except (OSError, ValueError):
        return "<div>(image not readable)</div>"


def count_table(classes: list[str], order: list[int], pred: list[str], flag: np.ndarray | None) -> str:
    """The differential count: cells and % per predicted class with a bar; flagged cells if known."""
    n = max(len(pred), 1)
    rows = []
    for i in order:
        k = pred.count(classes[i])
        bar = f'<span class="bar"><span class="b" style="width:{300 * k / n:.0f}px"></span></span>'
        flagged = [int(sum(f for f, p in zip(flag, pred) if p == classes[i]))] if flag is not None else []
        rows.append([esc(classes[i]), k, f"{100 * k / n:.1f}", bar, *flagged])
    rows.append(["total", len(pred), "100.0", "", *([int(flag.sum())] if flag is not None else [])])
    return table(["class", "cells", "%", "", *(["flagged for review"] if flag is not None else [])], rows, raw=True)


def render_predictions(csv_path: str | Path, out: Path | None = None, labels: dict[str, str] | None = None,
                       source: str | None = None, per_class: int = 60) -> Path:
    """Write P.html beside P.csv (or `out`). labels: image path -> true class, optional.
    per_class: thumbnails shown per predicted class (the counts always cover every cell)."""
    csv_path = Path(csv_path)
    rows, classes = read_predictions(csv_path)
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows]).reshape(len(rows), len(classes))
    conf = np.array([float(r["confidence"]) if r.get("confidence") not in (None, "") else p.max()
                     for r, p in zip(rows, probs)]) if rows else np.zeros(0)
    flag = np.array([str(r.get("review", "")).strip().lower() in TRUE for r in rows], bool)
    has_review = bool(rows) and "review" in rows[0]
    real = {os.path.realpath(k): v for k, v in (labels or {}).items()}  # match files, not spellings
    truth = {r["image"]: r.get("label") or real.get(os.path.realpath(_resolve(r["image"], csv_path.parent)))
             for r in rows}
    order = lineage_order(classes)
    pred = [r["predicted"] for r in rows]
    n = len(rows)
    body = [(f"<p><b>Data scored:</b> {esc(source or csv_path)}: {n} cells classified "
            f"(predictions: {esc(csv_path.name)}).</p>"), "<h2>Differential count</h2>",
            count_table(classes, order, pred, flag if has_review else None)]
    known = [(truth.get(r["image"]), r["predicted"]) for r in rows if truth.get(r["image"])]
    if known:
        agree = sum(t == p for t, p in known)
        body.append(f"<p>{len(known)} cells have a known class (label): {agree} predicted as labelled "
                    f"({100 * agree / len(known):.1f}%); cells where they differ are outlined in red.</p>")
    key = "flagged for review first, then " if has_review else ""
    body.append(f"<h2>Cells by predicted class</h2><p>Within a class: {key}least confident first "
                f"({'confidence column' if rows and 'confidence' in rows[0] else 'maximum probability'}); "
                f"bars: the three most probable classes. At most {per_class} cells per class are shown; "
                f"every cell is in {esc(csv_path.name)}.</p>")
    for i in order:
        c = classes[i]
        idx = [j for j, p in enumerate(pred) if p == c]
        if not idx:
            continue
        idx.sort(key=lambda j: (not flag[j], conf[j]))
        body.append(f"<h3>{esc(c)}: {len(idx)} cells</h3><div class=\"gallery\">")
        for j in idx[:per_class]:
            top = np.argsort(-probs[j])[:3]
            t = truth.get(rows[j]["image"])
            cls = "flag" if flag[j] else "wrong" if t and t != c else ""
            extra = f"<div>label <b>{esc(t)}</b></div>" if t else ""
            if rows[j].get("ood_score") not in (None, ""):
                extra += f"<div>OOD score {float(rows[j]['ood_score']):.2f}</div>"
            body.append(f'<div class="cell {cls}">{_thumb(rows[j]["image"], csv_path.parent)}'
                        f"<div>predicted <b>{esc(c)}</b>{' (flagged)' if flag[j] else ''}</div>{extra}"
                        + prob_bars([(classes[k], float(probs[j, k])) for k in top])
                        + f'<div class="path">{esc(os.path.normpath(rows[j]["image"]))}</div></div>')
        body.append("</div>")
    out = out or csv_path.with_suffix(".html")
    path = write_page(out, page(f"Predictions: {source or csv_path.name}", body, "wbc predict report"))
    log.info("predictions report: %s", path)
    return path
