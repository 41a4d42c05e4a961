"""`wbc crt` and `wbc ablate`: Stage-2 heads per validation fold, from a feature cache.

crt writes OUT/fold{K}/head.pt, config.yaml and metrics.jsonl per fold (a finished fold is kept
and reused when rerun with the same settings). ablate trains a whole grid of loss settings per
fold in one pass and writes OUT/ablate.csv and OUT/ablate.md (mean +- std over folds), keeping
each finished fold in OUT/folds/fold{K}.json so an interrupted grid resumes.
A CACHE path may hold '{fold}' when each fold has its own Stage-1 backbone (and so its own cache).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wbc.config import config_hash, save_config, to_dict
from wbc.engine.feature_source import (
    FeatureTable,
    cv_bytes,
    from_cache,
    make_source,
    preload_cv,
    resident_need,
    split_rows,
)
from wbc.engine.train_heads import HeadFit, TrainConfig, fit_heads
from wbc.engine.validate_heads import PostHoc, headline, post_hoc
from wbc.errors import WbcError
from wbc.heads import Head, load_head, view_mean_softmax

log = logging.getLogger(__name__)


def cache_path(cache: str | Path, fold: int) -> Path:
    return Path(str(cache).replace("{fold}", str(fold)))


def open_table(path: str | Path) -> FeatureTable:
    from wbc.cache import open_cache  # lazy: zarr only when a cache is read

    return from_cache(open_cache(path))


def resolve_folds(cache: str | Path, fold: str | int) -> list[int]:
    """'all' = every CV fold of the cache (of fold 0's cache when CACHE holds '{fold}');
    '0,1' = those folds (e.g. the folds whose Stage-1 runs exist)."""
    if str(fold) != "all":
        from wbc.splits import parse_fold_list

        folds = parse_fold_list(fold, "--fold", " (or 'all')")
        known = open_table(cache_path(cache, folds[0])).folds
        bad = [k for k in folds if k not in known]
        if bad:
            raise WbcError(f"fold {bad[0]} is not in the cache's CV folds ({', '.join(map(str, known)) or 'none'}): "
                           f"{cache_path(cache, folds[0])}")
        return list(dict.fromkeys(folds))
    folds = open_table(cache_path(cache, 0)).folds
    if not folds:
        raise WbcError(f"{cache_path(cache, 0)} has no CV folds (every row is test or unused); "
                       "run `wbc split` and re-extract")
    return folds


class TableCache:
    """Opens each fold's cache; one cache shared by several folds is read into memory once
    (its CV rows) when that and a fold's working set fit in the memory budget."""

    def __init__(self, cache: str | Path, folds: list[int], memory_bytes: int):
        self.cache, self.memory_bytes = cache, memory_bytes
        self.shared = "{fold}" not in str(cache) and len(folds) > 1
        self._table: FeatureTable | None = None

    def get(self, fold: int) -> FeatureTable:
        if not self.shared:
            return open_table(cache_path(self.cache, fold))
        if self._table is None:
            table = open_table(cache_path(self.cache, fold))
            train, val = split_rows(table, fold)
            if cv_bytes(table) + resident_need(table, train, val) <= self.memory_bytes:
                log.info("reading the cache's CV rows into memory once for all folds")
                table = preload_cv(table)
            self._table = table
        return self._table


def stage1_val_metrics(table: FeatureTable, val_rows: np.ndarray) -> dict | None:
    """The Stage-1 head's view-averaged predictions on the validation rows (the cRT baseline)."""
    if table.stage1_logits is None:
        return None
    from wbc.engine.feature_source import read_rows

    logits = read_rows(table.stage1_logits, val_rows, table.rows_per_block, np.float32)
    pred = view_mean_softmax(torch.from_numpy(logits)).argmax(-1).numpy()
    return headline(table.labels[val_rows], pred, len(table.class_names))


@dataclass
class FoldData:
    table: FeatureTable
    train: np.ndarray
    val: np.ndarray
    source: object

    @property
    def counts(self) -> np.ndarray:
        return np.bincount(self.table.labels[self.train], minlength=len(self.table.class_names))


def prepare_fold(table: FeatureTable, fold: int, cfg: TrainConfig, stream: bool | None = None) -> FoldData:
    train, val = split_rows(table, fold)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    source = make_source(table, train, val, int(cfg.memory_gb * 2**30), stream)
    return FoldData(table, train, val, source)


def train_fold(data: FoldData, specs, cfg: TrainConfig, tau="0", la_tau: float = 0.0,
               desc: str = "cRT") -> tuple[list[HeadFit], list[PostHoc]]:
    """Train len(specs) heads on one fold's data and apply the post-hoc choices to each."""
    t = data.table
    _, _, d = t.shape
    y_tr, y_val = t.labels[data.train].astype(np.int64), t.labels[data.val].astype(np.int64)
    fits = fit_heads(data.source, y_tr, y_val, specs, cfg, len(t.class_names), d, desc)
    return fits, post_hoc(fits, data.source, y_val, data.counts, parse_tau(tau), la_tau)


def parse_tau(tau) -> float | str:
    if str(tau) == "auto":
        return "auto"
    try:
        value = float(tau)
    except ValueError:
        raise WbcError(f"--tau must be a number >= 0 or 'auto', got {tau!r}") from None
    if value < 0:
        raise WbcError(f"--tau must be >= 0, got {value:g}")
    return value


def run_config(spec, cfg: TrainConfig, tau, la_tau: float, stream: bool | None = None) -> dict:
    """What a head is a function of (threads only change speed, so they are left out; memory_gb
    and stream decide in-memory vs streamed batches, which mix the same draws differently)."""
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "threads"}
    return {"loss": dataclasses.asdict(spec), "train": train, "tau": str(tau), "logit_adjust": la_tau,
            "stream": stream}


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


