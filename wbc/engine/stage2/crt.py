"""`wbc crt`: one Stage-2 head per validation fold, from a feature cache, written to disk.

The heads come from `wbc.stage2.fit`; this module adds the fold loop, resume and the files:
OUT/fold{K}/head.pt, config.yaml (what was asked and what ran) and metrics.jsonl (one line per
epoch, then the final record). A finished fold is kept and reused when rerun with the same
settings. A CACHE path may hold '{fold}' when each fold has its own Stage-1 backbone (and so its
own cache). `wbc ablate` (wbc.engine.stage2.ablate) shares the fold loop's helpers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wbc.cache import FeatureCache, open_cache
from wbc.config import save_config
from wbc.errors import WbcError
from wbc.folds import parse_fold_list, resolve_folds
from wbc.fsutil import atomic_write
from wbc.heads import Head, view_mean_softmax
from wbc.stage2 import HeadConfig
from wbc.stage2.fitting import as_configs, fit
from wbc.stage2.validate import headline

log = logging.getLogger(__name__)


def cache_path(cache: str | Path, fold: int) -> Path:
    return Path(str(cache).replace("{fold}", str(fold)))


class FoldCaches:
    """Each fold's cache, and the folds to run. One cache shared by several folds is read into
    memory once (its CV rows) when that and a fold's working set fit in the memory budget."""

    def __init__(self, cache: str | Path, fold: str | int, memory_gb: float):
        self.cache, self.memory_bytes = cache, int(memory_gb * 2**30)
        # The folds a '{fold}' template has are those of its first fold's cache.
        first = 0 if str(fold) == "all" else parse_fold_list(fold, "--fold", " (or 'all')")[0]
        self._opened: dict[int, FeatureCache] = {}
        known = sorted(int(f) for f in np.unique(self.open(first).fold) if f >= 0)
        self.folds = resolve_folds(fold, known, str(cache_path(cache, first)))
        self.shared = "{fold}" not in str(cache) and len(self.folds) > 1
        self._memory: FeatureCache | None = None

    def open(self, fold: int) -> FeatureCache:
        """The fold's cache, opened (nothing read yet)."""
        key = 0 if "{fold}" not in str(self.cache) else fold
        if key not in self._opened:
            self._opened[key] = open_cache(cache_path(self.cache, fold))
        return self._opened[key]

    def get(self, fold: int) -> FeatureCache:
        """The fold's cache to train on (the shared in-memory copy when there is one)."""
        cache = self.open(fold)
        if not self.shared:
            return cache
        if self._memory is None:
            split = cache.split(fold)
            cv = int((cache.fold >= 0).sum()) * cache.features.shape[1] * cache.features.shape[2] * 2
            if cv + split.resident_bytes() <= self.memory_bytes:
                log.info("reading the cache's CV rows into memory once for all folds")
                cache = cache.in_memory("cv")
            self._memory = cache
        return self._memory


def stage1_val_metrics(cache: FeatureCache, fold: int) -> dict:
    """The Stage-1 head's view-averaged predictions on the validation rows (the cRT baseline)."""
    logits, y = cache.split(fold).data("val", "stage1_logits")
    return headline(y, view_mean_softmax(logits.astype(np.float32)).argmax(-1), len(cache.class_names))


@dataclass
class FoldRun:
    fold: int
    head_path: Path
    best_epoch: int
    tau: float
    metrics: dict
    stage1: dict | None
    seconds: float
    resumed: bool = False


def _finished(out_dir: Path, asked: dict, cache_id: str, overwrite: bool) -> dict | None:
    """The final record of a finished fold with the same settings, else None (or refuse)."""
    head_path, metrics_path = out_dir / "head.pt", out_dir / "metrics.jsonl"
    if overwrite or not head_path.exists() or not metrics_path.exists():
        return None
    head = Head.load(head_path)
    if head.config != json.loads(json.dumps(asked)) or head.cache.get("cache_id") != cache_id:
        raise WbcError(f"{out_dir} holds a head trained with other settings or another cache; "
                       "pass --overwrite to replace it or choose another --out")
    lines = metrics_path.read_text().splitlines()
    final = json.loads(lines[-1]) if lines else {}
    return final if final.get("final") else None


def crt(cache: str | Path, out: str | Path, fold: str | int = "all", config: HeadConfig | None = None,
        overwrite: bool = False) -> list[FoldRun]:
    """Train and write one cRT head per validation fold; returns one FoldRun per fold."""
    (config,) = as_configs(config or HeadConfig())
    caches = FoldCaches(cache, fold, config.memory_gb)
    runs = []
    for k in caches.folds:
        fold_dir = Path(out) / f"fold{k}"
        asked = {**config.record(), "val_fold": k, "cache": str(cache_path(cache, k))}
        done = _finished(fold_dir, asked, caches.open(k).cache_id, overwrite)
        if done:
            log.info("fold %d: finished head kept (%s)", k, fold_dir / "head.pt")
            runs.append(FoldRun(k, fold_dir / "head.pt", done["best_epoch"], done["tau"], done["metrics"],
                                done.get("stage1"), done["seconds"], resumed=True))
            continue
        data = caches.get(k)
        (head,) = fit(data, k, [config], desc=f"cRT fold {k}")
        runs.append(_write_fold(head, stage1_val_metrics(data, k), fold_dir))
    return runs


def _write_fold(head: Head, stage1: dict, fold_dir: Path) -> FoldRun:
    t = head.training
    save_config({**head.config, "ran": t["ran"]}, fold_dir / "config.yaml")
    final = {"final": True, "best_epoch": t["best_epoch"], "val_mf1_at_best": t["val_mf1_at_best"],
             "tau": head.tau, "logit_adjust": head.config["logit_adjust"], "metrics": t["metrics"],
             "stage1": stage1, "seconds": t["seconds"], "train_rows": t["train_rows"],
             "val_rows": t["val_rows"], "class_counts": t["class_counts"]}
    with atomic_write(fold_dir / "metrics.jsonl") as f:
        f.write("".join(json.dumps(h) + "\n" for h in t["history"]) + json.dumps(final) + "\n")
    head.save(fold_dir / "head.pt")  # last: its presence marks the fold finished
    m = t["metrics"]
    log.info("fold %d: MF1 %.4f BAcc %.4f (Stage-1 MF1 %.4f) best epoch %d, tau %g, %.1f s", head.fold,
             m["mf1"], m["bacc"], stage1["mf1"], t["best_epoch"], head.tau, t["seconds"])
    return FoldRun(head.fold, fold_dir / "head.pt", t["best_epoch"], head.tau, m, stage1, t["seconds"])
