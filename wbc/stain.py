"""Macenko stain normalisation (torchstain, torch backend), template choice, failure handling.

torchstain's torch `normalize` takes a CHW uint8 tensor and returns the image as **HWC int32**
(values in [0, 255], NaN cast to INT_MIN). Code that permutes that output as if it were CHW gets
a wrong shape, raises, and (if the exception is swallowed) silently keeps the un-normalised
image. Here the output is checked and converted explicitly, and every failure is reported as a
`StainError` with a reason, so callers store the original with `stain_ok=False` and count it.

Two departures from plain torchstain, both recorded in a store's `stain_params`:
- `clamp`: torchstain's unmixing (lstsq on the image's own stain matrix) is unconstrained, so
  pixels off the H-E plane get negative concentrations, which the template's matrix turns into
  cyan/green pixels on other labs' images. Concentrations are clamped at zero (default on).
- failure guards: besides "too little stain", an image whose stained pixels barely vary in optical
  density (uniform grey/dark, near-uniform) or whose H and E vectors come out (nearly) parallel
  has no stain matrix worth the name and is refused (`StainError`), not normalised into noise.
A store made before these fields existed is read with them off (`LEGACY_PARAMS`), so it stays
reproducible.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: `prepare` on the CPU never needs it
    import torch

log = logging.getLogger(__name__)

# Macenko's defaults as in torchstain: transmitted light Io, angle percentile alpha, OD threshold beta.
IO, ALPHA, BETA = 240, 1, 0.15
# Fewer stained pixels than this and the percentiles/eigenvectors are noise (blank or tiny images).
MIN_STAINED_PIXELS = 256
# OD spread of the stained pixels, sqrt(trace(cov)). Real smears: >= 0.25 (PBC-LT 0.51..0.99, JTSC
# 0.26..2.3 over 150 images each); a uniform image gives 0, grey 60 (128) with sd-2 noise 0.06 (0.03).
MIN_OD_STD = 0.1
# Angle between the H and E vectors (real: PBC-LT 16..31 deg, JTSC 13..60 deg). Below this the
# unmixing is ill-conditioned: concentrations blow up and the image turns to noise.
MIN_HE_ANGLE_DEG = 2.0
# What a store's provenance means when it lacks a field (made before the field existed).
LEGACY_PARAMS = {"clamp": False, "min_od_std": 0.0, "min_he_angle_deg": 0.0}


class StainError(Exception):
    """Macenko cannot work on this image (blank, too little stain, tiny, degenerate)."""


@dataclass(frozen=True)
class StainParams:
    io: int = IO
    alpha: float = ALPHA
    beta: float = BETA
    min_stained_pixels: int = MIN_STAINED_PIXELS
    clamp: bool = True  # concentrations >= 0 (torchstain's are unconstrained; see module doc)
    min_od_std: float = MIN_OD_STD  # 0 = no uniform-image guard
    min_he_angle_deg: float = MIN_HE_ANGLE_DEG  # 0 = no parallel-vector guard

    @classmethod
    def from_dict(cls, d: dict | None) -> StainParams:
        """Params as recorded in a store; fields it lacks take their legacy (pre-field) values."""
        return cls(**{**LEGACY_PARAMS, **(d or {})})


def _check_rgb(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")


def _to_hwc(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 numpy -> the same as a tensor (no copy unless needed)."""
    import torch

    image = np.ascontiguousarray(image)
    if not image.flags.writeable:  # PIL-backed arrays are read-only; torch warns on those
        image = image.copy()
    return torch.from_numpy(image)


