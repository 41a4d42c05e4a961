"""Held-out test + stratified (optionally patient-grouped) K-fold CV, stored in the image store.

fold codes: -1 held-out test, 0..F-1 CV fold, -2 not used (unlabelled rows, kept for prediction).
A source's own `test` split is honoured when present (the `test` fraction is then unused); the
rest is carved by stratified sampling, grouped by `group` (patient) when any row has one, so no
patient appears in two parts. Same inputs and seed -> identical folds.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from wbc import __version__
from wbc.errors import WbcError
from wbc.folds import TEST
from wbc.store import open_store, write_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitConfig:
    test: float = 0.2  # the protocol's 20% held-out test
    folds: int = 5  # 5-fold CV on the rest
    seed: int = 0
    use_source_split: bool = True  # rows the source marks `test` become the held-out test


def _check(cfg: SplitConfig) -> None:
    if not 0.0 < cfg.test < 1.0:
        raise WbcError(f"--test must be a fraction in (0, 1), got {cfg.test}")
    if cfg.folds < 2:
        raise WbcError(f"--folds must be at least 2, got {cfg.folds}")


def _group_keys(groups: list[str]) -> tuple[np.ndarray, bool]:
    """Integer group ids; rows without a group are their own group. Returns (ids, grouped)."""
    grouped = any(groups)
    keys = [g if g else f"\0row{i}" for i, g in enumerate(groups)]
    _, ids = np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)
    return ids, grouped


def _holdout(idx: np.ndarray, y: np.ndarray, g: np.ndarray, grouped: bool, cfg: SplitConfig) -> np.ndarray:
    """Test rows (subset of idx) with about `cfg.test` of each class."""
    if grouped:
        n_splits = max(2, round(1 / cfg.test))
        if len(np.unique(g[idx])) < n_splits:
            raise WbcError(f"only {len(np.unique(g[idx]))} groups (patients): too few to hold out "
                           f"{cfg.test:.0%} by group; lower --test or drop the group column")
        sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=cfg.seed)
        _, test = next(sgkf.split(idx, y[idx], g[idx]))
        return idx[test]
    rng = np.random.default_rng(cfg.seed)
    test = []
    for k in np.unique(y[idx]):
        rows = rng.permutation(idx[y[idx] == k])
        test.append(rows[: round(cfg.test * len(rows))])
    return np.sort(np.concatenate(test))


def _check_class_sizes(y: np.ndarray, class_names: list[str], folds: int) -> None:
    counts = np.bincount(y, minlength=len(class_names))
    small = [(class_names[k], int(c)) for k, c in enumerate(counts) if 0 < c < folds]
    if small:
        desc = ", ".join(f"{n!r} has {c}" for n, c in small)
        raise WbcError(f"{desc} labelled image(s) outside the test set, fewer than --folds {folds} "
                       "(every fold needs one); lower --folds, or merge/drop the class")


def make_split(labels: np.ndarray, groups: list[str], source_splits: list[str],
               class_names: list[str], cfg: SplitConfig = SplitConfig()) -> tuple[np.ndarray, dict]:
    """fold (N,) int8 and a description. labels (N,) int (-1 = unlabelled); groups, source_splits (N,)."""
    _check(cfg)
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    gid, grouped = _group_keys(list(groups))
    fold = np.full(n, -2, dtype=np.int8)
    labelled = np.flatnonzero(y >= 0)
    if len(labelled) == 0:
        raise WbcError("the store has no labelled images to split")
    src = np.asarray([s.strip().lower() for s in source_splits], dtype=object)
    honour = cfg.use_source_split and bool((src[labelled] == "test").any())
    test = labelled[src[labelled] == "test"] if honour else _holdout(labelled, y, gid, grouped, cfg)
    fold[test] = TEST
    pool = np.setdiff1d(labelled, test)
    _check_class_sizes(y[pool], class_names, cfg.folds)
    if grouped:
        kf = StratifiedGroupKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed)
        parts = kf.split(pool, y[pool], gid[pool])
    else:
        parts = StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed).split(pool, y[pool])
    for k, (_, val) in enumerate(parts):
        fold[pool[val]] = k
    leaks = _groups_in_several_parts(fold, gid) if grouped else 0
    if leaks:
        log.warning("%d group(s) (patients) appear in both the source's test split and the CV pool", leaks)
    absent = [class_names[k] for k in np.unique(y[pool]) if not (y[test] == k).any()]
    if absent:
        log.warning("no held-out test image for class(es) %s (too few images)", ", ".join(absent))
    info = {**asdict(cfg), "grouped": grouped, "source_test_used": honour,
            "n_test": len(test), "n_fold": [int((fold == k).sum()) for k in range(cfg.folds)],
            "n_unused": int((fold == -2).sum()), "test_fraction": float(len(test) / len(labelled)),
            "group_leaks": int(leaks), "split_id": hashlib.sha256(fold.tobytes()).hexdigest()[:16],
            "wbc_version": __version__}
    return fold, info


def _groups_in_several_parts(fold: np.ndarray, gid: np.ndarray) -> int:
    used = fold != -2
    part = np.where(fold[used] == TEST, TEST, 0)  # test vs CV pool (CV folds are grouped by construction)
    pairs = np.unique(np.stack([gid[used], part]), axis=1)
    _, counts = np.unique(pairs[0], return_counts=True)
    return int((counts > 1).sum())


def split_store(path: str | Path, cfg: SplitConfig = SplitConfig(), overwrite: bool = False) -> dict:
    """Split the store at `path` in place and return the split description.

    An existing split with the same settings is kept (it is identical); a different one needs
    `overwrite`, since runs trained on the old folds would no longer match the store.
    """
    store = open_store(path)
    fold, info = make_split(store.labels, store.groups, store.source_splits, store.class_names, cfg)
    old = store.split_info
    store.close()
    if old is not None and not overwrite:
        same = all(old.get(k) == v for k, v in asdict(cfg).items())
        if same and old.get("split_id") == info["split_id"]:
            log.info("%s is already split with these settings", path)
            return old
        raise WbcError(f"{path} is already split ({_describe(old)}); pass --overwrite to replace it "
                       "(Stage-1 runs trained on the old folds will no longer match)")
    write_split(path, fold, info)
    log.info("split %s: %d test, folds %s", path, info["n_test"], info["n_fold"])
    return info


def _describe(info: dict) -> str:
    return f"test {info.get('test')}, folds {info.get('folds')}, seed {info.get('seed')}"
