"""`wbc ablate`: a grid of loss settings, every configuration trained at once per fold.

Output (OUT/): ablate.csv and ablate.md (MF1/BAcc/MP/MSpec mean +- std over folds per
configuration, the best MF1 marked), config.yaml, folds/fold{K}.json per finished fold (reused
on a rerun with the same settings, so an interrupted grid resumes), and with save_heads the
heads as heads/<config>/fold{K}/head.pt.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path

from wbc.config import config_hash, save_config, to_dict
from wbc.engine.stage2.crt import FoldCaches, stage1_val_metrics
from wbc.errors import WbcError
from wbc.fsutil import atomic_write
from wbc.losses import LossSpec
from wbc.metrics import mean_std
from wbc.report.ablate import AblateRow, write_tables
from wbc.stage2 import HeadConfig
from wbc.stage2.fitting import as_configs, fit

log = logging.getLogger(__name__)


def parse_floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise WbcError(f"--{name} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise WbcError(f"--{name} is empty")
    return values


def grid_specs(losses: list[str], betas, gammas, lams, la_tau: float = 1.0) -> list[LossSpec]:
    """The product of the values, keeping the first of specs that are the same loss (`LossSpec.key`:
    ce ignores beta; with gamma 0 or lam 0 every hybrid is the same CB-CE)."""
    specs, seen = [], set()
    for name, beta, gamma, lam in itertools.product(losses, betas, gammas, lams):
        s = LossSpec(name, beta, gamma, lam, la_tau)
        if s.key() not in seen:
            seen.add(s.key())
            specs.append(s)
    return specs


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", label)


def head_path(out: str | Path, label: str, fold: int) -> Path:
    """Where save_heads writes a configuration's head (label: ablate.csv's `label` column)."""
    return Path(out) / "heads" / _slug(label) / f"fold{fold}" / "head.pt"


def ablate(cache: str | Path, out: str | Path, specs: list[LossSpec], fold: str | int = "all",
           config: HeadConfig | None = None, save_heads: bool = False, overwrite: bool = False) -> list[AblateRow]:
    """Train every loss spec (with `config`'s other settings) on every fold, one batched pass per
    fold; rows in the grid's order. Another grid in the same `out` is refused before anything is
    written."""
    (config,) = as_configs(config or HeadConfig())
    if not specs:
        raise WbcError("the ablation grid is empty")
    out, configs = Path(out), [config.with_loss(s) for s in specs]
    caches = FoldCaches(cache, fold, config.memory_gb)
    keys = {k: grid_key(configs, caches.open(k).cache_id) for k in caches.folds}
    kept = {k: _kept(out / "folds" / f"fold{k}.json", keys[k], overwrite) for k in caches.folds}
    asked = {**configs[0].record(), "specs": [s.label() for s in specs], "folds": caches.folds, "cache": str(cache)}
    save_config(asked, out / "config.yaml")
    per_fold = [kept[k] or _fold(caches, k, out, configs, keys[k], save_heads) for k in caches.folds]
    save_config({**asked, "ran": {f"fold{f['fold']}": f.get("ran") for f in per_fold}}, out / "config.yaml")
    rows = []
    for g, s in enumerate(specs):
        runs = [f["results"][g]["metrics"] for f in per_fold]
        rows.append(AblateRow(s.label(), s, mean_std(runs), [f["results"][g] for f in per_fold]))
    best = max(range(len(rows)), key=lambda i: rows[i].mean_std["mf1"][0])
    rows[best].best = True
    write_tables(rows, out, caches.folds)
    return rows


def grid_key(configs: list[HeadConfig], cache_id: str) -> str:
    """What a fold's grid record is a function of (its losses, the shared settings, the cache)."""
    return config_hash({"specs": [to_dict(c.loss) for c in configs], **configs[0].record(), "cache_id": cache_id})


def _kept(path: Path, key: str, overwrite: bool) -> dict | None:
    """A finished fold's record of this grid, None when it must run; refuses another grid's."""
    if overwrite or not path.exists():
        return None
    done = json.loads(path.read_text())
    if done.get("key") != key:
        raise WbcError(f"{path} holds a grid with other settings or another cache; pass --overwrite "
                       "or choose another --out")
    log.info("fold %d: finished grid kept (%s)", done["fold"], path)
    return done


def _fold(caches: FoldCaches, k: int, out: Path, configs: list[HeadConfig], key: str, save_heads: bool) -> dict:
    data = caches.get(k)
    heads = fit(data, k, configs, desc=f"ablate fold {k} ({len(configs)} heads)")
    results = [{"label": c.loss.label(), "best_epoch": h.training["best_epoch"], "tau": h.tau,
                "metrics": h.training["metrics"]} for c, h in zip(configs, heads)]
    if save_heads:
        for c, h in zip(configs, heads):
            h.save(head_path(out, c.loss.label(), k))
    seconds = heads[0].training["seconds"]
    record = {"key": key, "fold": k, "seconds": seconds, "results": results,
              "stage1": stage1_val_metrics(data, k), "ran": heads[0].training["ran"]}
    path = out / "folds" / f"fold{k}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(json.dumps(record, indent=1))
    log.info("fold %d: %d heads in %.1f s", k, len(configs), seconds)
    return record