def _to_chw(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 numpy -> (3, H, W) uint8 tensor, the input torchstain's torch backend wants."""
    return _to_hwc(image).permute(2, 0, 1)


def _max_stained_value(io: float, beta: float) -> int:
    """Largest uint8 value whose optical density -log((v + 1) / io) reaches beta (float32, as
    torchstain computes it); -1 if none."""
    v = np.arange(256, dtype=np.float32)
    ok = -np.log((v + 1) / np.float32(io)) >= np.float32(beta)
    return int(v[ok].max()) if ok.any() else -1


def _stained_mask(image: np.ndarray, params: StainParams) -> np.ndarray:
    """(H, W) bool: the pixels Macenko uses (OD >= beta in every channel). OD falls as the value
    rises, so that is max over channels <= a threshold: an integer test, ~10x cheaper than logs."""
    # three elementwise maxima: numpy's reduce over a length-3 last axis is ~20x slower
    m = np.maximum(np.maximum(image[..., 0], image[..., 1]), image[..., 2])
    return m <= _max_stained_value(params.io, params.beta)


def stained_pixels(image: np.ndarray, params: StainParams = StainParams()) -> int:
    """How many pixels Macenko would use (OD >= beta in every channel)."""
    return int(np.count_nonzero(_stained_mask(image, params)))


def _od_lut(io: float) -> np.ndarray:
    """Optical density of each uint8 value, float32 as torchstain computes it."""
    return -np.log((np.arange(256, dtype=np.float32) + 1) / np.float32(io))


def od_spread(image: np.ndarray, params: StainParams = StainParams()) -> float:
    """sqrt(trace(cov)) of the stained pixels' optical density (0 if fewer than 2): how much stain
    varies. trace(cov) is the sum of per-channel variances, each from a 256-bin histogram."""
    mask = _stained_mask(image, params)
    n = int(np.count_nonzero(mask))
    if n < 2:
        return 0.0
    lut = _od_lut(params.io).astype(np.float64)
    var = 0.0
    for c in range(3):
        h = np.bincount(image[..., c][mask], minlength=256)
        mean = (h * lut).sum() / n
        var += (h * (lut - mean) ** 2).sum() / (n - 1)
    return float(np.sqrt(var))


def he_angle_deg(he: np.ndarray) -> float:
    """Angle (degrees) between the H and E columns of a (3, 2) stain matrix."""
    he = np.asarray(he, dtype=np.float64)
    cos = he[:, 0] @ he[:, 1] / max(np.linalg.norm(he[:, 0]) * np.linalg.norm(he[:, 1]), 1e-12)
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def _guard(image: np.ndarray, params: StainParams) -> int:
    """Refuse images Macenko cannot work on (before running it); returns the stained-pixel count."""
    _check_rgb(image)
    n = stained_pixels(image, params)
    if n < params.min_stained_pixels:
        raise StainError(f"too little stain ({n} stained pixels < {params.min_stained_pixels})")
    if params.min_od_std > 0:
        sd = od_spread(image, params)
        if sd < params.min_od_std:
            raise StainError(f"near-uniform image (stain OD spread {sd:.3f} < {params.min_od_std})")
    return n


def _check_matrix(he: np.ndarray, max_c: np.ndarray, params: StainParams) -> None:
    """The stain matrix and max concentrations one image gave are usable (finite, not parallel)."""
    if not (np.isfinite(he).all() and np.isfinite(max_c).all()) or (max_c <= 1e-6).any():
        raise StainError("Macenko gave a degenerate stain matrix (NaN or zero concentration)")
    ang = he_angle_deg(he)
    if ang < params.min_he_angle_deg:
        raise StainError(f"Macenko gave a degenerate stain matrix (H and E {ang:.1f} deg apart "
                         f"< {params.min_he_angle_deg})")


def estimate_stain(image: np.ndarray, params: StainParams = StainParams()) -> tuple[np.ndarray, np.ndarray]:
    """Macenko stain matrix and max concentrations of one image.

    image: (H, W, 3) uint8 RGB. Returns HE (3, 2) float64 (columns: hematoxylin, eosin unit OD
    vectors) and max_conc (2,) float64 (99th percentile concentrations). Raises StainError.
    """
    _guard(image, params)
    import torchstain  # imports torch: `prepare` on the CPU never gets here (wbc.stain_np)

    n = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    try:
        n.fit(_to_chw(image), Io=params.io, alpha=params.alpha, beta=params.beta)
    except (RuntimeError, IndexError, ValueError) as e:  # kthvalue / linalg errors
        raise StainError(f"Macenko failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}") from None
    he, max_c = n.HERef.double().numpy(), n.maxCRef.double().numpy()
    _check_matrix(he, max_c, params)
    return he, max_c


BACKENDS = ("batched", "torchstain")  # wbc.stain_batch (pure torch, any device) | torchstain per image


class StainNormalizer:
    """Normalise images onto a template's stain matrix and max concentrations (Macenko).

    backend "torchstain": torchstain's own estimate per image (the reference); "batched": what
    `prepare` uses by default, the same result within one grey level: `wbc.stain_np.NumpyMacenko`
    on the CPU (no torch), `wbc.stain_batch.BatchMacenko` on other devices; here one image at a time."""

    def __init__(self, stain_matrix: np.ndarray, max_conc: np.ndarray, params: StainParams = StainParams(),
                 backend: str = "torchstain", device: str = "cpu"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown stain backend {backend!r}; choose from {', '.join(BACKENDS)}")
        self.stain_matrix = np.asarray(stain_matrix, dtype=np.float64).reshape(3, 2)
        self.max_conc = np.asarray(max_conc, dtype=np.float64).reshape(2)
        self.params = params
        self.backend = backend
        self._n = self._batch = None
        if backend == "torchstain":
            import torch
            import torchstain

            self._n = torchstain.normalizers.MacenkoNormalizer(backend="torch")
            self._n.HERef = torch.tensor(self.stain_matrix, dtype=torch.float32)
            self._n.maxCRef = torch.tensor(self.max_conc, dtype=torch.float32)
        elif str(device) == "cpu":  # numpy: no torch import, the same result (`prepare` on a CPU)
            from wbc.stain_np import NumpyMacenko

            self._batch = NumpyMacenko(self.stain_matrix, self.max_conc, params)
        else:
            from wbc.stain_batch import BatchMacenko

            self._batch = BatchMacenko(self.stain_matrix, self.max_conc, params, device)

    @classmethod
    def fit(cls, template: np.ndarray, params: StainParams = StainParams(), backend: str = "torchstain",
            device: str = "cpu") -> StainNormalizer:
        """Fit on a template image (H, W, 3) uint8; raises StainError if it has too little stain."""
        return cls(*estimate_stain(template, params), params=params, backend=backend, device=device)

    @classmethod
    def from_provenance(cls, provenance: dict, device: str = "cpu") -> StainNormalizer:
        """The normaliser a store was prepared with (its `provenance` attribute), same backend
        (stores from before the batched backend: torchstain)."""
        if provenance.get("stain") != "macenko":
            raise ValueError("this store was prepared without stain normalisation (--no-stain)")
        backend = (provenance.get("settings") or {}).get("stain_backend", "torchstain")
        return cls(provenance["stain_matrix"], provenance["max_conc"],
                   StainParams.from_dict(provenance.get("stain_params")), backend=backend, device=device)

    def to_dict(self) -> dict:
        return {"stain_matrix": self.stain_matrix.tolist(), "max_conc": self.max_conc.tolist(),
                "stain_params": asdict(self.params)}

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 RGB on the template's stains. Raises StainError."""
        return self.normalize_with_info(image)[0]

    def normalize_with_info(self, image: np.ndarray) -> tuple[np.ndarray, dict]:
        """`normalize`, plus what happened: info = {clamped_fraction (fraction of pixels whose H or
        E concentration was negative before the clamp, counted whether or not `clamp` is on; the
        near-white background is about half negative by noise), clamped_fraction_stained (the same
        among stained pixels, OD >= beta: off-H&E colour), stained_pixels, stain_matrix (3, 2) and
        max_conc (2,) of the image itself}."""
        if self._batch is not None:
            return self._normalize_batched(image)
        import torch

        n_stained = _guard(image, self.params)
        p = self.params
        try:
            # torchstain's own estimate (stain matrix, concentrations by lstsq on it, their 99th
            # percentiles); its `normalize` hides the concentrations, which the clamp needs.
            he, c, max_c = self._n._TorchMacenkoNormalizer__compute_matrices(_to_chw(image), p.io, p.alpha, p.beta)
        except (RuntimeError, IndexError, ValueError) as e:
            raise StainError(f"Macenko failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}") from None
        _check_matrix(he.double().numpy(), max_c.double().numpy(), p)
        negative = (c < 0).any(dim=0).numpy()
        info = {"clamped_fraction": float(negative.mean()),
                "clamped_fraction_stained": float(negative[_stained_mask(image, p).reshape(-1)].mean()),
                "stained_pixels": n_stained, "stain_matrix": he.double().numpy(),
                "max_conc": max_c.double().numpy()}
        if p.clamp:
            c = c.clamp_min(0)
        # The rest is torchstain's `normalize` op for op (so clamp=False gives its bits exactly).
        c *= (self._n.maxCRef / max_c).unsqueeze(-1)
        out = p.io * torch.exp(-torch.matmul(self._n.HERef, c))
        out[out > 255] = 255
        h, w = image.shape[:2]
        out = out.T.reshape(h, w, 3).int().numpy()
        if out.min() < 0:  # NaN concentrations become INT_MIN after .int()
            raise StainError("Macenko produced NaN (degenerate concentrations)")
        return np.clip(out, 0, 255).astype(np.uint8), info

    def _normalize_batched(self, image: np.ndarray) -> tuple[np.ndarray, dict]:
        _check_rgb(image)
        if not hasattr(self._batch, "device"):  # NumpyMacenko
            return self._batch.normalize_with_info(image)
        r = self._batch.normalize(_to_hwc(image)[None])
        if not bool(r.ok[0]):
            raise StainError(r.reasons[0])
        return r.images[0].cpu().numpy(), r.info(0)


def try_normalize(normalizer: StainNormalizer, image: np.ndarray) -> tuple[np.ndarray, bool, str]:
    """(image, ok, reason): the normalised image, or the original with ok=False and why."""
    out, ok, reason, _ = try_normalize_with_info(normalizer, image)
    return out, ok, reason


def try_normalize_with_info(normalizer: StainNormalizer, image: np.ndarray) -> tuple[np.ndarray, bool, str, dict]:
    """(image, ok, reason, info): as `try_normalize`, with `normalize_with_info`'s info ({} on
    failure)."""
    try:
        out, info = normalizer.normalize_with_info(image)
        return out, True, "", info
    except StainError as e:
        return image, False, str(e), {}


def stain_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (degrees) between corresponding stain vectors, summed over H and E. a, b: (3, 2)."""
    a = a / np.linalg.norm(a, axis=0, keepdims=True)
    b = b / np.linalg.norm(b, axis=0, keepdims=True)
    cos = np.clip((a * b).sum(axis=0), -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)).sum())


def medoid(stain_matrices: Sequence[np.ndarray] | np.ndarray) -> tuple[int, float]:
    """Index of the medoid of M stain matrices (M, 3, 2) under `stain_distance`, and its mean distance."""
    m = np.asarray(stain_matrices, dtype=np.float64)
    if m.ndim != 3 or m.shape[1:] != (3, 2) or len(m) == 0:
        raise ValueError(f"expected (M, 3, 2) stain matrices, got {m.shape}")
    unit = m / np.linalg.norm(m, axis=1, keepdims=True)
    cos = np.clip(np.einsum("icj,kcj->ikj", unit, unit), -1.0, 1.0)  # (M, M, 2)
    d = np.degrees(np.arccos(cos)).sum(axis=2)
    total = d.sum(axis=1)
    i = int(np.argmin(total))
    return i, float(total[i] / max(len(m) - 1, 1))


def preprocess_like_store(source: str | Path | bytes, provenance: dict, zoom: float = 1.0) -> np.ndarray:
    """A new image exactly as `wbc prepare` stored it: decode -> RGB -> the store's Macenko
    template (if any) -> [zoom: rescale the content within its frame, see `zoom_image`] ->
    resize to the store's size. Returns (S, S, 3) uint8.

    source: a file path or the file's bytes; provenance: `ImageStore.provenance`. Raises
    WbcError for unreadable or non-image input; a Macenko failure keeps the image (logged).
    """
    from wbc.errors import WbcError
    from wbc.sources import ImageDecodeError, decode_image, resize_square, zoom_image

    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        rgb, note = decode_image(data)
    except (OSError, ImageDecodeError) as e:
        raise WbcError(f"{source if not isinstance(source, bytes) else '<bytes>'}: {e}") from None
    if not note.startswith("grayscale"):
        rgb, _ = normalise_like(provenance, rgb)
    # Zoom after normalising: Macenko's stain estimate sees the image's own pixels, not padding.
    return resize_square(zoom_image(rgb, zoom), int(provenance["settings"]["size"]))


def normalise_like(provenance: dict, image: np.ndarray) -> tuple[np.ndarray, bool]:
    """Apply a store's stain normalisation to a new image (e.g. for `wbc predict`).

    image: (H, W, 3) uint8 RGB. Returns (image, stain_ok); for a `--no-stain` store the image is
    returned unchanged with stain_ok True; on Macenko failure the original with stain_ok False.
    """
    if provenance.get("stain") != "macenko":
        return image, True
    out, ok, reason = try_normalize(StainNormalizer.from_provenance(provenance), image)
    if not ok:
        log.warning("stain normalisation failed, image kept as is: %s", reason)
    return out, ok
