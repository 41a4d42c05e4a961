"""Macenko in numpy, one image at a time: the CPU path of `--stain-backend batched`, without torch.

`wbc.stain_batch.BatchMacenko` runs the algorithm on batches in torch (GPU, mps); on the CPU a
batch buys nothing (one core works through the pixels either way) and importing torch costs a
process ~3 s, more than normalising 400 images. This is the same algorithm, step for step and in
float32 (see `wbc.stain_batch`'s module doc): optical density, stained mask, covariance and its
eigenvectors, angle percentiles (torchstain's nearest rank), stain vectors in torchstain's order,
concentrations through the pseudo-inverse, per-image 99th percentiles, the guards of
`wbc.stain`, clamp, reconstruction truncated to uint8. Validated against torchstain plus the clamp
and against `BatchMacenko` (tests/test_stain_np.py): within one grey level.

numpy releases the GIL in its array loops, so threads normalise images in parallel.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from wbc.stain import StainError, StainParams, _check_matrix, _check_rgb, _max_stained_value


@lru_cache(maxsize=8)
def _od_lut(io: int) -> np.ndarray:
    """Optical density -log((v + 1) / io) of each uint8 value v, float32: torchstain's ops (float32
    add, divide, log) give the correctly rounded value here, as this float64 route does."""
    v = (np.arange(256, dtype=np.float32) + 1) / np.float32(io)
    return (-np.log(v.astype(np.float64))).astype(np.float32)


def nearest_rank(n: int, q: float) -> int:
    """torchstain's percentile index (1-based): 1 + round(q / 100 * (n - 1)), within [1, n]."""
    return min(max(1 + round(0.01 * float(q) * (n - 1)), 1), max(n, 1))


@dataclass
class Fit:
    """One image's Macenko estimate: optical density (3, N), stained mask (N,), stained-pixel
    count, stain matrix (3, 2) float32 (H, E) and concentrations (2, N) on it, max_conc (2,)."""

    od: np.ndarray
    stained: np.ndarray
    n_stained: int
    stain_matrix: np.ndarray
    conc: np.ndarray
    max_conc: np.ndarray


def fit(image: np.ndarray, params: StainParams | None = None) -> Fit:
    """Macenko's estimate for one (H, W, 3) uint8 image; raises StainError where `wbc.stain`
    refuses the image (too little stain, near-uniform, degenerate matrix)."""
    params = params or StainParams()
    _check_rgb(image)
    x = np.ascontiguousarray(image).reshape(-1, 3)
    # OD >= beta in every channel: max over channels <= a threshold (OD falls as the value rises)
    stained = np.maximum(np.maximum(x[:, 0], x[:, 1]), x[:, 2]) <= _max_stained_value(params.io, params.beta)
    n = int(np.count_nonzero(stained))
    if n < params.min_stained_pixels:
        raise StainError(f"too little stain ({n} stained pixels < {params.min_stained_pixels})")
    lut = _od_lut(params.io)
    od = np.take(lut, x.T)  # (3, N) float32, channel-first as torchstain's (3, N)
    odh = np.take(lut, x[stained].T)  # (3, n): gathering the stained pixels' values is ~2x cheaper
    cov = _covariance(odh)
    if params.min_od_std > 0:
        spread = float(np.sqrt(max(float(np.trace(cov)), 0.0)))
        if spread < params.min_od_std:
            raise StainError(f"near-uniform image (stain OD spread {spread:.3f} < {params.min_od_std})")
    if not np.isfinite(cov).all():
        raise StainError("Macenko gave a degenerate stain matrix (NaN or zero concentration)")
    he = _stain_vectors(odh, cov, n, params.alpha)
    # least squares on the image's own matrix: torchstain's lstsq, as one pseudo-inverse (float64)
    conc = _mix(np.linalg.pinv(he.astype(np.float64)).astype(np.float32), od)  # (2, N)
    k = nearest_rank(conc.shape[1], 99) - 1
    max_c = np.array([kth_smallest(row, k) for row in conc], np.float32)
    _check_matrix(he.astype(np.float64), max_c.astype(np.float64), params)
    return Fit(od, stained, n, he, conc, max_c)


