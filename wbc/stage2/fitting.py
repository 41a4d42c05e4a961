"""`fit(cache, fold, configs) -> list[Head]`: Stage 2 on one validation fold, writing nothing.

Configs that share their training settings (`HeadConfig.training_key`) train in one batched
pass of the fused trainer (one sampled batch feeds all heads as one matmul); each head then gets
its post-hoc choices (tau, logit adjustment) on validation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import numpy as np
import torch

from wbc import __version__
from wbc.errors import WbcError
from wbc.heads import Head
from wbc.stage2.config import HeadConfig
from wbc.stage2.trainer import HeadFit, fit_heads
from wbc.stage2.validate import post_hoc


def as_configs(configs) -> list[HeadConfig]:
    """One HeadConfig or a sequence of them; anything else is a one-line WbcError."""
    items = [configs] if isinstance(configs, HeadConfig) else list(configs) if isinstance(configs, Sequence) else None
    if not items or not all(isinstance(c, HeadConfig) for c in items):
        got = type(configs).__name__ if items is None else ", ".join(sorted({type(c).__name__ for c in items})) or "nothing"
        raise WbcError(f"fit needs wbc.stage2.HeadConfig(s) (Stage 2's config), got {got}")
    return items


def _groups(items: list, key: Callable[[object], Hashable]) -> list[list[int]]:
    """Indices of items grouped by key, groups in order of first appearance."""
    out: dict = {}
    for i, item in enumerate(items):
        out.setdefault(key(item), []).append(i)
    return list(out.values())


def fit(cache, fold: int, configs, desc: str = "cRT") -> list[Head]:
    """Train one head per config on `fold`'s training rows, validated on its rows; heads in order.

    cache: a `wbc.cache.FeatureCache` (or a path to one); fold: the validation fold (every other
    CV fold trains); configs: a HeadConfig or a list. Nothing is written: save the heads you keep.
    """
    from wbc.cache import FeatureCache, open_cache  # lazy: zarr only when a cache is read

    configs = as_configs(configs)
    cache = cache if isinstance(cache, FeatureCache) else open_cache(Path(cache))
    split = cache.split(fold)
    heads: list[Head | None] = [None] * len(configs)
    for idx in _groups(configs, HeadConfig.training_key):
        for i, head in zip(idx, _fit_group(split, [configs[i] for i in idx], desc)):
            heads[i] = head
    return heads  # type: ignore[return-value]


def _fit_group(split, configs: list[HeadConfig], desc: str) -> list[Head]:
    """Heads of configs with one training key: one batched pass, then each one's post-hoc choices."""
    lead, cache = configs[0], split.cache
    t0 = time.perf_counter()
    if lead.threads:
        torch.set_num_threads(lead.threads)
    source = split.source(int(lead.memory_gb * 2**30), lead.stream)
    _, _, d = cache.features.shape
    fits = fit_heads(source, split.y_train, split.y_val, [c.loss for c in configs], lead,
                     split.num_classes, d, desc)
    posts: list = [None] * len(configs)
    for sub in _groups(configs, lambda c: (c.tau, c.logit_adjust)):
        c = configs[sub[0]]
        for i, ph in zip(sub, post_hoc([fits[i] for i in sub], source, split.y_val, split.counts,
                                       c.tau, c.logit_adjust)):
            posts[i] = ph
    ran = {"device": "cpu", "dtype": "float32", "features_dtype": str(cache.features.dtype),
           "threads": torch.get_num_threads(), "streamed": source.streamed,
           "resident_mib": round(source.resident_bytes / 2**20, 1), "heads_in_pass": len(configs),
           "torch": torch.__version__.split("+")[0], "wbc": __version__}
    seconds = time.perf_counter() - t0
    return [_head(split, c, f, ph, ran, seconds) for c, f, ph in zip(configs, fits, posts)]


def _head(split, cfg: HeadConfig, fit: HeadFit, ph, ran: dict, seconds: float) -> Head:
    cache = split.cache
    training = {"best_epoch": fit.best_epoch, "val_mf1_at_best": fit.best_mf1, "metrics": ph.metrics,
                "seconds": seconds, "train_rows": len(split.train), "val_rows": len(split.val),
                "class_counts": split.counts.tolist(), "history": fit.history, "ran": ran}
    config = {**cfg.record(), "val_fold": split.fold, "cache": str(cache.path)}
    # Plain JSON values only, so head.pt loads with torch.load(weights_only=True).
    return Head(fit.weight, fit.bias, cache.class_names, tau=ph.tau, logit_adjust=ph.logit_adjust,
                cache=cache.provenance, config=_plain(config), fold=split.fold, training=_plain(training))


def _plain(d: dict) -> dict:
    return json.loads(json.dumps(d, default=lambda o: o.tolist() if isinstance(o, np.ndarray | np.generic) else str(o)))
