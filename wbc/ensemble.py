"""Members and ensembles over cached features: eq. 6, the mean over M models x K views of softmax.

A member is a (feature cache, head) pair. The head is either the Stage-1 classifier, whose
logits the cache already holds (`stage1_logits`, the "supervised" row), or a Stage-2 head trained
on the cached embeddings (the "decoupled" row). Everything here reads caches; no backbone runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wbc.errors import WbcError

log = logging.getLogger(__name__)

SUPERVISED, DECOUPLED = "supervised", "decoupled"


@dataclass(frozen=True)
class Member:
    """One model of an ensemble: a feature cache plus the head applied to it (None = Stage 1)."""

    cache: Path
    head: Path | None = None

    @property
    def kind(self) -> str:
        return SUPERVISED if self.head is None else DECOUPLED


@dataclass
class MemberOutput:
    """Logits of one member on selected rows. logits: (N, K, C) float32."""

    logits: np.ndarray
    labels: np.ndarray  # (N,) int
    index: np.ndarray  # (N,) row in the image store: members must agree on it
    class_names: list[str]
    store_id: str = ""  # content id of the image store the cache was extracted from


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def view_probs(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax of each view's logits, averaged over views, in float64. (N, K, C) -> (N, C)."""
    from wbc.heads import view_mean_softmax  # the library's one view-averaged softmax (lazy: torch)

    return view_mean_softmax(np.asarray(logits, np.float64), temperature, view_dim=1)


def member_output(member: Member, fold_values: tuple[int, ...] | None = None,
                  group: str | None = None) -> MemberOutput:
    """Logits of `member` on the cache rows whose fold is in `fold_values` (None = all rows).

    group: a named variant group of the cache (e.g. degraded copies of the test images).
    """
    from wbc.cache import open_cache  # lazy: keeps this module importable without zarr loaded

    cache = open_cache(member.cache, group=group)
    fold = np.asarray(cache.fold)
    rows = np.arange(len(fold)) if fold_values is None else np.flatnonzero(np.isin(fold, fold_values))
    if len(rows) == 0:
        raise WbcError(f"{member.cache}: no rows with fold in {list(fold_values or [])}")
    if member.head is None:
        logits = cache.read("stage1_logits", rows).astype(np.float32)
    else:
        from wbc.heads import load_head

        head = load_head(member.head)
        if list(head.class_names) != list(cache.class_names):
            raise WbcError(
                f"head {member.head} classes {list(head.class_names)} differ from cache "
                f"{member.cache} classes {list(cache.class_names)}"
            )
        check_head_matches_cache(head, cache, member)
        logits = head.logits(cache.read("features", rows).astype(np.float32))
    return MemberOutput(
        logits=np.asarray(logits, np.float32),
        labels=np.asarray(cache.labels)[rows].astype(np.int64),
        index=np.asarray(cache.index)[rows].astype(np.int64),
        class_names=list(cache.class_names),
        store_id=str(cache.attrs.get("store_content_id") or ""),
    )


def check_head_matches_cache(head, cache, member: Member) -> None:
    """Refuse a head trained on another cache (stale after re-extraction)."""
    trained_on = getattr(head, "cache", None) or {}
    want = trained_on.get("checkpoint_sha256")
    have = cache.attrs.get("checkpoint_sha256")
    if want and have and want != have:
        raise WbcError(
            f"head {member.head} was trained on features of checkpoint {want[:12]}, but cache "
            f"{member.cache} holds checkpoint {have[:12]}: retrain the head (wbc crt) or pair it "
            "with its own cache"
        )


def check_compatible(outputs: list[MemberOutput], names: list[str]) -> None:
    """Members must share class names and rows (same images in the same order)."""
    ref = outputs[0]
    for out, name in zip(outputs[1:], names[1:]):
        if out.class_names != ref.class_names:
            raise WbcError(f"{name}: classes {out.class_names} differ from {names[0]}: {ref.class_names}")
        if out.store_id and ref.store_id and out.store_id != ref.store_id:
            raise WbcError(
                f"{name} and {names[0]} were extracted from different image stores ({out.store_id[:12]} "
                f"vs {ref.store_id[:12]}): the same row numbers are other images; extract both from one store"
            )
        if out.index.shape != ref.index.shape or not np.array_equal(out.index, ref.index):
            raise WbcError(
                f"{name} and {names[0]} cover different image-store rows; extract every member "
                "from the same image store"
            )


def ensemble_probs(outputs: list[MemberOutput], temperatures: list[float] | None = None) -> np.ndarray:
    """Mean over members of each member's view-averaged softmax. -> (N, C) float64."""
    temps = temperatures or [1.0] * len(outputs)
    return np.mean([view_probs(o.logits, t) for o, t in zip(outputs, temps)], axis=0)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T minimising the NLL of the view-averaged softmax on held-out rows.

    logits: (N, K, C). A 1-D search over log T (grid then refinement): cheap and robust, and it
    never changes the argmax of a single-view member, so accuracy metrics are unaffected.
    """
    labels = np.asarray(labels, np.int64)

    def nll(t: float) -> float:
        p = view_probs(logits, t)[np.arange(len(labels)), labels]
        return float(-np.log(np.clip(p, 1e-12, None)).mean())

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 61))
    best = min(grid, key=nll)
    fine = best * np.exp(np.linspace(-0.1, 0.1, 21))
    return float(min(fine, key=nll))
