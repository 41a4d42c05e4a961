"""`wbc predict`: classify new cells with the full path of an ensemble.

Decode -> RGB -> the training store's Macenko template (or none) -> resize to the store's size ->
per member: its own crop/normalisation, K views, frozen backbone, head -> softmax averaged over
views and members. The same functions as extraction are used, so predictions on an image equal
what `evaluate` computes from the cache for it (to fp16 rounding of cached embeddings).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from wbc.config import file_sha256
from wbc.errors import WbcError
from wbc.fsutil import atomic_write, check_writable, output_lock

log = logging.getLogger(__name__)
FORMAT = "wbc.ensemble/1"
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


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
    provenance: dict
    members: list[dict]  # name, checkpoint (abs Path), head (abs Path | None), cache (abs Path | None)


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
        members.append({**m, "checkpoint": ckpt, "head": head,
                        "cache": base / m["cache"] if m.get("cache") else None})
    return Ensemble(doc["class_names"], doc["views"], doc["store"]["provenance"], members)


def list_images(source: Path) -> tuple[list[Path], list[str | None]]:
    """Image paths (and labels where a CSV gives them) from a folder (recursive) or a CSV."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXT)
        if not paths:
            raise WbcError(f"{source}: no images ({', '.join(sorted(IMAGE_EXT))}) found")
        return paths, [None] * len(paths)
    if source.is_file() and source.suffix.lower() == ".csv":
        from wbc.csvio import read_csv  # UTF-8 with or without BOM; bad lines named

        _, rows = read_csv(source, ("image",))
        if not rows:
            raise WbcError(f"{source}: no rows; a CSV needs an 'image' column (paths relative to the CSV)")
        return [source.parent / r["image"] for _, r in rows], [r.get("label") or None for _, r in rows]
    raise WbcError(f"{source}: give a folder of images or a CSV with an 'image' column")


@dataclass
class PredictResult:
    out: Path
    n_ok: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    failed_path: Path | None = None
    probs: np.ndarray | None = None


def _check_batch(batch_size: int) -> None:
    if batch_size < 1:
        raise WbcError(f"--batch-size must be at least 1, got {batch_size}")


def predict(source: Path, ensemble_path: Path, out: Path, batch_size: int = 32,
            device: str = "auto", zoom: float | str | None = None) -> PredictResult:
    """Classify every image of `source`; write CSV rows image, predicted, confidence, ood_score,
    review, prob_<class>... ensemble_path: ENSEMBLE.yaml or ADAPTED.yaml (`wbc adapt`).
    zoom: rescale each image's content within its frame first (another scanner's magnification);
    'auto' estimates it, None takes the adapted file's (1 for a plain ensemble)."""
    from wbc.adapt.apply import load_for_scoring, resolve_zoom, score_images

    _check_batch(batch_size)
    with output_lock(check_writable(out, "predictions")):  # before hours of compute, not after
        ens, adaptation = load_for_scoring(ensemble_path)
        paths, _labels = list_images(source)
        s = score_images(ens, adaptation, paths, resolve_zoom(zoom, adaptation, ensemble_path, paths),
                         batch_size, device)
        ood = s.ood if s.ood is not None else [None] * len(s.paths)
        review = s.review if s.review is not None else [None] * len(s.paths)
        rows = [(str(n), ens.class_names[int(q.argmax())], f"{c:.4f}", "" if o is None else f"{o:.3f}",
                 "" if r is None else bool(r), *map(float, q))
                for n, q, c, o, r in zip(s.paths, s.probs, s.confidence, ood, review)]
        return _write(out, rows, s.failed, ens.class_names, [s.probs],
                      extra=("confidence", "ood_score", "review"))


def _write(out, rows, failed, class_names, all_probs, extra=()) -> PredictResult:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, newline="") as f:  # a partial CSV is never left under the final name
        w = csv.writer(f)
        w.writerow(["image", "predicted", *extra, *[f"prob_{c}" for c in class_names]])
        w.writerows(rows)
    result = PredictResult(out, len(rows), failed,
                           probs=np.concatenate(all_probs) if all_probs else np.zeros((0, len(class_names))))
    failed_path = out.with_name(out.stem + ".failed.csv")
    failed_path.unlink(missing_ok=True)  # a list from an earlier run must not describe this one
    if failed:
        result.failed_path = failed_path
        with atomic_write(result.failed_path, newline="") as f:
            csv.writer(f).writerows([("image", "reason"), *failed])
        log.warning("%d images could not be read (listed in %s)", len(failed), result.failed_path)
    return result
