"""Stage-2 heads: the `Head` type (file format: docs/ARCHITECTURE.md section 4), tau-normalisation,
logit adjustment, and the library's one view-averaged softmax.

A head maps one view's embedding (D,) to C logits: z = (W / ||W_j||^tau) x + b + logit_adjust.
Its probability for an image is the softmax of each view's logits, averaged over the K views.
`Head` is plain data: `wbc.stage2.fit` makes heads, `save`/`load` store them, `predict_proba` uses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wbc.errors import WbcError

FORMAT = "wbc.stage2/1"
TAU_GRID = tuple(round(0.1 * i, 1) for i in range(21))  # 0.0 .. 2.0, as in the cRT paper's sweep
ROWS_PER_CHUNK = 4096  # rows of (K, D) features converted to float32 at a time (bounds memory)


def view_mean_softmax(logits, temperature: float = 1.0, view_dim: int = -2):
    """Softmax over classes (the last dim) of each view, averaged over the views.

    logits: (..., K, C) -> (..., C) (`view_dim` names the K axis when it is elsewhere, e.g. 1 for
    the (b, K, G, C) logits of G heads). numpy in, numpy out; torch in, torch out. float64 stays
    float64, anything else is computed in float32. This is eq. 6's per-model term: every head,
    validation vote and ensemble in wbc uses this function.
    """
    is_numpy = isinstance(logits, np.ndarray)
    z = torch.from_numpy(np.ascontiguousarray(logits)) if is_numpy else logits
    if z.dtype != torch.float64:
        z = z.float()
    if temperature != 1.0:
        z = z / temperature
    p = torch.softmax(z, dim=-1).mean(dim=view_dim)
    return p.numpy() if is_numpy else p


def tau_normalise(weight: torch.Tensor | np.ndarray, tau: float) -> torch.Tensor:
    """W_j / ||W_j||^tau per class row (Kang et al. 2020). weight: (C, D) -> (C, D)."""
    w = torch.as_tensor(weight, dtype=torch.float32)
    if tau == 0:
        return w
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12).pow(tau)


def prior_adjustment(counts, tau: float = 1.0) -> np.ndarray:
    """Post-hoc logit adjustment -tau * log prior (Menon et al. 2021). counts: (C,) -> (C,)."""
    n = np.asarray(counts, dtype=np.float64)
    return (-tau * np.log(n / n.sum())).astype(np.float32)


@dataclass
class Head:
    """A trained Stage-2 head. weight: (C, D), bias: (C,), logit_adjust: (C,) or None.

    Provenance: `cache` (ids of the cache it was trained on, `FeatureCache.provenance`), `config`
    (what was asked: `HeadConfig.record()` plus val_fold and cache path), `fold` (its validation
    fold) and `training` (best epoch, validation metrics, per-epoch history, what ran).
    """

    weight: np.ndarray
    bias: np.ndarray
    class_names: list[str]
    tau: float = 0.0
    logit_adjust: np.ndarray | None = None
    cache: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    fold: int = -1
    training: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def label(self) -> str:
        """The loss it was trained with, e.g. 'balanced_softmax' (from its config; '' if unknown)."""
        from wbc.losses import LossSpec

        loss = self.config.get("loss")
        return LossSpec(**loss).label() if isinstance(loss, dict) else ""

    def effective(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W', b') with tau-normalisation and logit adjustment folded in: (C, D), (C,)."""
        w = tau_normalise(self.weight, self.tau)
        b = torch.as_tensor(self.bias, dtype=torch.float32).clone()
        if self.logit_adjust is not None:
            b = b + torch.as_tensor(self.logit_adjust, dtype=torch.float32)
        return w, b

    def logits(self, features) -> np.ndarray:
        """features: (N, K, D) or (N, D), float16/float32 (numpy, torch or zarr) -> (N, K, C) or
        (N, C) float32 logits."""
        d = features.shape[-1]
        if d != self.dim:
            raise WbcError(f"head expects {self.dim}-dim features, got {d}: was it trained on another backbone?")
        w, b = self.effective()
        n = features.shape[0]
        out = []
        for a in range(0, n, ROWS_PER_CHUNK):
            x = torch.as_tensor(np.asarray(features[a: a + ROWS_PER_CHUNK])).float()
            out.append((x @ w.t() + b).numpy())
        return np.concatenate(out) if out else np.zeros((*features.shape[:-1], self.num_classes), np.float32)

    def predict_proba(self, features) -> np.ndarray:
        """features: (N, K, D) -> (N, C), the softmax of each view's logits averaged over views;
        (N, D) (one view) -> (N, C) softmax."""
        z = self.logits(features)
        return view_mean_softmax(z if z.ndim == 3 else z[:, None, :])

    probs = predict_proba  # the name callers written before predict_proba use

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "weight": torch.as_tensor(self.weight, dtype=torch.float32).contiguous(),
            "bias": torch.as_tensor(self.bias, dtype=torch.float32).contiguous(),
            "tau": float(self.tau),
            "logit_adjust": None if self.logit_adjust is None else torch.as_tensor(self.logit_adjust),
            "class_names": list(self.class_names),
            "cache": dict(self.cache),
            "config": dict(self.config),
            "fold": int(self.fold),
            "training": dict(self.training),
        }

    def save(self, path: str | Path) -> Path:
        """Write head.pt atomically (a partial file never replaces a complete one)."""
        from wbc.fsutil import atomic_write

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as f:
            torch.save(self.to_dict(), f)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Head:
        """Read a head.pt written by `save` (weights_only: a file is data, never code); WbcError for
        a missing or foreign file."""
        path = Path(path)
        if not path.is_file():
            raise WbcError(f"head not found: {path}; train it with `wbc crt`")
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
            raise WbcError(f"{path} is not a readable head file ({type(e).__name__}: {e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            fmt = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise WbcError(f"{path} is not a Stage-2 head (format {fmt!r}, expected {FORMAT!r})")
        la = d.get("logit_adjust")
        return cls(
            weight=d["weight"].numpy(),
            bias=d["bias"].numpy(),
            class_names=list(d["class_names"]),
            tau=float(d.get("tau", 0.0)),
            logit_adjust=None if la is None else np.asarray(la, dtype=np.float32),
            cache=dict(d.get("cache", {})),
            config=dict(d.get("config", {})),
            fold=int(d.get("fold", -1)),
            training=dict(d.get("training", {})),
        )


load_head = Head.load  # the function form (wbc.ensemble, the engines)


def tau_logits(raw: torch.Tensor, weight, bias, tau: float, adjust=None) -> torch.Tensor:
    """Logits of the tau-normalised head from its bias-free logits raw = x @ W.T (a column scale:
    no new matmul). raw: (..., C) -> (..., C)."""
    w = torch.as_tensor(weight, dtype=torch.float32)
    scale = w.norm(dim=1).clamp_min(1e-12).pow(-tau) if tau else torch.ones(w.shape[0])
    z = raw * scale + torch.as_tensor(bias, dtype=torch.float32)
    return z if adjust is None else z + torch.as_tensor(adjust, dtype=torch.float32)
