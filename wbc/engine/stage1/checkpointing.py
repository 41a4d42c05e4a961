"""Stage-1 checkpoints: write-then-rename saves, metrics.jsonl, and the state a resume needs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from wbc.backbones import CHECKPOINT_FORMAT, load_file
from wbc.errors import WbcError
from wbc.fsutil import atomic_write

log = logging.getLogger(__name__)


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save through `wbc.fsutil.atomic_write`: a full disk or a crash never damages `path`."""
    try:
        with atomic_write(path, "wb") as f:
            torch.save(obj, f)
    except OSError as e:
        raise WbcError(
            f"could not write {path} ({e.strerror or e}); the previous {path.name} is intact: "
            "free disk space and rerun with --resume"
        ) from None


def stage1_dict(
    model: torch.nn.Module, *, timm_name: str, alias: str, class_names: list[str],
    store_content_id: str, store: str, fold: int, config: dict, data_config: dict,
    epoch: int, val: dict | None, complete: bool = False,
) -> dict:
    """The checkpoint dict of docs/ARCHITECTURE.md section 2 (+ store path, val metrics, complete)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "timm_name": timm_name,
        "alias": alias,
        "class_names": list(class_names),
        "store_content_id": store_content_id,
        "store": store,
        "fold": fold,
        "config": config,
        "data_config": data_config,
        "epoch": epoch,
        "val": val,
        "complete": complete,
    }


def load_last(path: Path) -> dict:
    try:
        ckpt = load_file(path, "last.pt")  # weights_only: tensors and plain values, never code
    except WbcError as e:
        raise WbcError(f"{e}; rerun with --overwrite") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "train_state" not in ckpt:
        raise WbcError(f"{path} is not a Stage-1 last.pt; rerun with --overwrite")
    return ckpt


# Stage-1 settings newer than the checkpoint format, with the value older runs implied.
LEGACY_DEFAULTS = {"recipe": "paper"}


def check_resumable(ckpt: dict, config: dict, content_id: str, path: Path) -> None:
    """Refuse to resume under other settings or another store (the result would be neither run)."""
    if ckpt["store_content_id"] != content_id:
        raise WbcError(
            f"{path} was trained on store {ckpt['store_content_id'][:12]}, this store is "
            f"{content_id[:12]}; use the original store or --overwrite"
        )
    # Where the work runs does not change the result's definition.
    free = {"device", "workers"}
    # Settings added after a checkpoint was written mean what that older code did.
    old = {**LEGACY_DEFAULTS, **ckpt["config"]}
    diff = sorted(k for k in set(config) | set(old) if k not in free and config.get(k) != old.get(k))
    if diff:
        pairs = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
        raise WbcError(f"cannot resume {path} with other settings ({pairs}); use the same options or --overwrite")


def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop rows of epochs after the checkpoint being resumed (logged, then interrupted)."""
    if not path.exists():
        return
    rows = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in rows if json.loads(ln)["epoch"] <= epochs_done]
    if len(keep) != len(rows):
        path.write_text("".join(ln + "\n" for ln in keep))
