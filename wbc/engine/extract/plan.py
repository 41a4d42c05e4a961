"""Checks and planning before extraction: which checkpoint, which rows, and create-or-resume.

Everything here refuses bad input with a WbcError before any image is embedded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wbc.cache import create_cache, group_path, open_group, read_attrs
from wbc.errors import WbcError

log = logging.getLogger(__name__)

# Attributes that define what a partial cache holds: resuming needs all of them equal.
RESUME_KEYS = ("checkpoint_sha256", "store_content_id", "views", "num_rows", "dim", "image_transform")


def _short(x: str | None) -> str:
    return (x or "none")[:12]


def resolve_checkpoint(source: str | Path) -> Path:
    """best.pt itself, a fold directory holding it, or a run root with exactly one fold*/best.pt."""
    p = Path(source)
    if p.is_file():
        return p
    if not p.exists():
        raise WbcError(f"{p} not found: give a Stage-1 checkpoint (best.pt), a fold directory or a run")
    if (p / "best.pt").is_file():
        return p / "best.pt"
    found = sorted(p.glob("fold*/best.pt"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise WbcError(f"no best.pt in {p} or its fold*/ directories; train one with `wbc train`")
    folds = ", ".join(f.parent.name for f in found)
    raise WbcError(f"{p} holds {len(found)} folds ({folds}), which is ambiguous: "
                   f"pass one fold directory, e.g. {found[0].parent}")


def check_pairing(meta: dict, store, ckpt: Path, other_store: bool) -> None:
    """The checkpoint's classes must be the store's; its training store must be this one."""
    if list(meta["class_names"]) != list(store.class_names):
        raise WbcError(f"class mismatch: checkpoint {ckpt} has classes {list(meta['class_names'])} "
                       f"but store {store.path} has {list(store.class_names)}")
    if meta.get("store_content_id") != store.content_id and not other_store:
        raise WbcError(
            f"checkpoint {ckpt} was trained on image store {_short(meta.get('store_content_id'))} "
            f"but {store.path} is {_short(store.content_id)}: pass the training store, or "
            "--other-store to embed an external test set"
        )


def row_table(store, rows: Sequence[int] | None, other_store: bool):
    """(rows (N,) int64, labels (N,) int16, fold (N,) int8) for the store rows to extract.

    An unsplit store is allowed only as an external set (other_store): all of it is test (-1),
    unlabelled rows unused (-2).
    """
    n = len(store)
    rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or len(rows) == 0 or rows.min() < 0 or rows.max() >= n:
        raise WbcError(f"rows must be a non-empty list of store rows in [0, {n})")
    if len(np.unique(rows)) != len(rows):
        raise WbcError("rows repeat: each store row may be extracted once")
    labels = np.asarray(store.labels)[rows].astype(np.int16)
    if store.is_split:
        fold = np.asarray(store.folds)[rows]
    elif other_store:
        fold = np.where(labels >= 0, -1, -2)
    else:
        fold = store.folds  # raises the store's "run wbc split" error
    return rows, labels, np.asarray(fold, dtype=np.int8)


def prepare_output(out: Path, group: str | None, attrs: dict, shape: tuple[int, int, int, int],
                   rows: np.ndarray, labels: np.ndarray, fold: np.ndarray, chunk_rows: int,
                   overwrite: bool) -> None:
    """Create the cache (or named group), or check that a partial one holds the same extraction."""
    gp = group_path(group)
    target = out / gp if gp else out
    root = read_attrs(out) if group else {}
    if root.get("format") and root.get("checkpoint_sha256") != attrs["checkpoint_sha256"]:
        raise WbcError(f"{out} holds features of checkpoint {_short(root.get('checkpoint_sha256'))}, "
                       f"not {_short(attrs['checkpoint_sha256'])}: write the group into that "
                       "checkpoint's own cache")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        old = open_group(out, group).attrs.asdict()
        if old.get("complete"):
            raise WbcError(f"{target} is already a complete cache; pass --overwrite to re-extract it")
        new = {**attrs, "num_rows": shape[0], "dim": shape[2]}
        diff = [k for k in RESUME_KEYS if old.get(k) != new.get(k)]
        if chunk_rows and old.get("rows_per_chunk") != chunk_rows:
            diff.append("rows_per_chunk")
        if not diff and not np.array_equal(open_group(out, group)["index"][:], rows):
            diff.append("index")
        if diff:
            raise WbcError(f"{target} is a partial cache of a different extraction (differs in "
                           f"{', '.join(diff)}); pass --overwrite to replace it")
        return
    n, k, d, c = shape
    create_cache(out, n, k, d, c, attrs, chunk_rows=chunk_rows or None, group=group,
                 labels=labels, index=rows, fold=fold, overwrite=overwrite)
