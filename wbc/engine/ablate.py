"""`wbc ablate`: a grid of loss settings, every configuration trained at once per fold.

Output (OUT/): ablate.csv and ablate.md (MF1/BAcc/MP/MSpec mean +- std over folds per
configuration, the best MF1 marked), config.yaml, folds/fold{K}.json per finished fold (reused
on a rerun with the same settings, so an interrupted grid resumes), and with save_heads the
heads as heads/<config>/fold{K}/head.pt.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from wbc.config import save_config
from wbc.engine.stage2 import (
    TableCache,
    cache_path,
    grid_key,
    parse_tau,
    prepare_fold,
    resolve_folds,
    run_config,
    stage1_val_metrics,
    train_fold,
)
from wbc.engine.train_heads import TrainConfig
from wbc.errors import WbcError
from wbc.heads import Head
from wbc.losses import LossSpec, check_spec
from wbc.metrics import HEADLINE, mean_std

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
    """The product of the values, without duplicates a loss cannot tell apart (ce ignores beta...)."""
    specs, seen = [], set()
    for name, beta, gamma, lam in itertools.product(losses, betas, gammas, lams):
        s = LossSpec(name, beta, gamma, lam, la_tau)
        check_spec(s)
        if s.key() not in seen:
            seen.add(s.key())
            specs.append(s)
    return specs


@dataclass
class AblateRow:
    label: str
    spec: LossSpec
    mean_std: dict  # metric -> (mean, std)
    per_fold: list[dict]
    best: bool = False


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", label)


def ablate(cache: str | Path, out: Path, specs: list[LossSpec], fold: str | int = "all",
           cfg: TrainConfig | None = None, tau="0", la_tau: float = 0.0, save_heads: bool = False,
           overwrite: bool = False, stream: bool | None = None) -> list[AblateRow]:
    """Train every spec on every fold (one batched pass per fold); rows in the grid's order."""
    cfg = cfg or TrainConfig()
    cfg.check()
    parse_tau(tau)
    if not specs:
        raise WbcError("the ablation grid is empty")
    out = Path(out)
    folds = resolve_folds(cache, fold)
    save_config({**run_config(specs[0], cfg, tau, la_tau, stream), "specs": [s.label() for s in specs],
                 "folds": folds, "cache": str(cache)}, out / "config.yaml")
    tables = TableCache(cache, folds, int(cfg.memory_gb * 2**30))
    per_fold = [_fold(tables, cache, k, out, specs, cfg, tau, la_tau, save_heads, overwrite, stream)
                for k in folds]
    rows = []
    for g, s in enumerate(specs):
        runs = [f["results"][g]["metrics"] for f in per_fold]
        rows.append(AblateRow(s.label(), s, mean_std(runs), [f["results"][g] for f in per_fold]))
    best = max(range(len(rows)), key=lambda i: rows[i].mean_std["mf1"][0])
    rows[best].best = True
    write_tables(rows, out, folds)
    return rows


def _fold(tables, cache, k, out: Path, specs, cfg, tau, la_tau, save_heads, overwrite, stream) -> dict:
    table = tables.get(k)
    key = grid_key(specs, cfg, tau, la_tau, str(table.ids.get("cache_id")), stream)
    path = out / "folds" / f"fold{k}.json"
    if path.exists() and not overwrite:
        done = json.loads(path.read_text())
        if done.get("key") == key:
            log.info("fold %d: finished grid kept (%s)", k, path)
            return done
        raise WbcError(f"{path} holds a grid with other settings or another cache; pass --overwrite "
                       "or choose another --out")
    t0 = time.perf_counter()
    data = prepare_fold(table, k, cfg, stream)
    fits, posts = train_fold(data, specs, cfg, tau, la_tau, desc=f"ablate fold {k} ({len(specs)} heads)")
    seconds = time.perf_counter() - t0
    results = [{"label": s.label(), "best_epoch": f.best_epoch, "tau": p.tau, "metrics": p.metrics}
               for s, f, p in zip(specs, fits, posts)]
    if save_heads:
        for s, f, p in zip(specs, fits, posts):
            config = {**run_config(s, cfg, tau, la_tau, stream), "val_fold": k, "cache": str(cache_path(cache, k))}
            Head(f.weight, f.bias, table.class_names, p.tau, p.logit_adjust, table.ids, config, k).save(
                out / "heads" / _slug(s.label()) / f"fold{k}" / "head.pt")
    record = {"key": key, "fold": k, "seconds": seconds, "results": results,
              "stage1": stage1_val_metrics(table, data.val)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    log.info("fold %d: %d heads in %.1f s", k, len(specs), seconds)
    return record


def fmt(ms: tuple[float, float]) -> str:
    return f"{100 * ms[0]:.2f} ± {100 * ms[1]:.2f}"


def write_tables(rows: list[AblateRow], out: Path, folds: list[int]) -> dict[str, Path]:
    """ablate.csv (fractions) and ablate.md (percent, mean ± std over folds, best marked)."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "ablate.csv", out / "ablate.md"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["loss", "beta", "gamma", "lam", "label", "best"]
                   + [f"{m}_{s}" for m in HEADLINE for s in ("mean", "std")]
                   + ["best_epochs", "taus"])
        for r in rows:
            w.writerow([r.spec.name, r.spec.beta, r.spec.gamma, r.spec.lam, r.label, int(r.best)]
                       + [f"{v:.6f}" for m in HEADLINE for v in r.mean_std[m]]
                       + [" ".join(str(p["best_epoch"]) for p in r.per_fold),
                          " ".join(f"{p['tau']:g}" for p in r.per_fold)])
    lines = [(f"Stage-2 loss ablation, validation folds {folds}: mean ± std over folds (%); "
             "* = best MF1 (the chosen configuration); **bold** = best in its column."), "",
             "| configuration | MF1 | BAcc | MP | MSpec |", "|---|---|---|---|---|"]
    # Bold per column: the MF1-best row is often not the best on BAcc, and a bold row would claim it is.
    tops = {m: max(r.mean_std[m][0] for r in rows) for m in HEADLINE}
    for r in rows:
        cells = [f"**{fmt(r.mean_std[m])}**" if r.mean_std[m][0] == tops[m] else fmt(r.mean_std[m]) for m in HEADLINE]
        lines.append(f"| {'* ' if r.best else ''}{r.label} | " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return {"csv": csv_path, "md": md_path}


def best_row(rows: list[AblateRow]) -> AblateRow:
    return next(r for r in rows if r.best)