def _finished(out_dir: Path, config: dict, cache_id: str, overwrite: bool) -> dict | None:
    """The final record of a finished fold with the same settings, else None (or refuse)."""
    head_path, metrics_path = out_dir / "head.pt", out_dir / "metrics.jsonl"
    if overwrite or not head_path.exists() or not metrics_path.exists():
        return None
    head = load_head(head_path)
    if head.config != json.loads(json.dumps(config)) or head.cache.get("cache_id") != cache_id:
        raise WbcError(f"{out_dir} holds a head trained with other settings or another cache; "
                       "pass --overwrite to replace it or choose another --out")
    lines = metrics_path.read_text().splitlines()
    final = json.loads(lines[-1]) if lines else {}
    return final if final.get("final") else None


def crt(cache: str | Path, out: Path, fold: str | int = "all", spec=None, cfg: TrainConfig | None = None,
        tau="0", la_tau: float = 0.0, overwrite: bool = False, stream: bool | None = None) -> list[FoldRun]:
    """Train one cRT head per validation fold; returns one FoldRun per fold."""
    from wbc.losses import LossSpec, check_spec

    spec, cfg = spec or LossSpec(), cfg or TrainConfig()
    check_spec(spec)
    cfg.check()
    parse_tau(tau)
    runs = []
    folds = resolve_folds(cache, fold)
    tables = TableCache(cache, folds, int(cfg.memory_gb * 2**30))
    for k in folds:
        table = tables.get(k)
        config = {**run_config(spec, cfg, tau, la_tau, stream), "val_fold": k, "cache": str(cache_path(cache, k))}
        fold_dir = Path(out) / f"fold{k}"
        done = _finished(fold_dir, config, table.ids.get("cache_id"), overwrite)
        if done:
            log.info("fold %d: finished head kept (%s)", k, fold_dir / "head.pt")
            runs.append(FoldRun(k, fold_dir / "head.pt", done["best_epoch"], done["tau"], done["metrics"],
                                done.get("stage1"), done["seconds"], resumed=True))
            continue
        runs.append(_crt_fold(table, k, spec, cfg, tau, la_tau, config, fold_dir, stream))
    return runs


def _crt_fold(table, k, spec, cfg, tau, la_tau, config, fold_dir: Path, stream) -> FoldRun:
    t0 = time.perf_counter()
    data = prepare_fold(table, k, cfg, stream)
    (fit,), (ph,) = train_fold(data, [spec], cfg, tau, la_tau, desc=f"cRT fold {k}")
    seconds = time.perf_counter() - t0
    stage1 = stage1_val_metrics(table, data.val)
    head = Head(fit.weight, fit.bias, table.class_names, tau=ph.tau, logit_adjust=ph.logit_adjust,
                cache=table.ids, config=config, fold=k)
    fold_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, fold_dir / "config.yaml")
    final = {"final": True, "best_epoch": fit.best_epoch, "val_mf1_at_best": fit.best_mf1, "tau": ph.tau,
             "logit_adjust": la_tau, "metrics": ph.metrics, "stage1": stage1, "seconds": seconds,
             "train_rows": len(data.train), "val_rows": len(data.val),
             "class_counts": data.counts.tolist()}
    tmp = fold_dir / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(h) + "\n" for h in fit.history) + json.dumps(final) + "\n")
    tmp.replace(fold_dir / "metrics.jsonl")
    head.save(fold_dir / "head.pt")  # last: its presence marks the fold finished
    log.info("fold %d: MF1 %.4f BAcc %.4f (Stage-1 MF1 %s) best epoch %d, tau %g, %.1f s", k,
             ph.metrics["mf1"], ph.metrics["bacc"], f"{stage1['mf1']:.4f}" if stage1 else "n/a",
             fit.best_epoch, ph.tau, seconds)
    return FoldRun(k, fold_dir / "head.pt", fit.best_epoch, ph.tau, ph.metrics, stage1, seconds)


def grid_key(specs, cfg: TrainConfig, tau, la_tau, cache_id: str, stream: bool | None = None) -> str:
    return config_hash({"specs": [to_dict(s) for s in specs], **run_config(specs[0], cfg, tau, la_tau, stream),
                        "cache_id": cache_id})
