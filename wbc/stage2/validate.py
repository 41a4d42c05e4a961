"""Validation of Stage-2 heads: confusion matrices accumulated chunk by chunk (memory does not
grow with the validation set), headline metrics from them, and the post-hoc choices (tau
normalisation, logit adjustment) picked on validation.

Predictions are the argmax of `wbc.heads.view_mean_softmax` (softmax of each view's logits,
averaged over the K views), as for a saved head and an ensemble member.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from wbc.heads import TAU_GRID, prior_adjustment, tau_logits, view_mean_softmax
from wbc.metrics import HEADLINE, classification_metrics, per_class

_FROM_PER_CLASS = {"mf1": "f1", "bacc": "recall", "mp": "precision", "mspec": "specificity"}


def headline(y_true, y_pred, num_classes: int) -> dict:
    """MF1, BAcc, MP, MSpec of predictions (wbc.metrics)."""
    m = classification_metrics(y_true, y_pred, num_classes)
    return {k: m[k] for k in HEADLINE}


def headline_from_confusion(cm: np.ndarray) -> dict:
    """The same values as `headline` from a (C, C) confusion matrix (macro over present classes)."""
    pc = per_class(cm)
    present = pc["support"] > 0
    return {k: float(pc[_FROM_PER_CLASS[k]][present].mean()) if present.any() else float("nan")
            for k in HEADLINE}


def _vote(z: torch.Tensor, k: int, num_classes: int) -> torch.Tensor:
    """(b*K, G*C) logits -> (b, G) argmax of the view-averaged softmax."""
    return view_mean_softmax(z.reshape(-1, k, z.shape[1] // num_classes, num_classes), view_dim=1).argmax(-1)


def _count(cm: torch.Tensor, y: torch.Tensor, pred: torch.Tensor, num_classes: int) -> None:
    """Add (b, G) predictions of labels y (b,) into cm (G, C, C)."""
    g = pred.shape[1]
    idx = (torch.arange(g) * num_classes + y[:, None]) * num_classes + pred
    cm += torch.bincount(idx.reshape(-1), minlength=g * num_classes**2).view(g, num_classes, num_classes)


def val_confusion(source, weight: torch.Tensor, bias: torch.Tensor, n: int, num_classes: int,
                  y_val: torch.Tensor) -> np.ndarray:
    """(G, C, C) confusion matrices of the fused heads in rows :n of weight (M, D), bias (M,)."""
    cm = torch.zeros(n // num_classes, num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for sel, x in source.val_chunks():
            z = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight.t())[:, :n]
            _count(cm, y_val[sel], _vote(z, x.shape[1], num_classes), num_classes)
    return cm.numpy()


@dataclass
class PostHoc:
    """Post-hoc choices for one trained head, and its validation metrics with them."""

    tau: float
    logit_adjust: np.ndarray | None
    metrics: dict


def post_hoc(fits, source, val_labels: np.ndarray, counts: np.ndarray, tau: float | str = 0.0,
             la_tau: float = 0.0) -> list[PostHoc]:
    """Tau-normalisation (a float, or 'auto' = best validation MF1 over TAU_GRID, the smallest
    tau on ties) and logit adjustment by the training prior (la_tau * -log prior; 0 = off).

    One matmul per validation chunk for all heads and taus: tau only rescales the per-class
    columns of the bias-free logits (`wbc.heads.tau_logits`).
    """
    c, g = len(counts), len(fits)
    taus = TAU_GRID if tau == "auto" else (float(tau),)
    weight = torch.from_numpy(np.concatenate([f.weight for f in fits]))  # (G*C, D)
    bias = torch.from_numpy(np.concatenate([f.bias for f in fits]))
    adjust = prior_adjustment(counts, la_tau) if la_tau else None
    adjust_all = None if adjust is None else np.tile(adjust, g)
    padded = F.pad(weight, (0, 0, 0, -len(weight) % 16))  # GEMM-friendly row count
    y_val = torch.from_numpy(np.asarray(val_labels, dtype=np.int64))
    cm = torch.zeros(len(taus), g, c, c, dtype=torch.long)
    with torch.no_grad():
        for sel, x in source.val_chunks():
            raw = (x.reshape(-1, x.shape[-1]) @ padded.t())[:, :len(weight)]
            for i, t in enumerate(taus):
                _count(cm[i], y_val[sel], _vote(tau_logits(raw, weight, bias, t, adjust_all), x.shape[1], c), c)
    out = []
    for h in range(g):
        scored = [headline_from_confusion(cm[i, h].numpy()) for i in range(len(taus))]
        best = pick_best([s["mf1"] for s in scored])
        out.append(PostHoc(taus[best], adjust, scored[best]))
    return out


def pick_best(scores: list[float]) -> int:
    """Index of the highest score, the first on ties: a head's tau is the one with the best
    validation MF1, the smallest on ties (as early stopping keeps the earliest epoch on ties)."""
    return max(range(len(scores)), key=lambda i: scores[i])
