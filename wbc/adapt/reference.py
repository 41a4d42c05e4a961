"""What the training data looked like, per ensemble member, from its feature cache (no backbone):
the moments of the training embeddings (for feature alignment), the Mahalanobis model of them
(for `ood_score`) and, on the validation fold, the review thresholds for a stated coverage.

Training rows are the cache's CV rows outside the member's validation fold (the rows its head
was trained on); the validation fold is the checkpoint's own (`checkpoint_fold`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wbc.adapt.align import Moments, moments
from wbc.adapt.mix import source_mix
from wbc.ensemble import Member
from wbc.errors import WbcError
from wbc.fsutil import atomic_write
from wbc.selective import Mahalanobis, ReviewRule, choose_review, fit_mahalanobis

log = logging.getLogger(__name__)


@dataclass
class MemberReference:
    source: Moments  # of every view of every training row
    maha: Mahalanobis
    class_means: np.ndarray  # (C, D) of the view-averaged training embeddings
    val_probs: np.ndarray  # (Nv, C) view-averaged probabilities on the validation fold
    val_ood: np.ndarray  # (Nv,)
    val_rows: np.ndarray  # (Nv,) image-store rows
    val_fold: int
    val_logits: np.ndarray | None = None  # (Nv, K, C): temperature calibration
    val_labels: np.ndarray | None = None
    oof_ood: np.ndarray | None = None  # (Nt,) training cells, each scored by a model fit without its fold
    oof_labels: np.ndarray | None = None
    train_mix: np.ndarray | None = None  # (C,) class frequencies of the training rows (wbc.adapt.mix)


def out_of_fold_ood(feats: np.ndarray, labels: np.ndarray, folds: np.ndarray, num_classes: int) -> np.ndarray | None:
    """Mahalanobis score of each training cell (feats (N, D), view-averaged) under a model fit on
    the other training folds; None with fewer than two folds. In-sample scores would be too small
    (the model was fit on those cells); these are slightly large (fit on one fold less), which
    offsets the optimism of a validation fold that also chose the early-stopping epochs."""
    ks = np.unique(folds)
    if len(ks) < 2:
        return None
    out = np.empty(len(labels))
    for k in ks:
        held = folds == k
        out[held] = fit_mahalanobis(feats[~held], labels[~held], num_classes).score(feats[held])
    return out


def member_reference(member: Member) -> MemberReference:
    """member: an `Ensemble.members` entry with a `cache` (ENSEMBLE.yaml saved with --cache)."""
    from wbc.cache import open_cache
    from wbc.ensemble import view_probs
    from wbc.heads import load_head

    if member.cache is None:
        raise WbcError(f"ensemble member {member.name} has no feature cache: save the ensemble "
                       "with `wbc ensemble save ... --cache CACHE` (the training features are the reference)")
    cache = open_cache(member.cache, checkpoint=member.checkpoint)
    fold = np.asarray(cache.fold)
    val = cache.attrs.get("checkpoint_fold")
    if not isinstance(val, int) or val < 0 or not (fold == val).any():
        raise WbcError(f"{member.cache}: no validation fold of the member's checkpoint "
                       f"(checkpoint_fold {val!r}) among the cache's folds")
    train_rows = np.flatnonzero((fold >= 0) & (fold != val))
    val_rows = np.flatnonzero(fold == val)
    labels = np.asarray(cache.labels)
    tr = cache.read("features", train_rows).astype(np.float32)
    c = len(cache.class_names)
    maha = fit_mahalanobis(tr, labels[train_rows], c)
    avg, y = tr.mean(axis=1), labels[train_rows]
    class_means = np.stack([avg[y == k].mean(0) if (y == k).any() else avg.mean(0) for k in range(c)])
    src = moments(tr)
    del tr
    vf = cache.read("features", val_rows).astype(np.float32)
    if member.head is not None:
        logits = load_head(member.head).logits(vf)
    else:
        logits = cache.read("stage1_logits", val_rows).astype(np.float32)
    oof = out_of_fold_ood(avg, y, fold[train_rows], c)
    return MemberReference(src, maha, class_means, view_probs(logits), maha.score(vf),
                           np.asarray(cache.index)[val_rows], int(val), np.asarray(logits, np.float32),
                           labels[val_rows].astype(np.int64), oof, None if oof is None else y.astype(np.int64),
                           source_mix(y, c))


def review_rule(refs: list[MemberReference], coverage: float) -> tuple[ReviewRule, str]:
    """Thresholds on the ensemble's validation fold when members share it, else on the members'
    own validation folds pooled (fold models: no fold is held out from every member)."""
    same = all(r.val_fold == refs[0].val_fold and np.array_equal(r.val_rows, refs[0].val_rows) for r in refs)
    if same:
        probs = np.mean([r.val_probs for r in refs], axis=0)
        ood = np.mean([r.val_ood for r in refs], axis=0)
        labels = refs[0].val_labels
        how = f"ensemble on validation fold {refs[0].val_fold} ({len(ood)} cells)"
        ood_ref = None
        if all(r.oof_ood is not None for r in refs) and labels is not None:  # same cache rows: same folds
            ood_ref = (np.concatenate([np.mean([r.oof_ood for r in refs], axis=0), ood]),
                       np.concatenate([refs[0].oof_labels, labels]))
            how += f", OOD threshold on {len(ood_ref[0])} cells (training folds out-of-fold + validation)"
    else:
        probs = np.concatenate([r.val_probs for r in refs])
        ood = np.concatenate([r.val_ood for r in refs])
        labels = None if any(r.val_labels is None for r in refs) else np.concatenate([r.val_labels for r in refs])
        how = "members on their own validation folds, pooled (no fold is held out from all members)"
        ood_ref = None
        log.warning("review thresholds: %s", how)
    rule = choose_review(probs.max(axis=1), ood, coverage, labels, ood_reference=ood_ref)
    return rule, how + (", classes weighted equally" if labels is not None else "")


def save_arrays(path: Path, **arrays: np.ndarray) -> Path:
    """An npz of plain arrays (read back with allow_pickle=False), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return path


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise WbcError(f"{path}: not a readable array file ({e})") from None
