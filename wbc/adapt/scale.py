"""Cell scale of an image set without labels, and the zoom that matches it to the training images.

Per image the white cell's nucleus is segmented on optical density with a THREE-level threshold
(multi-Otsu): background < red cells / cytoplasm < nuclei. A two-level (Otsu) threshold lets the
nucleus outline swallow touching red cells on crowded smears, which is how the old
`tools/cell_scale.py` read 0.50 on a set imaged at PBC's own scale. The nucleus is the dark
component nearest the centre plus the lobes next to it (a neutrophil's nucleus is in pieces);
its relative size is sqrt(nucleus area / frame area).

zoom = median source size / median target size. It is reported with a bootstrap interval over
the target images and the number of images that could not be measured; when the interval holds 1
or the estimate is within `tolerance` (TOLERANCE, 20%) of 1 the zoom is 1 (rescaling a set that
already matches lowered Macro-F1 from 32 to 20 on one lab's set, so "no change" is the safe default).
Why 20%: nucleus size depends on the cell type, so a different class mix at the same scale moves
the median too. Measured: PBC-LT's balanced test split against its long-tailed training pool (same
microscope) reads 0.84-0.855, and applying that zoom lowered in-domain Macro-F1 78.0 -> 74.3; another
lab's same-scale set read 0.88. A change under 20% cannot be told apart from a class-mix change.
(A red-cell ruler would not depend on the class mix: it read 1.015 on the same PBC-LT pair, but
half of JTSC's tighter crops show no measurable red cell.)
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_multiotsu, threshold_otsu

log = logging.getLogger(__name__)

MIN_PART = 0.002  # components smaller than this fraction of the frame are specks, not nuclei
TOLERANCE = 0.2  # |zoom - 1| below this counts as the same scale: see the module doc
LOBE_GAP = 0.04  # lobes within this fraction of the frame side of the central one belong to it
MEASURE_SIDE = 160  # images are measured at about this side (a ratio of areas does not need more)


def optical_density(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) float32 summed optical density (nuclei absorb most)."""
    return -np.log((image.astype(np.float32) + 1.0) / 256.0).sum(-1)


def _is_valley(od: np.ndarray, t: float, lo: float, hi: float) -> bool:
    """Does threshold t sit in a trough of the density histogram between [lo, t) and [t, hi]?
    A threshold splitting one mode (a lone cell with no red cells: only two levels exist) does not."""
    hist, edges = np.histogram(od, bins=64, range=(lo, hi))
    hist = np.convolve(hist, np.ones(3) / 3, mode="same")
    k = int(np.clip(np.searchsorted(edges, t) - 1, 1, len(hist) - 2))
    return hist[k] < 0.5 * min(hist[:k].max(), hist[k:].max())


def nucleus_mask(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: dark pixels above the upper of three density levels (background, red cells and
    cytoplasm, nuclei), or of two when the upper split is no trough of the histogram."""
    od = optical_density(image)
    lo, hi = float(od.min()), float(od.max())
    if hi <= lo:
        return np.zeros(od.shape, bool)
    try:
        t1, t2 = threshold_multiotsu(od, classes=3)
        t = t2 if _is_valley(od, t2, t1, hi) else threshold_otsu(od)
    except ValueError:  # fewer than three grey levels: a synthetic image
        t = threshold_otsu(od)
    return ndimage.binary_fill_holes(od > t)


def relative_size(image: np.ndarray) -> float:
    """sqrt(nucleus area / frame area) of the central nucleus and its lobes; nan if none found."""
    side = min(image.shape[:2])
    if side > MEASURE_SIDE:  # a ratio of areas: measuring at ~160 px gives the same, 5x faster
        step = side // MEASURE_SIDE
        image = image[::step, ::step]
    mask = nucleus_mask(image)
    h, w = mask.shape
    lab, n = ndimage.label(mask)
    if n == 0:
        return float("nan")
    areas = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    keep = np.flatnonzero(areas >= MIN_PART * h * w) + 1
    if len(keep) == 0:
        return float("nan")
    cents = np.array(ndimage.center_of_mass(mask, lab, keep))
    centre = keep[np.argmin(np.hypot(cents[:, 0] - h / 2, cents[:, 1] - w / 2))]
    grown = ndimage.binary_dilation(lab == centre, iterations=max(1, round(LOBE_GAP * min(h, w))))
    lobes = np.setdiff1d(np.unique(lab[grown]), [0])
    lobes = lobes[np.isin(lobes, keep)]
    # A "nucleus" touching most of the frame edge is background or a smear, not one cell.
    part = np.isin(lab, lobes)
    edge = np.concatenate([part[0], part[-1], part[:, 0], part[:, -1]]).mean()
    if edge > 0.25:
        return float("nan")
    return float(np.sqrt(part.sum() / (h * w)))


def sizes(images) -> np.ndarray:
    """Relative nucleus size of each image (an iterable of (H, W, 3) uint8); nan = unmeasurable."""
    return np.array([relative_size(im) for im in images], dtype=np.float64)


@dataclass(frozen=True)
class ScaleEstimate:
    """zoom to apply to the target; the raw estimate with a 90% bootstrap interval, and counts."""

    zoom: float
    raw: float
    low: float
    high: float
    source_median: float
    target_median: float
    target_spread: float  # interquartile range of log target size: cell-to-cell variation
    n_source: int
    n_target: int
    n_unmeasured: int  # target images with no measurable nucleus
    reason: str

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def estimate_zoom(source_sizes: np.ndarray, target_sizes: np.ndarray, tolerance: float = TOLERANCE,
                  n_boot: int = 500, seed: int = 0, min_measured: int = 5) -> ScaleEstimate:
    """zoom = median(source) / median(target), kept at 1 unless clearly different.

    source_sizes, target_sizes: (N,) relative sizes (nan = unmeasurable). tolerance: |zoom - 1|
    below it counts as "same scale". Raises ValueError when too few images were measurable.
    """
    s = np.asarray(source_sizes, np.float64)
    t = np.asarray(target_sizes, np.float64)
    s_ok, t_ok = s[np.isfinite(s)], t[np.isfinite(t)]
    if len(s_ok) < min_measured or len(t_ok) < min_measured:
        raise ValueError(f"cell scale: only {len(s_ok)} source and {len(t_ok)} target images had a "
                         f"measurable nucleus (need {min_measured} each)")
    rng = np.random.default_rng(seed)
    sm, tm = float(np.median(s_ok)), float(np.median(t_ok))
    raw = sm / tm
    boot = [np.median(rng.choice(s_ok, len(s_ok))) / np.median(rng.choice(t_ok, len(t_ok)))
            for _ in range(n_boot)]
    low, high = (float(v) for v in np.quantile(boot, [0.05, 0.95]))
    q1, q3 = np.quantile(np.log(t_ok), [0.25, 0.75])
    if low <= 1.0 <= high:
        zoom, why = 1.0, "the 90% interval holds 1: scales match"
    elif abs(raw - 1.0) < tolerance:
        zoom, why = 1.0, f"within {tolerance:.0%} of 1: scales match"
    else:
        zoom, why = round(raw, 3), "scales differ"
    return ScaleEstimate(zoom, raw, low, high, sm, tm, float(q3 - q1), len(s_ok), len(t_ok),
                         int(len(t) - len(t_ok)), why)
