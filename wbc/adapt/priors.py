"""Target class priors by EM on the model's posteriors (Saerens, Latinne & Decaestecker 2002).

A classifier trained under class priors pi_s, applied where the priors are pi_t, has posteriors
p_t(y|x) proportional to p_s(y|x) pi_t(y) / pi_s(y). pi_t is unknown without labels; EM finds it:
E-step re-weights every cell's posterior by pi_t / pi_s, M-step sets pi_t to their mean. Another
lab's set is rarely class-balanced (JTSC is mostly neutrophils) while cRT heads are trained
class-balanced, so pi_s is uniform for them.
"""

from __future__ import annotations

import numpy as np


def reweight(probs: np.ndarray, target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """probs (N, C) under priors `source` -> posteriors under priors `target` (rows sum to 1)."""
    w = np.asarray(target, np.float64) / np.asarray(source, np.float64)
    q = np.asarray(probs, np.float64) * w
    return q / q.sum(axis=1, keepdims=True)


def em_priors(probs: np.ndarray, source: np.ndarray | None = None, iters: int = 100,
              tol: float = 1e-6, floor: float = 1e-3) -> tuple[np.ndarray, int]:
    """Target priors (C,) maximising the likelihood of the unlabelled set, and EM iterations run.

    probs: (N, C) posteriors under `source` priors (None = uniform). floor: no class prior falls
    below it (a class EM drove to zero could never be predicted again, whatever the evidence).
    """
    p = np.asarray(probs, np.float64)
    c = p.shape[1]
    src = np.full(c, 1.0 / c) if source is None else np.asarray(source, np.float64)
    pi = src.copy()
    for it in range(1, iters + 1):
        new = np.maximum(reweight(p, pi, src).mean(axis=0), floor)
        new /= new.sum()
        done = np.abs(new - pi).max() < tol
        pi = new
        if done:
            break
    return pi, it
