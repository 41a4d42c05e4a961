"""`wbc predict`: classify new cells with the full path of an ensemble.

Decode -> RGB -> the training store's Macenko template (or none) -> resize to the store's size ->
per member: its own crop/normalisation, K views, frozen backbone, head -> softmax averaged over
views and members. The same functions as extraction are used, so predictions on an image equal
what `evaluate` computes from the cache for it (to fp16 rounding of cached embeddings).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wbc.errors import WbcError
from wbc.fsutil import atomic_write, check_writable, output_lock

log = logging.getLogger(__name__)
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


def list_images(source: Path) -> tuple[list[Path], list[str | None]]:
    """Image paths (and labels where a CSV gives them) from a folder (recursive) or a CSV."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXT)
        if not paths:
            raise WbcError(f"{source}: no images ({', '.join(sorted(IMAGE_EXT))}) found")
        return paths, [None] * len(paths)
    if source.is_file() and source.suffix.lower() == ".csv":
        from wbc.csvio import read_csv  # UTF-8 with or without BOM; bad lines named

        _, rows = read_csv(source, ("image",))
        if not rows:
            raise WbcError(f"{source}: no rows; a CSV needs an 'image' column (paths relative to the CSV)")
        return [source.parent / r["image"] for _, r in rows], [r.get("label") or None for _, r in rows]
    raise WbcError(f"{source}: give a folder of images or a CSV with an 'image' column")


@dataclass
class PredictResult:
    out: Path
    n_ok: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    failed_path: Path | None = None
    probs: np.ndarray | None = None


def _check_batch(batch_size: int) -> None:
    if batch_size < 1:
        raise WbcError(f"--batch-size must be at least 1, got {batch_size}")


def predict(source: Path, ensemble_path: Path, out: Path, batch_size: int = 32,
            device: str = "auto", zoom: float | str | None = None) -> PredictResult:
    """Classify every image of `source`; write CSV rows image, predicted, confidence, ood_score,
    review, prob_<class>... ensemble_path: ENSEMBLE.yaml or ADAPTED.yaml (`wbc adapt`).
    zoom: rescale each image's content within its frame first (another scanner's magnification);
    'auto' estimates it, None takes the adapted file's (1 for a plain ensemble)."""
    from wbc.adapt.apply import load_for_scoring, resolve_zoom, score_images

    _check_batch(batch_size)
    with output_lock(check_writable(out, "predictions")):  # before hours of compute, not after
        ens, adaptation = load_for_scoring(ensemble_path)
        paths, _labels = list_images(source)
        s = score_images(ens, adaptation, paths, resolve_zoom(zoom, adaptation, ensemble_path, paths),
                         batch_size, device)
        ood = s.ood if s.ood is not None else [None] * len(s.paths)
        review = s.review if s.review is not None else [None] * len(s.paths)
        rows = [(str(n), ens.class_names[int(q.argmax())], f"{c:.4f}", "" if o is None else f"{o:.3f}",
                 "" if r is None else bool(r), *map(float, q))
                for n, q, c, o, r in zip(s.paths, s.probs, s.confidence, ood, review)]
        return _write(out, rows, s.failed, ens.class_names, [s.probs],
                      extra=("confidence", "ood_score", "review"))


def _write(out, rows, failed, class_names, all_probs, extra=()) -> PredictResult:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, newline="") as f:  # a partial CSV is never left under the final name
        w = csv.writer(f)
        w.writerow(["image", "predicted", *extra, *[f"prob_{c}" for c in class_names]])
        w.writerows(rows)
    result = PredictResult(out, len(rows), failed,
                           probs=np.concatenate(all_probs) if all_probs else np.zeros((0, len(class_names))))
    failed_path = out.with_name(out.stem + ".failed.csv")
    failed_path.unlink(missing_ok=True)  # a list from an earlier run must not describe this one
    if failed:
        result.failed_path = failed_path
        with atomic_write(result.failed_path, newline="") as f:
            csv.writer(f).writerows([("image", "reason"), *failed])
        log.warning("%d images could not be read (listed in %s)", len(failed), result.failed_path)
    return result
