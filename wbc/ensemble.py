"""Ensembles: the ENSEMBLE.yaml format (save/load), its one member type, and eq. 6 over cached
features (the mean over M models x K views of softmax).

A member is a Stage-1 checkpoint with a head, and optionally the feature cache made from that
checkpoint. The head is either the Stage-1 classifier, whose logits the cache already holds
(`stage1_logits`, the "supervised" row), or a Stage-2 head trained on the cached embeddings (the
"decoupled" row). Scoring from caches runs no backbone; `Member.load` gives the backbone for
scoring images (wbc predict, wbc adapt).

ENSEMBLE.yaml (`FORMAT`): class_names, views, the image store (path, content id, provenance: the
stain template new images get) and members (name, checkpoint + sha256, head + sha256, cache);
paths relative to the file, hashes checked on load.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from wbc.config import file_sha256
from wbc.errors import WbcError
from wbc.fsutil import atomic_write

log = logging.getLogger(__name__)

SUPERVISED, DECOUPLED = "supervised", "decoupled"
FORMAT = "wbc.ensemble/1"


@dataclass(frozen=True)
class Member:
    """One model of an ensemble: a feature cache plus the head applied to it (None = Stage 1),
    and (in an ENSEMBLE.yaml) the checkpoint the cache was made from, pinned by its sha256."""

    cache: Path | None
    head: Path | None = None
    checkpoint: Path | None = None
    name: str = ""
    checkpoint_sha256: str = ""
    head_sha256: str = ""

    @property
    def kind(self) -> str:
        return SUPERVISED if self.head is None else DECOUPLED

    def load(self, device="cpu"):
        """(backbone on `device`, checkpoint meta, Head or None): what scoring images needs."""
        from wbc.backbones import load_checkpoint
        from wbc.heads import load_head

        model, meta = load_checkpoint(self.checkpoint, device)
        return model, meta, load_head(self.head) if self.head else None


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


# -- ENSEMBLE.yaml ------------------------------------------------------------------------------
def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(Path(path).resolve(), base.resolve())


def save_ensemble(members: list[str], store_path: Path, views: str, out: Path,
                  caches: list[str | Path] | None = None) -> Path:
    """Write ENSEMBLE.yaml. members: 'CHECKPOINT[:HEAD]' strings. Paths are stored relative to it.

    caches: optional feature cache per member (same order), made from that member's checkpoint
    and this store; recorded as the member's `cache` (needed by `wbc robustness`).
    """
    from wbc.backbones import load_checkpoint
    from wbc.heads import load_head
    from wbc.store import open_store
    from wbc.views import resolve_views

    if not members:
        raise WbcError("no --member given: pass CHECKPOINT[:HEAD] at least once")
    if caches and len(caches) != len(members):
        raise WbcError(f"{len(caches)} --cache for {len(members)} --member: give one cache per member, "
                       "in the same order")
    store = open_store(store_path)
    out = Path(out)
    base = out.parent if str(out.parent) else Path(".")
    entries, classes = [], list(store.class_names)
    for i, text in enumerate(members):
        ckpt, _, head = text.partition(":")
        _, meta = load_checkpoint(ckpt)
        if list(meta["class_names"]) != classes:
            raise WbcError(f"{ckpt}: classes {meta['class_names']} differ from store {store_path}: {classes}")
        if meta.get("store_content_id") != store.content_id:
            raise WbcError(
                f"{ckpt} was trained on store {meta.get('store_content_id')}, not {store_path} "
                f"({store.content_id}): its stain template would not match"
            )
        sha = file_sha256(ckpt)
        entry = {"name": f"{meta.get('alias', meta['timm_name'])}-fold{meta.get('fold')}",
                 "checkpoint": _rel(Path(ckpt), base), "checkpoint_sha256": sha,
                 "head": _rel(Path(head), base) if head else None}
        if head:
            h = load_head(head)
            if list(h.class_names) != classes:
                raise WbcError(f"{head}: classes {list(h.class_names)} differ from {classes}")
            check_head_checkpoint(h.cache.get("checkpoint_sha256"), sha, head, ckpt)
            entry["head_sha256"] = file_sha256(head)  # pinned: a replaced head is refused on load
        if caches:
            entry["cache"] = _rel(_checked_cache(caches[i], ckpt, store), base)
        entries.append(entry)
    doc = {"format": FORMAT, "class_names": classes, "views": resolve_views(views),
           "store": {"path": _rel(Path(store_path), base), "content_id": store.content_id,
                     "provenance": store.provenance}, "members": entries}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        f.write(yaml.safe_dump(doc, sort_keys=False))
    return out


def check_head_checkpoint(trained_on: str | None, sha: str, head, ckpt) -> None:
    """A head only fits the embeddings of the checkpoint whose features it was trained on."""
    if trained_on and trained_on != sha:
        raise WbcError(f"head {head} was trained on features of checkpoint {trained_on[:12]}, but "
                       f"{ckpt} is {sha[:12]}: pair each head with its own fold's checkpoint")


def _checked_cache(cache: str | Path, ckpt: str, store) -> Path:
    """The member's feature cache, refused unless made from its checkpoint and this store."""
    from wbc.cache import open_cache

    open_cache(cache, checkpoint=ckpt, store=store)
    return Path(cache)


@dataclass
class Ensemble:
    class_names: list[str]
    views: list[str]
    provenance: dict  # the image store's: its stain template is applied to new images
    members: list[Member] = field(default_factory=list)  # absolute paths


def load_ensemble(path: Path) -> Ensemble:
    path = Path(path)
    if not path.is_file():
        raise WbcError(f"ensemble file not found: {path}")
    doc = yaml.safe_load(path.read_text()) or {}
    if doc.get("format") != FORMAT:
        raise WbcError(f"{path} is not an ensemble file (format {doc.get('format')!r}, want {FORMAT!r})")
    base = path.parent
    members = []
    for m in doc["members"]:
        ckpt = base / m["checkpoint"]
        if not ckpt.is_file():
            raise WbcError(f"{path}: member checkpoint {ckpt} not found")
        if file_sha256(ckpt) != m["checkpoint_sha256"]:
            raise WbcError(f"{path}: checkpoint {ckpt} changed since the ensemble was saved (sha256 differs)")
        head = base / m["head"] if m.get("head") else None
        if head is not None and m.get("head_sha256"):
            if not head.is_file():
                raise WbcError(f"{path}: member head {head} not found")
            if file_sha256(head) != m["head_sha256"]:
                raise WbcError(f"{path}: head {head} changed since the ensemble was saved (sha256 "
                               "differs); rerun `wbc ensemble save` if the new head is intended")
        members.append(Member(base / m["cache"] if m.get("cache") else None, head, ckpt, m["name"],
                              m["checkpoint_sha256"], m.get("head_sha256") or ""))
    return Ensemble(doc["class_names"], doc["views"], doc["store"]["provenance"], members)
