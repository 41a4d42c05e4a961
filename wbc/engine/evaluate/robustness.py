"""`wbc robustness`: an ensemble's rows scored on degraded copies of the held-out test images.

For each member (Stage-1 checkpoint, head, and the feature cache made from it) and each
(degradation, severity), the stored test images are degraded with seed = store row and embedded
once, through `extract`'s image hook, into the member's cache under the named group
`degraded.<name>.<severity>` (plus a short id when a subset of rows or views is asked for). A rerun,
or a new Stage-2 head on the same cache, reads them back instead of running the backbone again.
Severity 0 is the clean test set, read from the cache's own rows.

Degradations act on the stored images, i.e. AFTER Macenko normalisation: a stain jitter applied
before it would be largely undone by the normalisation (see wbc/degrade.py). `stain_jitter`
unmixes with the store's template stain matrix (the reference matrix for a --no-stain store).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wbc.cache import group_path, open_cache, open_group, read_attrs
from wbc.degrade import DEGRADATIONS, MAX_SEVERITY, degrade_batch, describe, names
from wbc.engine.evaluate.config import RobustnessConfig
from wbc.ensemble import Member, member_output, view_probs
from wbc.errors import WbcError
from wbc.folds import TEST
from wbc.metrics import classification_metrics
from wbc.report.robustness import summarise, write_robustness_report

log = logging.getLogger(__name__)


@dataclass
class RobustnessResult:
    """records: one dict per (row, degradation, severity) with mf1, bacc, n."""

    rows: list[str]
    records: list[dict]
    summary: list[dict]
    paths: dict[str, Path] = field(default_factory=dict)
    extracted: list[str] = field(default_factory=list)  # "member: group" written this run
    reused: list[str] = field(default_factory=list)  # "member: group" read back
    adapted: bool = False  # an ADAPTED.yaml, scored through the images


class Degrader:
    """extract's image_fn: `degrade_batch` with seed = store row (picklable for loader workers)."""

    def __init__(self, name: str, severity: int, stain_matrix=None):
        self.name, self.severity = name, int(severity)
        self.options = {"stain_matrix": np.asarray(stain_matrix)} if name == "stain_jitter" and stain_matrix is not None else {}

    def __call__(self, images: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return degrade_batch(self.name, images, self.severity, rows, **self.options)


def transform_id(name: str, severity: int) -> str:
    """Provenance of a degraded group; the severity table's hash makes a changed table stale."""
    table = hashlib.sha256(describe().encode()).hexdigest()[:8]
    return f"wbc.degrade:{name}:{severity}:seed=store-row:table={table}"


def resolve_degradations(given) -> list[str]:
    """Names to run (default: all but `none`); an unknown name lists the registered ones."""
    chosen = list(given) if given else [n for n in names() if n != "none"]
    for n in chosen:
        DEGRADATIONS.get(n)
    return list(dict.fromkeys(chosen))


def resolve_severities(given) -> list[int]:
    bad = [s for s in given if not 0 <= int(s) <= MAX_SEVERITY]
    if bad:
        raise WbcError(f"severities must be integers 0..{MAX_SEVERITY}, got {bad}")
    return sorted({int(s) for s in given} - {0})


def stratified_subset(rows: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most n of `rows`, per class in proportion to its count (>= 1 each when n allows), seeded."""
    rows, labels = np.asarray(rows), np.asarray(labels)
    if n <= 0 or n >= len(rows):
        return np.sort(rows)
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / counts.sum()
    take = np.floor(quota).astype(int)
    if n >= len(classes):
        take = np.maximum(take, 1)
    while take.sum() < n:  # largest remainders first, among classes with rows left
        take[np.argmax(np.where(take < counts, quota - take, -np.inf))] += 1
    while take.sum() > n:  # the >= 1 floor overshot: trim the most over-served class
        take[np.argmax(np.where(take > 1, take - quota, -np.inf))] -= 1
    rng = np.random.default_rng(seed)
    pick = [rng.permutation(rows[labels == c])[:t] for c, t in zip(classes, take)]
    return np.sort(np.concatenate(pick))


def group_name(name: str, severity: int, suffix: str = "") -> str:
    return f"degraded.{name}.{severity}" + (f".{suffix}" if suffix else "")


def _suffix(rows: np.ndarray, all_rows: np.ndarray, views: list[str], cache_views: list[str]) -> str:
    """'' for the default extraction (every test row, the cache's views), else a short id of both."""
    if np.array_equal(rows, np.sort(all_rows)) and views == cache_views:
        return ""
    h = hashlib.sha256(np.asarray(rows, np.int64).tobytes() + ",".join(views).encode())
    return h.hexdigest()[:8]


def group_state(cache: Path, group: str, want: dict, rows: np.ndarray) -> str:
    """'absent', 'complete' (reusable), 'resume' (partial, same extraction) or 'stale'."""
    target = cache / group_path(group)
    if not target.is_dir() or not any(target.iterdir()):
        return "absent"
    attrs = read_attrs(target)
    same = all(attrs.get(k) == v for k, v in want.items()) and attrs.get("num_rows") == len(rows)
    if same:
        same = np.array_equal(open_group(cache, group)["index"][:], rows)
    if not same:
        return "stale"
    return "complete" if attrs.get("complete") else "resume"


def plan_members(ens, store, caches: list[Path] | None) -> list[Member]:
    """The ensemble's members with unique names and their caches (`caches` override the file's),
    each cache checked against its checkpoint and the store."""
    from wbc.engine.evaluate.external import row_names

    if caches and len(caches) != len(ens.members):
        raise WbcError(f"{len(caches)} --cache for {len(ens.members)} ensemble members: give one per member")
    plans = []
    for i, (name, m) in enumerate(zip(row_names(ens.members), ens.members)):
        cache = Path(caches[i]) if caches else m.cache
        if cache is None:
            raise WbcError(f"ensemble member {name} has no feature cache: save the ensemble with "
                           "`wbc ensemble save ... --cache CACHE` per member, or pass --cache per member")
        open_cache(cache, checkpoint=m.checkpoint, store=store)
        plans.append(dataclasses.replace(m, name=name, cache=Path(cache)))
    return plans


def choose_rows_and_views(plans: list[Member], cfg: RobustnessConfig, store):
    """(all test rows, chosen rows (sorted), their labels, views, cache views) shared by members."""
    from wbc.views import resolve_views

    caches = [open_cache(p.cache) for p in plans]
    tests = [np.sort(c.index[c.fold == TEST]) for c in caches]
    if len(tests[0]) == 0:
        raise WbcError(f"{plans[0].cache} has no held-out test rows (fold -1)")
    for p, t in zip(plans[1:], tests[1:]):
        if not np.array_equal(t, tests[0]):
            raise WbcError(f"{p.cache} and {plans[0].cache} hold different test rows; extract every "
                           "member from the same image store")
    cache_views = caches[0].views
    views = resolve_views(cfg.views) if cfg.views else cache_views
    for p, c in zip(plans, caches):
        missing = [v for v in views if v not in c.views]
        if missing:
            raise WbcError(f"--views {missing} are not in {p.cache} (views {c.views}): the clean "
                           "point is read from the cache, so choose among its views")
    labels = np.asarray(store.labels)[tests[0]]
    rows = stratified_subset(tests[0], labels, cfg.max_images, cfg.seed)
    return tests[0], rows, np.asarray(store.labels)[rows].astype(np.int64), views, cache_views


def ensure_groups(plans, store, rows, all_rows, views, cache_views, degs, sevs, cfg, result) -> dict:
    """Extract every missing (member, degradation, severity) group; returns {(d, s): group name}."""
    from wbc.engine.extract.run import ExtractConfig, extract

    suffix = _suffix(rows, all_rows, views, cache_views)
    he = store.provenance.get("stain_matrix") if store.provenance.get("stain") == "macenko" else None
    groups = {(d, s): group_name(d, s, suffix) for d in degs for s in sevs}
    total, i = len(plans) * len(groups), 0
    for p in plans:
        for (d, s), g in groups.items():
            i += 1
            want = {"checkpoint_sha256": p.checkpoint_sha256, "store_content_id": store.content_id, "views": views,
                    "image_transform": transform_id(d, s)}
            state = group_state(p.cache, g, want, rows)
            tag = f"{p.name}: {g}"
            if state == "complete":
                log.info("[%d/%d] %s: reused from %s", i, total, tag, p.cache)
                result.reused.append(tag)
                continue
            if state == "stale":
                log.warning("[%d/%d] %s: stale group (other rows, views or table); re-extracting", i, total, tag)
            log.info("[%d/%d] %s: extracting %d images x %d views", i, total, tag, len(rows), len(views))
            ecfg = ExtractConfig(views=",".join(views), batch_size=cfg.batch_size, workers=cfg.workers,
                                 device=cfg.device, amp=cfg.amp, overwrite=state == "stale")
            extract(p.checkpoint, store, p.cache, ecfg, group=g, image_fn=Degrader(d, s, he),
                    image_transform=transform_id(d, s), rows=rows)
            result.extracted.append(tag)
    return groups


def _probs(p: Member, rows: np.ndarray, vidx: list[int], groups: dict) -> dict:
    """View-averaged probabilities (N, C) of one member: key 'clean' and (degradation, severity)."""
    clean = member_output(p, (TEST,))
    pos = {int(r): i for i, r in enumerate(clean.index)}
    out = {"clean": view_probs(clean.logits[[pos[int(r)] for r in rows]][:, vidx])}
    for key, g in groups.items():
        o = member_output(p, None, group=g)
        if not np.array_equal(o.index, rows):
            raise WbcError(f"{p.cache} group {g} holds other rows than asked; rerun to re-extract it")
        out[key] = view_probs(o.logits)
    return out


def robustness(ensemble_path: str | Path, store_path: str | Path, out: str | Path,
               cfg: RobustnessConfig | None = None, caches: list[Path] | None = None) -> RobustnessResult:
    """Score each member and the ensemble per degradation x severity on the held-out test rows of
    `store_path`; write robustness.md/.json/.csv/.png under `out`. caches override the members'."""
    cfg = cfg or RobustnessConfig()
    from wbc.adapt.bundle import is_adapted
    from wbc.ensemble import load_ensemble
    from wbc.store import open_store

    degs, sevs = resolve_degradations(cfg.degradations), resolve_severities(cfg.severities)
    store = open_store(store_path)
    result = RobustnessResult(rows=[], records=[], summary=[])
    if is_adapted(ensemble_path):  # AdaBN members: no cache holds their features; the image path
        from wbc.engine.evaluate.robustness_adapted import adapted_probs

        ens, per_member, rows, all_rows, views = adapted_probs(ensemble_path, store, degs, sevs, cfg)
        result.adapted = True
        groups = {(d, s): None for d in degs for s in sevs}
    else:
        ens = load_ensemble(Path(ensemble_path))
        plans = plan_members(ens, store, caches)
        all_rows, rows, _, views, cache_views = choose_rows_and_views(plans, cfg, store)
        groups = ensure_groups(plans, store, rows, all_rows, views, cache_views, degs, sevs, cfg, result)
        vidx = [cache_views.index(v) for v in views]
        per_member = {p.name: _probs(p, rows, vidx, groups) for p in plans}
        if len(plans) > 1:
            per_member[f"Ensemble ({len(plans)} members)"] = {
                k: np.mean([pm[k] for pm in per_member.values()], axis=0) for k in ["clean", *groups]}
    labels = np.asarray(store.labels)[rows].astype(np.int64)
    c = len(ens.class_names)
    for row, probs in per_member.items():
        clean = _metrics(labels, probs["clean"], c)
        for d in degs:
            result.records.append({"row": row, "degradation": d, "severity": 0, **clean})
            for s in sevs:
                result.records.append({"row": row, "degradation": d, "severity": s,
                                       **_metrics(labels, probs[(d, s)], c)})
    result.rows = list(per_member)
    result.summary = summarise(result.records, result.rows)
    settings = {"ensemble": str(ensemble_path), "store": str(store_path), "n_images": len(rows),
                "n_test": len(all_rows), "views": views, "degradations": degs, "severities": [0, *sevs],
                "max_images": cfg.max_images, "seed": cfg.seed, "class_names": list(ens.class_names),
                "groups": {f"{d}/{s}": g for (d, s), g in groups.items() if g},
                "adapted": result.adapted,
                "stain": store.provenance.get("stain")}
    result.paths = write_robustness_report(result.rows, result.records, result.summary, settings, Path(out))
    return result


def _metrics(labels: np.ndarray, probs: np.ndarray, c: int) -> dict:
    m = classification_metrics(labels, probs.argmax(1), c)
    return {"mf1": m["mf1"], "bacc": m["bacc"], "n": len(labels)}