def kth_smallest(row: np.ndarray, k: int, stride: int = 16) -> np.float32:
    """The k-th smallest (0-based) of a 1-D array, exactly (`np.partition(row, k)[k]`), ~4x faster
    for k near the top (the 99th percentile): a strided sample gives a threshold safely below
    the answer, and only the values above it are partitioned; if the sample misleads (the
    threshold is above the answer), the full partition decides."""
    m = row.size - 1 - k  # how many values lie above the answer
    if m > row.size // 8:
        return np.partition(row, k)[k]
    sample = row[::stride]
    j = max(0, sample.size - 1 - 2 * (m // stride) - 8)  # ~twice the expected count above
    top = row[row >= np.partition(sample, j)[j]]
    if top.size > m:
        return np.partition(top, top.size - 1 - m)[top.size - 1 - m]
    return np.partition(row, k)[k]


def _mix(w: np.ndarray, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """w (K, J) @ x (J, M) -> (K, M) float32, as elementwise passes: a BLAS call on these skinny
    shapes may start its own threads, which fight the caller's (prepare runs one image per thread)."""
    out = np.empty((w.shape[0], x.shape[1]), np.float32) if out is None else out
    tmp = np.empty(x.shape[1], np.float32)
    for i in range(w.shape[0]):
        np.multiply(x[0], w[i, 0], out=out[i])
        for j in range(1, w.shape[1]):
            out[i] += np.multiply(x[j], w[i, j], out=tmp)
    return out


def _covariance(odh: np.ndarray) -> np.ndarray:
    """(3, 3) covariance of the stained ODs (3, n), torchstain's `cov`: centred, ddof 1, float32
    (pairwise sums: closer to the exact value than torchstain's own float32, within 1e-4)."""
    xc = odh - odh.mean(axis=1, keepdims=True)
    cov = np.empty((3, 3), np.float32)
    for i in range(3):
        for j in range(i, 3):
            cov[i, j] = cov[j, i] = (xc[i] * xc[j]).sum()
    return cov / np.float32(odh.shape[1] - 1)


def _stain_vectors(odh: np.ndarray, cov: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """(3, 2) float32 stain matrix, columns (H, E) in torchstain's order. The eigenvectors' signs
    decide where the angles wrap: LAPACK's 3x3 `syevd` (numpy's and torch's CPU eigh) fixes them."""
    _, vecs = np.linalg.eigh(cov)
    vecs = vecs[:, 1:3]  # the two largest eigenvalues' vectors
    proj = _mix(np.ascontiguousarray(vecs.T), odh)  # (2, n)
    phi = np.arctan2(proj[1], proj[0])
    ks = (nearest_rank(n, alpha) - 1, nearest_rank(n, 100 - alpha) - 1)
    lo, hi = np.partition(phi, ks)[list(ks)]
    v_min = vecs @ np.array([np.cos(lo), np.sin(lo)], np.float32)
    v_max = vecs @ np.array([np.cos(hi), np.sin(hi)], np.float32)
    return np.stack([v_min, v_max] if v_min[0] > v_max[0] else [v_max, v_min], axis=1)


class NumpyMacenko:
    """Normalise images onto a template's stain matrix (3, 2) and max concentrations (2,)."""

    def __init__(self, stain_matrix, max_conc, params: StainParams | None = None):
        self.params = params or StainParams()
        self.stain_matrix = np.asarray(stain_matrix, np.float64).reshape(3, 2).astype(np.float32)
        self.max_conc = np.asarray(max_conc, np.float64).reshape(2).astype(np.float32)

    def normalize_with_info(self, image: np.ndarray) -> tuple[np.ndarray, dict]:
        """(H, W, 3) uint8 -> the same on the template's stains, and `StainNormalizer.normalize_with_info`'s
        info. Raises StainError."""
        return self._normalize(image, with_info=True)

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """`normalize_with_info` without the info (what `prepare` needs: a pass over the pixels less)."""
        return self._normalize(image, with_info=False)[0]

    def _normalize(self, image: np.ndarray, with_info: bool) -> tuple[np.ndarray, dict]:
        f = fit(image, self.params)
        c = f.conc
        info = {}
        if with_info:
            negative = (c[0] < 0) | (c[1] < 0)
            info = {"clamped_fraction": float(np.count_nonzero(negative)) / negative.size,
                    "clamped_fraction_stained": float(np.count_nonzero(negative & f.stained)) / max(f.n_stained, 1),
                    "stained_pixels": f.n_stained, "stain_matrix": f.stain_matrix.astype(np.float64),
                    "max_conc": f.max_conc.astype(np.float64)}
        if self.params.clamp:
            np.maximum(c, 0, out=c)
        # torchstain: Io * exp(-HERef @ (C * maxCRef / maxC)), > 255 -> 255, truncated; the scale and
        # the sign folded into one (3, 2) matrix, as in BatchMacenko
        m = -self.stain_matrix * (self.max_conc / f.max_conc)[None, :]
        out = np.empty((c.shape[1], 3), np.float32)  # pixel-major, as the image: no transpose after
        _mix(m, c, out=out.T)
        np.exp(out, out=out)
        out *= np.float32(self.params.io)
        np.minimum(out, 255, out=out)
        if np.isnan(out.sum()):
            raise StainError("Macenko produced NaN (degenerate concentrations)")
        return out.astype(np.uint8).reshape(image.shape), info


def estimate(image: np.ndarray, params: StainParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stain matrix (3, 2) and max concentrations (2,), float64, of one image (a template), as
    `wbc.stain.estimate_stain` gives them from torchstain. Raises StainError."""
    f = fit(image, params)
    return f.stain_matrix.astype(np.float64), f.max_conc.astype(np.float64)
