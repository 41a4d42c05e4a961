"""External evaluation: an ensemble classifies a labelled set from another lab, scored over its labels.

The images go through the full `wbc predict` path (decode -> the training store's stain template ->
resize -> each member's crop, K views, backbone, head -> softmax averaged over views), then
`wbc.labelmap` maps the model's classes onto the set's (often coarser) labels: the probability of
a set label is the sum over the model classes mapped to it. Model classes with no counterpart and
set labels the model cannot produce are listed in the report, never silently dropped.

Rows: each member (when there are several), then the ensemble (mean of the members' view-averaged
softmax). One labelled set, so every metric is a single value (no folds).
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wbc.ensemble import Member
from wbc.errors import WbcError
from wbc.labelmap import LabelMap
from wbc.metrics import HEADLINE, classification_metrics, expected_calibration_error
from wbc.report.external import write_external_report, write_predictions
from wbc.report.rows import RowResult

log = logging.getLogger(__name__)


@dataclass
class ExternalResult:
    """rows: members then the ensemble (one 'fold' each); labels: the scored set labels."""

    rows: list[RowResult]
    labels: list[str]
    label_map: LabelMap
    paths: dict[str, Path]
    n_images: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)


def read_labelled(source: str | Path) -> tuple[list[Path], list[str]]:
    """Image paths and labels of a labelled set.

    source: a CSV with `image` (relative to the CSV) and `label` columns, or a folder of class
    sub-folders (label = the first folder under it).
    """
    from wbc.engine.evaluate.predict import list_images

    source = Path(source)
    paths, labels = list_images(source)
    if source.is_dir():
        labels = [p.relative_to(source).parts[0] if len(p.relative_to(source).parts) > 1 else None
                  for p in paths]
    missing = [str(p) for p, y in zip(paths, labels) if not y]
    if missing:
        raise WbcError(f"{source}: {len(missing)} image(s) have no label (e.g. {missing[0]}); an external "
                       "set needs a CSV with image,label columns or a folder of class sub-folders")
    return paths, [str(y) for y in labels]


def row_names(members: list[Member]) -> list[str]:
    """Member names made unique (the same checkpoint may appear with two heads)."""
    seen: Counter = Counter()
    names = []
    for m in members:
        base = m.name or Path(m.checkpoint).stem
        seen[base] += 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return names


def score_row(name: str, kind: str, members: tuple[str, ...], probs: np.ndarray,
              labels: list[str], lm: LabelMap, ece_bins: int = 15) -> RowResult:
    """Metrics of one row after mapping. probs: (N, C_model); labels: (N,) set labels."""
    s = lm.score(probs, labels)
    m = classification_metrics(s.y_true, s.y_pred, len(s.labels))
    fold = {**{k: m[k] for k in HEADLINE}, "acc": m["acc"],
            "ece": expected_calibration_error(s.probs, s.y_true, ece_bins),
            "f1_per_class": m["per_class"]["f1"].tolist(), "absent": m["absent"].tolist(),
            "coverage": float(s.coverage.mean()) if len(s.coverage) else float("nan"),
            "n": len(s.y_true)}
    return RowResult(name, kind, members, folds=[fold], confusion=m["confusion"])


def evaluate_external(ensemble_path: str | Path, source: str | Path, out: str | Path,
                      label_map: str | Path | None = None, batch_size: int = 32,
                      device: str = "auto", title: str | None = None,
                      zoom: float | str | None = None) -> ExternalResult:
    """Classify and score the labelled set `source`; write report.md/json, confusion.png and
    predictions.csv under `out`. label_map: `MODEL=SET,...`, a .yaml/.csv file, or None.
    ensemble_path: ENSEMBLE.yaml or ADAPTED.yaml (`wbc adapt`). zoom: rescale each image's content
    within its frame (match the training images' cell scale); 'auto' estimates it, None = the
    adapted file's (1 for a plain ensemble)."""
    from wbc.adapt.apply import load_for_scoring, resolve_zoom, score_images

    ens, adaptation = load_for_scoring(ensemble_path)
    paths, labels = read_labelled(source)
    set_labels = sorted(set(labels))
    lm = LabelMap.parse(label_map, ens.class_names, set_labels)  # bad maps fail before any forward
    zoom = resolve_zoom(zoom, adaptation, ensemble_path, paths)
    scored = score_images(ens, adaptation, paths, zoom, batch_size, device, desc="external")
    probs, ok, failed = scored.member_probs, scored.ok, scored.failed
    if not ok.any():
        raise WbcError(f"{source}: none of the {len(paths)} images could be read (e.g. {failed[0][1]})")
    y = [lab for lab, good in zip(labels, ok) if good]
    if not set(y) & set(lm.scored_labels):
        raise WbcError(f"{source}: no readable image has a label the model can produce "
                       f"({lm.scored_labels}); check --label-map")
    names = row_names(ens.members)
    # A member listed twice (same checkpoint and head) scores identically: one row for it.
    same = [(m.checkpoint_sha256, str(m.head)) for m in ens.members]
    uniq = [i for i in range(len(names)) if same.index(same[i]) == i]
    rows = [score_row(names[i], "member", (names[i],), probs[i], y, lm) for i in uniq] if len(uniq) > 1 else []
    ens_name = f"Ensemble ({len(names)} members)" if len(uniq) > 1 else names[0]
    ensemble = scored.probs  # the members' mean (with the adapted target priors, if any)
    rows.append(score_row(ens_name, "ensemble", tuple(names), ensemble, y, lm))
    dropped = lm.score(ensemble, y).dropped
    out = Path(out)
    src = Path(source)  # name the set, not just its file: every manifest is called manifest.csv
    title = title or f"External set {src.parent.name + '/' if src.is_file() else ''}{src.name} ({len(paths)} images)"
    paths_out = write_external_report(rows, lm, out, title, {
        "source": str(source), "ensemble": str(ensemble_path), "n_images": len(paths),
        "n_scored": rows[-1].folds[0]["n"], "dropped": dropped, "failed": failed,
        "set_counts": dict(Counter(labels)), "zoom": zoom, "title": title,
        "scored": f"external set {source} ({len(paths)} images) through the full predict path of {ensemble_path}",
        "selective": _selective(scored, y, lm), "adapted": bool(adaptation.doc.get("format")),
    })
    paths_out["predictions"] = write_predictions(
        out / "predictions.csv", [p for p, good in zip(paths, ok) if good], y, ensemble, lm, scored)
    if failed:
        paths_out["failed"] = out / "failed.csv"
        with open(paths_out["failed"], "w", newline="") as f:
            csv.writer(f).writerows([("image", "reason"), *failed])
        log.warning("%d images could not be read (listed in %s)", len(failed), paths_out["failed"])
    return ExternalResult(rows, lm.scored_labels, lm, paths_out, len(paths), failed, dropped)


def _selective(scored, y: list[str], lm: LabelMap) -> dict:
    """Risk-coverage and review flags over the scored cells (model confidence, mapped labels)."""
    from wbc.selective import selective_report

    s = lm.score(scored.probs, y)
    review = None if scored.review is None else scored.review[s.kept]
    return selective_report(s.y_true, s.y_pred, scored.confidence[s.kept], review, len(s.labels),
                            scored.adaptation.doc.get("review") if scored.adaptation else None)
