"""`wbc robustness` of an ADAPTED.yaml (`wbc adapt`): degraded test images through the image path.

A plain ensemble is scored from its members' feature caches (robustness.py). An adapted one cannot
be: its members are AdaBN checkpoints whose features no cache holds, and alignment, prototypes and
target priors act on top. So each degraded test batch goes through `wbc.adapt.apply.member_scores`,
the same function `wbc predict ADAPTED.yaml` uses, with the same seeded degradation as the cache path
(seed = store row): a plain ensemble scored this way gives the cache path's numbers (tested).

The adapted file's zoom is NOT applied: it rescales the target lab's cells onto the training scale,
and the store's own test cells are at that scale already.
"""

from __future__ import annotations

import logging

import numpy as np

from wbc.engine.evaluate.config import RobustnessConfig
from wbc.errors import WbcError
from wbc.folds import TEST
from wbc.log import progress

log = logging.getLogger(__name__)


def test_rows(store, cfg: RobustnessConfig) -> tuple[np.ndarray, np.ndarray]:
    """(every held-out test row, the stratified subset scored), as the cache path chooses them."""
    from wbc.engine.evaluate.robustness import stratified_subset

    folds, labels = np.asarray(store.folds), np.asarray(store.labels)
    all_rows = np.flatnonzero(folds == TEST)
    if len(all_rows) == 0:
        raise WbcError(f"{store.path} has no held-out test rows: run `wbc split` first")
    return all_rows, stratified_subset(all_rows, labels[all_rows], cfg.max_images, cfg.seed)


def _check_store(meta: dict, store, ckpt) -> None:
    if meta.get("store_content_id") != store.content_id:
        raise WbcError(f"{ckpt} was trained on store {meta.get('store_content_id')}, not {store.path} "
                       f"({store.content_id}): score the adapted ensemble on its own training store")


def adapted_probs(ensemble_path, store, degs: list[str], sevs: list[int], cfg: RobustnessConfig):
    """-> (ensemble, row names, {row: {'clean' | (d, s): probs (N, C)}}, rows, every test row, views).
    Rows: each member, then the ensemble (mean, target priors) when there are several members."""
    from wbc.adapt.apply import member_scores
    from wbc.adapt.bundle import load_adapted
    from wbc.adapt.priors import reweight
    from wbc.device import resolve_device
    from wbc.engine.evaluate.external import row_names
    from wbc.engine.evaluate.robustness import Degrader
    from wbc.views import resolve_views

    ens, adaptation = load_adapted(ensemble_path)
    views = resolve_views(cfg.views) if cfg.views else list(ens.views)
    all_rows, rows = test_rows(store, cfg)
    dev = resolve_device(cfg.device)
    he = store.provenance.get("stain_matrix") if store.provenance.get("stain") == "macenko" else None
    keys = ["clean", *[(d, s) for d in degs for s in sevs]]
    names = [f"{n} (adapted)" for n in row_names(ens.members)]
    bs = cfg.batch_size or (32 if dev.type == "cuda" else 8)
    out = {n: {k: [] for k in keys} for n in names}
    if adaptation.zoom != 1.0:
        log.info("%s: its zoom %.3f is for the target's images, not applied to the store's test cells",
                 ensemble_path, adaptation.zoom)
    with progress() as bar:
        for name, member, adapt in zip(names, ens.members, adaptation.members):
            loaded = member.load(dev)
            _check_store(loaded[1], store, member.checkpoint)
            task = bar.add_task("robustness", total=len(keys) * len(rows), info=name)
            for key in keys:
                fn = None if key == "clean" else Degrader(key[0], key[1], he)
                for s in range(0, len(rows), bs):
                    r = rows[s:s + bs]
                    images = store.images(r) if fn is None else fn(store.images(r), r)
                    out[name][key].append(member_scores(loaded, images, views, dev, adapt)[0])
                    bar.advance(task, len(r))
    per_member = {n: {k: np.concatenate(v) for k, v in d.items()} for n, d in out.items()}
    if len(names) > 1 or adaptation.priors is not None:
        ens_name = f"Ensemble ({len(names)} members, adapted)" if len(names) > 1 else names[0]
        mean = {k: np.mean([pm[k] for pm in per_member.values()], axis=0) for k in keys}
        if adaptation.priors is not None:  # after the mean, as predict applies them
            mean = {k: reweight(p, *adaptation.priors) for k, p in mean.items()}
        per_member[ens_name] = mean
    return ens, per_member, rows, all_rows, views
