"""Estimate `--zoom` for an external image set without labels: how much wider its cells look
(as a fraction of the frame) than the training images'.

For each image the white cell's nucleus is segmented (Otsu on optical density, the component
nearest the centre) and sqrt(area / frame area) is its relative size. zoom = median training size /
median external size; pass it to `wbc evaluate --external ... --zoom Z` or `wbc predict --zoom Z`.

  python tools/cell_scale.py TRAIN_MANIFEST.csv EXTERNAL_MANIFEST.csv [--n 200]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.filters import threshold_otsu
from skimage.measure import label, regionprops


def relative_size(path: Path) -> float:
    """sqrt(nucleus area / frame area) of the dark component nearest the centre (nan if none)."""
    im = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    od = -np.log((im + 1.0) / 256.0).sum(-1)  # nuclei absorb most
    mask = od > threshold_otsu(od)
    h, w = mask.shape
    parts = [r for r in regionprops(label(mask)) if r.area > 0.005 * h * w]
    if not parts:
        return float("nan")
    r = min(parts, key=lambda r: np.hypot(r.centroid[0] - h / 2, r.centroid[1] - w / 2))
    return float(np.sqrt(r.area / (h * w)))


def median_size(manifest: Path, n: int, seed: int = 0) -> tuple[float, int]:
    if not manifest.is_file():
        raise SystemExit(f"error: manifest not found: {manifest}")
    rows = list(csv.DictReader(manifest.open(newline="")))
    if not rows or "image" not in rows[0]:
        raise SystemExit(f"error: {manifest} has no rows with an 'image' column")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(rows), min(n, len(rows)), replace=False)
    sizes = [relative_size(manifest.parent / rows[i]["image"]) for i in pick]
    return float(np.nanmedian(sizes)), int(np.isfinite(sizes).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train", type=Path)
    p.add_argument("external", type=Path)
    p.add_argument("--n", type=int, default=200, help="images sampled from each set")
    a = p.parse_args()
    t, nt = median_size(a.train, a.n)
    e, ne = median_size(a.external, a.n)
    print(f"training: median relative nucleus size {t:.3f} ({nt} images); external: {e:.3f} ({ne} images)")
    print(f"suggested --zoom {t / e:.2f}")


if __name__ == "__main__":
    main()
