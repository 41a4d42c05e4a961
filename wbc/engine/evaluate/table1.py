"""The paper's Table 1 on the held-out test: each fold's model, mean +- std over folds.

Rows: Supervised <b> (Stage-1 logits from the cache) and Decoupled <b> (Stage-2 head) for each
backbone b, then every pairwise ensemble and the ensemble of all (of decoupled members where heads
exist, else supervised). Fold k's row uses fold k's members only; the held-out test rows
(fold == -1) are the same images in every fold's cache, so each row is scored M times on one set.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from wbc.ensemble import (
    Member,
    MemberOutput,
    check_compatible,
    fit_temperature,
    member_output,
    view_probs,
)
from wbc.errors import WbcError
from wbc.folds import TEST
from wbc.metrics import HEADLINE, classification_metrics, expected_calibration_error
from wbc.report.rows import RowResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """One backbone's members, one per fold: caches[k] with heads[k] (heads may be empty)."""

    name: str
    caches: tuple[Path, ...]
    heads: tuple[Path, ...] = ()

    def member(self, k: int, decoupled: bool) -> Member:
        return Member(self.caches[k], self.heads[k] if decoupled else None)


def table_rows(models: list[ModelSpec], ensembles: bool = True) -> list[tuple[str, str, tuple[str, ...], bool]]:
    """(row name, kind, member names, decoupled?) in the paper's order, without repeats: a row whose
    members are the same (cache, head) pairs as an earlier row's scores identically and is left out."""
    rows, seen = [], set()
    for row in _all_rows(models, ensembles):
        key = row_key(models, row[2], row[3])
        if key in seen:
            log.info("%s left out: the same members as an earlier row (identical scores)", row[0])
            continue
        seen.add(key)
        rows.append(row)
    return rows


def row_key(models: list[ModelSpec], members: tuple[str, ...], decoupled: bool) -> frozenset:
    """What a row averages: each distinct (caches, heads) pair with its share of the members (a mean
    of equal members is that member; (2A + B) / 3 is not (A + B) / 2)."""
    by = {m.name: m for m in models}

    def real(paths) -> tuple[Path, ...]:
        return tuple(Path(q).resolve() for q in paths)

    keys = [(real(by[n].caches), real(by[n].heads) if decoupled else ()) for n in members]
    return frozenset((k, Fraction(keys.count(k), len(keys))) for k in set(keys))


def _all_rows(models: list[ModelSpec], ensembles: bool) -> list[tuple[str, str, tuple[str, ...], bool]]:
    rows = [(f"Supervised {m.name}", "supervised", (m.name,), False) for m in models]
    rows += [(f"Decoupled {m.name}", "decoupled", (m.name,), True) for m in models if m.heads]
    decoupled = all(m.heads for m in models)
    names = [m.name for m in models]
    if ensembles and len(models) >= 2:
        prefix = "Ensemble" if decoupled else "Supervised ensemble"
        kind = "ensemble"
        for a, b in itertools.combinations(names, 2):
            rows.append((f"{prefix} {a}+{b}", kind, (a, b), decoupled))
        if len(models) > 2:
            rows.append((f"{prefix} all ({'+'.join(names)})", kind, tuple(names), decoupled))
    return rows


def validate_models(models: list[ModelSpec], folds: list[int]) -> None:
    if not models:
        raise WbcError("no models given: pass at least one --model NAME:CACHE[:HEAD]")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise WbcError(f"model names must be unique, got {names}")
    for m in models:
        if len(m.caches) != len(folds) or (m.heads and len(m.heads) != len(folds)):
            raise WbcError(f"model {m.name}: need one cache (and head) per fold {folds}")
        for p in (*m.caches, *m.heads):
            if not Path(p).exists():
                raise WbcError(f"model {m.name}: {p} does not exist")


def _outputs(models, k, decoupled_names, fold_values, memo):
    """MemberOutput per model name for fold index k (cached in memo)."""
    out = {}
    for m in models:
        dec = m.name in decoupled_names
        key = (m.name, k, dec, fold_values)
        if key not in memo:
            memo[key] = member_output(m.member(k, dec), fold_values)
        out[m.name] = memo[key]
    return out


def evaluate_table(
    models: list[ModelSpec], folds: list[int], calibrate: bool = False, ece_bins: int = 15,
    ensembles: bool = True,
) -> tuple[list[RowResult], list[str]]:
    """Score every Table-1 row on the held-out test for each fold. Returns (rows, class_names)."""
    validate_models(models, folds)
    rows = table_rows(models, ensembles)
    memo: dict = {}
    results = [RowResult(name, kind, members) for name, kind, members, _ in rows]
    class_names: list[str] = []
    for i, k in enumerate(folds):
        for (name, kind, members, dec), res in zip(rows, results):
            decs = set(members) if dec else set()
            test = _outputs([m for m in models if m.name in members], i, decs, (TEST,), memo)
            outs = [test[n] for n in members]
            check_compatible(outs, list(members))
            temps = [1.0] * len(outs)
            if calibrate:
                val = _outputs([m for m in models if m.name in members], i, decs, (k,), memo)
                temps = [fit_temperature(val[n].logits, val[n].labels) for n in members]
            probs = np.mean([view_probs(o.logits, t) for o, t in zip(outs, temps)], axis=0)
            res.folds.append(_score(probs, outs[0], ece_bins, temps))
            res.probs.append(probs.astype(np.float32))
            res.labels, res.index = outs[0].labels, outs[0].index
            cm = res.folds[-1].pop("confusion")
            res.confusion = cm if res.confusion is None else res.confusion + cm
            class_names = outs[0].class_names
    return results, class_names


def _score(probs: np.ndarray, ref: MemberOutput, ece_bins: int, temps: list[float]) -> dict:
    labelled = ref.labels >= 0
    y, p = ref.labels[labelled], probs[labelled].argmax(1)
    m = classification_metrics(y, p, probs.shape[1])
    return {
        **{k: m[k] for k in HEADLINE},
        "acc": m["acc"],
        "ece": expected_calibration_error(probs[labelled], y, ece_bins),
        "f1_per_class": m["per_class"]["f1"].tolist(),
        "absent": m["absent"].tolist(),
        "temperatures": temps,
        "n": int(labelled.sum()),
        "confusion": m["confusion"],
    }
