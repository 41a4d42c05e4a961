"""Class prototypes re-estimated on the target's own embeddings (nearest-centroid, SHOT-style).

The head's decision boundaries were drawn in the source's feature space; after AdaBN and alignment
the target's classes still sit somewhat apart from where the head expects them. Prototypes fitted
on the target follow them: start from the adapted ensemble's (prior-corrected) posteriors as soft
assignments, take each class's weighted mean of the L2-normalised embeddings, re-assign every cell
to its nearest prototype (cosine) and recompute, `iters` times (Liang et al. 2020, SHOT's
pseudo-labelling, without training the backbone). A class no target cell is assigned to keeps its
source class mean. Probabilities are softmax(cosine / tau).
"""

from __future__ import annotations

import numpy as np

TAU = 0.1  # cosine temperature: the usual value for normalised-embedding classifiers (e.g. CLIP's ~0.01-0.1)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def fit_prototypes(feats: np.ndarray, probs: np.ndarray, source_means: np.ndarray, iters: int = 2,
                   min_mass: float = 1.0) -> np.ndarray:
    """feats: (N, D) or (N, K, D) target embeddings (views averaged); probs: (N, C) soft labels;
    source_means: (C, D) training class means in the same space. -> (C, D) unit prototypes."""
    x = _unit(np.asarray(feats, np.float64).mean(axis=1) if np.ndim(feats) == 3 else np.asarray(feats, np.float64))
    w = np.asarray(probs, np.float64)
    src = _unit(np.asarray(source_means, np.float64))
    cent = src
    for _ in range(iters + 1):
        mass = w.sum(axis=0)
        cent = np.where(mass[:, None] >= min_mass, _unit(w.T @ x / np.maximum(mass, 1e-12)[:, None]), src)
        w = np.eye(len(cent))[(x @ cent.T).argmax(axis=1)]  # hard re-assignment, as SHOT
    return cent


def prototype_probs(feats: np.ndarray, prototypes: np.ndarray, tau: float = TAU) -> np.ndarray:
    """(N, D) or (N, K, D) -> (N, C) softmax over cosine similarities / tau."""
    x = _unit(np.asarray(feats, np.float64).mean(axis=1) if np.ndim(feats) == 3 else np.asarray(feats, np.float64))
    z = x @ prototypes.T / tau
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
