"""Feature alignment on embeddings: map target embeddings onto the source training embeddings'
statistics before the head, from features only (no backbone pass).

- `meanstd`: per dimension, x' = (x - mu_t) / sd_t * sd_s + mu_s.
- `coral`: CORAL (Sun et al. 2016) in closed form: whiten with the target covariance, colour
  with the source's, x' = (x - mu_t) C_t^{-1/2} C_s^{1/2} + mu_s. Both covariances are shrunk
  towards their diagonal (`shrink`): a few hundred target cells x 8 views do not pin down
  D x D entries, and an unshrunk inverse square root amplifies the noise directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("meanstd", "coral")
EPS = 1e-6  # floor on a standard deviation (dead ReLU dimensions have none)


@dataclass
class Moments:
    """mean (D,), std (D,), cov (D, D) float64 of N embeddings."""

    mean: np.ndarray
    std: np.ndarray
    cov: np.ndarray
    n: int


def moments(feats, chunk: int = 4096, weights: np.ndarray | None = None) -> Moments:
    """Mean, std and covariance of (N, D) or (N, K, D) embeddings (every view is a sample),
    accumulated in float64 over row chunks (a cache need not fit in memory as float64).
    weights (N,): per row (each of its views gets it), e.g. to re-weight a class mix; the
    covariance is then the weighted one with the unbiased (reliability-weights) correction."""
    d = feats.shape[-1]
    k = int(np.prod(feats.shape[1:-1])) if feats.ndim > 2 else 1
    w_all = np.ones(len(feats)) if weights is None else np.asarray(weights, np.float64)
    s, ss, n, sw, sw2 = np.zeros(d), np.zeros((d, d)), 0, 0.0, 0.0
    for a in range(0, len(feats), chunk):
        x = np.asarray(feats[a: a + chunk], np.float64).reshape(-1, d)
        w = np.repeat(w_all[a: a + chunk], k)
        s += w @ x
        ss += (x * w[:, None]).T @ x
        n += len(x)
        sw += w.sum()
        sw2 += (w * w).sum()
    mean = s / sw
    cov = (ss - sw * np.outer(mean, mean)) / max(sw - sw2 / sw, 1e-12)
    return Moments(mean, np.sqrt(np.clip(np.diag(cov), 0, None)), cov, n)


def _shrunk(cov: np.ndarray, shrink: float) -> np.ndarray:
    return (1 - shrink) * cov + shrink * np.diag(np.diag(cov)) + EPS * np.eye(len(cov))


def _sqrtm(c: np.ndarray, inverse: bool = False) -> np.ndarray:
    """Symmetric (inverse) square root of a PSD matrix by eigendecomposition."""
    w, v = np.linalg.eigh(c)
    w = np.clip(w, EPS, None)
    return (v * (w ** (-0.5 if inverse else 0.5))) @ v.T


@dataclass
class Alignment:
    """x' = (x - shift_in) @ matrix + shift_out, or a per-dimension scale when matrix is (D,)."""

    method: str
    matrix: np.ndarray  # (D,) scale for meanstd, (D, D) for coral
    shift_in: np.ndarray  # (D,) target mean
    shift_out: np.ndarray  # (D,) source mean

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(..., D) -> (..., D) float32."""
        z = np.asarray(x, np.float64) - self.shift_in
        z = z * self.matrix if self.matrix.ndim == 1 else z @ self.matrix
        return (z + self.shift_out).astype(np.float32)

    def arrays(self, prefix: str = "align_") -> dict[str, np.ndarray]:
        return {f"{prefix}matrix": self.matrix, f"{prefix}shift_in": self.shift_in,
                f"{prefix}shift_out": self.shift_out}

    @classmethod
    def from_arrays(cls, method: str, a: dict, prefix: str = "align_") -> Alignment:
        return cls(method, a[f"{prefix}matrix"], a[f"{prefix}shift_in"], a[f"{prefix}shift_out"])


def fit_alignment(source: Moments, target: Moments, method: str = "meanstd",
                  shrink: float = 0.1) -> Alignment:
    """The map taking the target's moments onto the source's."""
    if method == "meanstd":
        scale = np.maximum(source.std, EPS) / np.maximum(target.std, EPS)
        return Alignment(method, scale, target.mean.copy(), source.mean.copy())
    if method == "coral":
        m = _sqrtm(_shrunk(target.cov, shrink), inverse=True) @ _sqrtm(_shrunk(source.cov, shrink))
        return Alignment(method, m, target.mean.copy(), source.mean.copy())
    raise ValueError(f"unknown alignment {method!r}; choose from {', '.join(METHODS)}")
