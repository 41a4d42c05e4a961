"""Cell galleries: which cells a report shows, and their thumbnails with Grad-CAM overlays.

Per true class (lineage order): the misclassified cells first (most confidently wrong first), then
the least confident correct ones, at most `per_class` cells. Only these cells are read from the
image store and passed through a backbone (for the saliency maps).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wbc.figures import lineage_order
from wbc.html import esc, jpeg_uri

log = logging.getLogger(__name__)


@dataclass
class GalleryCell:
    pos: int  # position in the scored rows
    row: int  # image-store row
    true: int
    pred: int
    p_pred: float
    p_true: float


def select_cells(probs: np.ndarray, labels: np.ndarray, index: np.ndarray, class_names: list[str],
                 per_class: int = 8) -> dict[int, list[GalleryCell]]:
    """probs: (N, C); labels, index: (N,). Returns class -> cells (wrong first, then least confident)."""
    pred = probs.argmax(1)
    out: dict[int, list[GalleryCell]] = {}
    for c in lineage_order(list(class_names)):
        rows = np.flatnonzero(labels == c)
        wrong = sorted((i for i in rows if pred[i] != c), key=lambda i: -probs[i, pred[i]])
        right = sorted((i for i in rows if pred[i] == c), key=lambda i: probs[i, c])
        chosen = (wrong + right)[:per_class]
        out[c] = [GalleryCell(int(i), int(index[i]), c, int(pred[i]), float(probs[i, pred[i]]),
                              float(probs[i, c])) for i in chosen]
    return out


def saliency_for(cells: list[GalleryCell], images: np.ndarray, checkpoint: Path | None,
                 head: Path | None, device: str = "cpu") -> tuple[np.ndarray | None, np.ndarray | None]:
    """(crops, overlays) per cell for the predicted class, or (None, None) without a checkpoint."""
    if checkpoint is None or not Path(checkpoint).is_file() or not cells:
        return None, None
    from wbc.errors import WbcError
    from wbc.saliency import backbone_cams, overlay

    try:
        crops, cams = backbone_cams(checkpoint, images, np.array([c.pred for c in cells]), head, device)
    except WbcError as e:  # e.g. a token-sequence backbone: the report is still worth having
        log.warning("no saliency maps: %s", e)
        return None, None
    return crops, np.stack([overlay(im, m) for im, m in zip(crops, cams)])


def gallery_html(groups: dict[int, list[GalleryCell]], class_names: list[str], store, checkpoint: Path | None,
                 head: Path | None, device: str = "cpu", saliency: bool = True) -> tuple[str, dict]:
    """The gallery section. store: an open ImageStore (None = no images). Returns (html, stats)."""
    cells = [c for cs in groups.values() for c in cs]
    stats = {"cells": len(cells), "saliency": 0}
    if not cells:
        return "<p>No labelled cells to show.</p>", stats
    images = store.images([c.row for c in cells]) if store is not None else None
    crops = overlays = None
    if saliency and images is not None:
        t0 = time.perf_counter()
        crops, overlays = saliency_for(cells, images, checkpoint, head, device)
        stats["saliency"] = 0 if overlays is None else len(overlays)
        stats["saliency_s"] = time.perf_counter() - t0
    parts, k = [], 0
    for c, group in groups.items():
        wrong = sum(g.pred != c for g in group)
        parts.append(f"<h3>{esc(class_names[c])}: {wrong} misclassified shown, then the least confident "
                     f"correct ({len(group)} cells)</h3><div class=\"gallery\">")
        for g in group:
            img = ""
            if images is not None:
                shown = crops[k] if crops is not None else images[k]
                img = f'<img alt="cell {g.row}" src="{jpeg_uri(shown)}">'
                if overlays is not None:
                    img += f'<img alt="Grad-CAM of cell {g.row}" src="{jpeg_uri(overlays[k])}">'
            path = store.paths[g.row] if store is not None else ""
            verdict = "wrong" if g.pred != g.true else "right"
            parts.append(
                f'<div class="cell {verdict}">{img}<div>true <b>{esc(class_names[g.true])}</b>, predicted '
                f"<b>{esc(class_names[g.pred])}</b> p={g.p_pred:.2f}"
                + (f" (p true {g.p_true:.2f})" if verdict == "wrong" else "")
                + f'</div><div class="path">store row {g.row}: {esc(path)}</div></div>')
            k += 1
        parts.append("</div>")
    return "\n".join(parts), stats
