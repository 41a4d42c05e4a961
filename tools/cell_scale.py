"""Estimate `--zoom` for an image set without labels (a thin wrapper over wbc.adapt.scale).

  python tools/cell_scale.py ENSEMBLE.yaml IMAGES   # IMAGES: a folder or a CSV with an 'image' column

The same estimate as `wbc predict --zoom auto` and `wbc adapt`: the images are stain-normalised
with the ensemble's training store template, their nucleus size is compared with the store's
training images (three-level threshold), and the zoom is 1 unless the scales clearly differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wbc.adapt.pipeline import auto_zoom, target_paths
from wbc.errors import WbcError


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ensemble", type=Path)
    p.add_argument("images", type=Path)
    p.add_argument("--n", type=int, default=200, help="images measured on each side")
    a = p.parse_args()
    try:
        e = auto_zoom(a.ensemble, target_paths(a.images), a.n)
    except WbcError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"training: median relative nucleus size {e.source_median:.3f} ({e.n_source} images); "
          f"target: {e.target_median:.3f} ({e.n_target} images, {e.n_unmeasured} unmeasurable, "
          f"IQR of log size {e.target_spread:.2f})")
    print(f"raw zoom {e.raw:.3f}, 90% interval {e.low:.3f}-{e.high:.3f}: {e.reason}")
    print(f"suggested --zoom {e.zoom}")


if __name__ == "__main__":
    main()
