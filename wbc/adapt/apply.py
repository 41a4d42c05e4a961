"""Score images with a plain or adapted ensemble: probabilities, confidence, ood_score, review.

The predict path (decode -> the store's stain template -> zoom -> resize -> each member's crop,
views, backbone) with the adaptation on top: AdaBN checkpoints (already swapped into the
ensemble's members), feature alignment before the head, target priors after the ensemble mean.
A plain ensemble gets confidence, ood_score and review from its members' caches when they have
them (computed on the fly from the training features, a few seconds); without caches, ood_score
and review are left empty and a warning says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wbc.adapt.bundle import Adaptation, MemberAdaptation, is_adapted, load_adapted
from wbc.errors import WbcError
from wbc.log import progress

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """Per readable image (N): ensemble probs (N, C), confidence, ood_score (or None), review."""

    class_names: list[str]
    paths: list[Path]  # readable images, in input order
    probs: np.ndarray
    member_probs: np.ndarray  # (M, N, C)
    confidence: np.ndarray
    ood: np.ndarray | None
    review: np.ndarray | None
    ok: np.ndarray  # (N_all,) bool
    failed: list[tuple[str, str]] = field(default_factory=list)
    zoom: float = 1.0
    adaptation: Adaptation | None = None


def plain_adaptation(ens, coverage: float = 0.95) -> Adaptation:
    """Identity adaptation with the review rule from the members' caches (if every member has one)."""
    from wbc.adapt.reference import member_reference, review_rule

    if not all(m.cache for m in ens.members):
        log.warning("ensemble members have no feature cache: ood_score and review are left empty "
                    "(save the ensemble with --cache, or run `wbc adapt`)")
        return Adaptation(members=[MemberAdaptation(None, None) for _ in ens.members])
    refs = [member_reference(m) for m in ens.members]
    rule, how = review_rule(refs, coverage)
    return Adaptation(members=[MemberAdaptation(None, r.maha) for r in refs], review=rule,
                      doc={"review": {**rule.to_dict(), "how": how}})


def load_for_scoring(path: str | Path):
    """(Ensemble, Adaptation) from an ADAPTED.yaml or a plain ENSEMBLE.yaml."""
    from wbc.ensemble import load_ensemble

    if is_adapted(path):
        return load_adapted(path)
    ens = load_ensemble(Path(path))
    return ens, plain_adaptation(ens)


def resolve_zoom(zoom: float | str | None, adaptation: Adaptation, ensemble_path, paths) -> float:
    """None = the adapted file's zoom (1 for a plain ensemble); 'auto' = estimated on `paths`."""
    if zoom is None:
        return adaptation.zoom
    if isinstance(zoom, str) and zoom.strip().lower() == "auto":
        from wbc.adapt.pipeline import auto_zoom

        est = auto_zoom(ensemble_path, paths)
        log.info("zoom auto: %.3f (%s; raw %.3f, 90%% interval %.3f-%.3f, %d unmeasurable)",
                 est.zoom, est.reason, est.raw, est.low, est.high, est.n_unmeasured)
        return est.zoom
    from wbc.sources import check_zoom

    try:
        return check_zoom(float(zoom))
    except ValueError:
        raise WbcError(f"--zoom must be a number or 'auto', got {zoom!r}") from None


def member_scores(loaded, images: np.ndarray, views: list[str], device, adapt: MemberAdaptation):
    """loaded: `Member.load()`'s (model, meta, head); images (B, S, S, 3) uint8 -> (probs (B, C),
    ood (B,) or None)."""
    from wbc.embed import embed_views

    model, meta, head = loaded
    feats, stage1 = embed_views(model, images, meta["data_config"], views, device)
    feats = feats.astype(np.float16).astype(np.float32)  # as cached: predict == evaluate
    if adapt.alignment is not None:
        feats = adapt.alignment.apply(feats)
    ood = adapt.maha.score(feats) if adapt.maha is not None else None
    if adapt.prototypes is not None:
        from wbc.adapt.protos import TAU, prototype_probs

        pp = prototype_probs(feats, adapt.prototypes, TAU)
        if not adapt.proto_blend:
            return pp, ood
        return (_head_probs(model, head, feats, stage1, device, adapt) + pp) / 2, ood
    return _head_probs(model, head, feats, stage1, device, adapt), ood


def _head_probs(model, head, feats: np.ndarray, stage1: np.ndarray, device, adapt: MemberAdaptation) -> np.ndarray:
    from wbc.backbones import logits_from_embeddings
    from wbc.ensemble import view_probs

    if head is not None:
        logits = head.logits(feats)
    elif adapt.alignment is not None:
        with torch.inference_mode():
            z = logits_from_embeddings(model, torch.from_numpy(feats).to(device))
        logits = z.float().cpu().numpy()
    else:
        logits = stage1
    return view_probs(logits, adapt.temperature)


def score_images(ens, adaptation: Adaptation, paths: list[Path], zoom: float, batch_size: int = 32,
                 device: str = "auto", desc: str = "predict") -> Scored:
    from wbc.device import resolve_device
    from wbc.stain import preprocess_like_store

    dev = resolve_device(device)
    members = [m.load(dev) for m in ens.members]
    probs: list[list[np.ndarray]] = [[] for _ in members]
    oods: list[list[np.ndarray]] = [[] for _ in members]
    ok = np.zeros(len(paths), bool)
    failed = []
    with progress() as bar:
        task = bar.add_task(desc, total=len(paths), info=f"{len(members)} members")
        for start in range(0, len(paths), batch_size):
            batch = []
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    batch.append(preprocess_like_store(paths[i], ens.provenance, zoom))
                    ok[i] = True
                except WbcError as e:
                    failed.append((str(paths[i]), str(e)))
            if batch:
                imgs = np.stack(batch)
                for j, (m, a) in enumerate(zip(members, adaptation.members)):
                    p, o = member_scores(m, imgs, ens.views, dev, a)
                    probs[j].append(p)
                    oods[j].append(o)
            bar.advance(task, min(batch_size, len(paths) - start))
    c = len(ens.class_names)
    mp = np.stack([np.concatenate(p) if p else np.zeros((0, c)) for p in probs])
    return finish(ens, adaptation, mp, oods, paths, ok, failed, zoom)


def finish(ens, adaptation, member_probs, oods, paths, ok, failed, zoom) -> Scored:
    """Ensemble mean, target priors, confidence, OOD and review from per-member outputs."""
    from wbc.adapt.priors import reweight

    probs = member_probs.mean(axis=0)
    if adaptation.priors is not None and len(probs):
        probs = reweight(probs, *adaptation.priors)
    have_ood = all(o and o[0] is not None for o in oods) and len(probs)
    ood = np.mean([np.concatenate(o) for o in oods], axis=0) if have_ood else None
    conf = probs.max(axis=1) if len(probs) else np.zeros(0)
    review = adaptation.review.flags(conf, ood) if adaptation.review is not None else None
    kept = [p for p, good in zip(paths, ok) if good]
    return Scored(list(ens.class_names), kept, probs, member_probs, conf, ood, review, ok, failed,
                  zoom, adaptation)
