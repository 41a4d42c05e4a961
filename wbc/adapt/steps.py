"""The per-member steps of `wbc adapt`: AdaBN, embedding, alignment, reference, and the priors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from wbc.adapt.align import fit_alignment, moments
from wbc.adapt.mix import mix_weights
from wbc.adapt.reference import member_reference, review_rule, save_arrays
from wbc.config import file_sha256
from wbc.ensemble import Member
from wbc.errors import WbcError

log = logging.getLogger(__name__)


def _reusable(path: Path, source: Path, prov: dict) -> dict | None:
    """The provenance of an AdaBN checkpoint at `path` made from `source` with `prov`, else None."""
    if not path.is_file():
        return None
    try:
        from wbc.backbones import load_file

        old = load_file(path).get("adabn") or {}
    except Exception:  # noqa: BLE001 - an unreadable or unsafe leftover is recomputed
        return None
    same = old.get("source_sha256") == file_sha256(source) and all(old.get(k) == v for k, v in prov.items())
    return {k: v for k, v in old.items() if k not in ("source_checkpoint", "source_sha256")} if same else None


def adabn_member(spec: Member, x: np.ndarray, views: list[str], cfg, dev, out: Path, target_id: str,
                 zoom: float = 1.0, ref=None):
    """(model, its checkpoint path, bn provenance) for one member; AdaBN when cfg.bn, on target
    cells weighted to the training class mix when cfg.mix == 'source' (ref: the member's
    reference, for that mix)."""
    from wbc.adapt.bn import bn_layers, reestimate, save_adapted, view_batches
    from wbc.backbones import load_checkpoint

    model, meta = load_checkpoint(spec.checkpoint, dev)
    if not cfg.bn:
        return model, meta, spec.checkpoint, {"enabled": False}
    if not bn_layers(model):
        note = f"{meta['timm_name']} has no BatchNorm layer: AdaBN skipped, source weights kept"
        log.warning("%s: %s", spec.name, note)
        return model, meta, spec.checkpoint, {"enabled": False, "note": note}
    # Images per forward: each gives K views; ~64 crops per batch keeps BN's batch statistics sound.
    per = max(2, min(cfg.batch_size, 64 // max(len(views), 1) or 2))
    mix = cfg.mix == "source" and ref is not None and ref.train_mix is not None
    prov = {"target_id": target_id, "n_images": len(x), "views": list(views), "batch_images": per,
            "zoom": zoom, "mix": "source" if mix else "none", **({"seed": cfg.seed} if mix else {})}
    path = out / f"{spec.name}.adabn.pt"
    reused = _reusable(path, spec.checkpoint, prov)
    if reused is not None:  # the same source, target images, zoom and views: identical statistics
        log.info("%s: AdaBN checkpoint %s reused (same source, target and zoom)", spec.name, path)
        model, meta = load_checkpoint(path, dev)
        return model, meta, path, {"enabled": True, "layers": len(bn_layers(model)), **reused}
    index = None
    if mix:  # a plain pass gives the pseudo-labels, then the statistics of the re-weighted draw
        from wbc.adapt.mix import describe, mix_weights, weighted_draw
        from wbc.ensemble import view_probs

        reestimate(model, view_batches(x, meta["data_config"], views, per, dev))
        feats = embed_all(model, meta, x, views, dev, cfg.batch_size)
        pred = view_probs(member_logits(spec, model, feats, dev)).argmax(1)
        index = weighted_draw(mix_weights(pred, ref.train_mix), cfg.seed)
        prov["mix_of_target"] = describe(pred, ref.train_mix, list(meta["class_names"]))
        model, meta = load_checkpoint(spec.checkpoint, dev)
    prov["n_crops"] = reestimate(model, view_batches(x, meta["data_config"], views, per, dev, index))
    path = save_adapted(spec.checkpoint, model, path, prov)
    log.info("%s: AdaBN on %d images x %d views -> %s", spec.name, len(x), len(views), path)
    return model, meta, path, {"enabled": True, "layers": len(bn_layers(model)), **prov}


def embed_all(model, meta, x: np.ndarray, views, dev, batch_size: int, keep: Path | None = None,
              key: str = "") -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, K, D) float32 embeddings, rounded through float16 as cached.

    keep: an npz where they are kept under `key` (checkpoint sha, target id, zoom, views), so a
    rerun with other alignment / priors / prototype settings costs no backbone pass."""
    from wbc.embed import embed_views

    if keep is not None and keep.is_file():
        with np.load(keep, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return z["feats"].astype(np.float32)
    out = [embed_views(model, x[a: a + batch_size], meta["data_config"], views, dev)[0]
           for a in range(0, len(x), batch_size)]
    feats = np.concatenate(out).astype(np.float16)
    if keep is not None:
        save_arrays(keep, feats=feats, key=np.array(key))
    return feats.astype(np.float32)


def member_logits(spec, model, feats: np.ndarray, dev) -> np.ndarray:
    from wbc.backbones import logits_from_embeddings
    from wbc.heads import load_head

    if spec.head:
        return load_head(spec.head).logits(feats)
    with torch.inference_mode():
        return logits_from_embeddings(model, torch.from_numpy(feats).to(dev)).float().cpu().numpy()


# A target counts as shifted when more than SHIFT_FACTOR times the share an in-domain set would show
# lies beyond the 95th percentile of the validation cells' ood_score (about 5% for a large validation
# fold; more for a small one: `in_domain_share`). Measured with a 488-cell fold (threshold 10.4%,
# BENCHMARKS "crosslab"): clean and stain-jittered PBC-LT 0% (adapting there costs ~2.5 points),
# JPEG q10 19% (adapting: +8), noise 22% (-0.9), blur 36% (+22), JTSC far above.
SHIFT_FACTOR = 2.0


def in_domain_share(n_val: int, q: float = 0.95) -> float:
    """Expected share of new in-domain cells above the q-quantile of n_val validation scores
    (numpy's, at rank q (n - 1), 0-based): (n - q (n - 1)) / (n + 1); exact at integer ranks (the
    order statistic's exceedance is distribution-free), close between them."""
    return (n_val - q * (n_val - 1)) / (n_val + 1)


def measure_shift(ens, x: np.ndarray, cfg, files: Path, target_id: str, zoom: float = 1.0):
    """Share of target cells whose ood_score under the SOURCE model (no AdaBN, no alignment) exceeds
    the in-domain validation 95th percentile, averaged over members. AdaBN and alignment match the
    target's feature statistics to the training set's, and a class-mix change alone moves them:
    on clean, class-balanced PBC-LT test cells they lowered Macro-F1 78.0 -> 65.2 / 60.6. So they
    run only where the target is measurably off the training distribution.

    Returns (step doc, member references). The source embeddings are kept where `adapt_members`
    looks for them, so an unshifted target costs no second backbone pass."""
    from wbc.backbones import load_checkpoint
    from wbc.device import resolve_device

    dev = resolve_device(cfg.device)
    shares, refs = [], []
    for spec in ens.members:
        ref = member_reference(spec)
        refs.append(ref)
        model, meta = load_checkpoint(spec.checkpoint, dev)
        feats = embed_all(model, meta, x, ens.views, dev, cfg.batch_size, files / f"{spec.name}.target.npz",
                          _target_key(spec.checkpoint, target_id, zoom, ens.views, len(x)))
        shares.append(float((ref.maha.score(feats) > np.quantile(ref.val_ood, 0.95)).mean()))
    share = float(np.mean(shares))
    threshold = SHIFT_FACTOR * float(np.mean([in_domain_share(len(r.val_ood)) for r in refs]))
    return ({"enabled": True, "share_beyond_val95": round(share, 4), "threshold": round(threshold, 4),
             "shifted": share > threshold, "members": [round(v, 4) for v in shares]}, refs)


def _target_key(ckpt: Path, target_id: str, zoom: float, views: list[str], n: int) -> str:
    """What the kept target embeddings depend on: checkpoint bytes, target images, zoom, views."""
    return f"{file_sha256(ckpt)}:{target_id}:{zoom}:{','.join(views)}:{n}"


def adapt_members(ens, x: np.ndarray, files: Path, cfg, target_id: str, zoom: float = 1.0, refs=None):
    """Per member: AdaBN, target embeddings, alignment, arrays file. -> (member docs, probs
    (M, N, C), review doc, ood_score (N,) averaged over members). refs: the members' references
    when already read (measure_shift), else read here."""
    from wbc.device import resolve_device
    from wbc.ensemble import fit_temperature, view_probs

    dev = resolve_device(cfg.device)
    docs, probs, oods = [], [], []
    refs = list(refs) if refs is not None else [member_reference(spec) for spec in ens.members]
    for spec, ref in zip(ens.members, refs):
        model, meta, ckpt, bn_doc = adabn_member(spec, x, ens.views, cfg, dev, files, target_id, zoom, ref)
        key = _target_key(ckpt, target_id, zoom, ens.views, len(x))
        feats = embed_all(model, meta, x, ens.views, dev, cfg.batch_size, files / f"{spec.name}.target.npz", key)
        if not np.isfinite(feats).all():
            raise WbcError(f"{spec.name}: non-finite embeddings on the target images")
        arrays = {"src_mean": ref.source.mean, "src_std": ref.source.std,
                  "src_cov": ref.source.cov.astype(np.float32),
                  "maha_whiten": ref.maha.whiten, "maha_centres": ref.maha.centres}
        if cfg.align != "none":
            weights = None
            if cfg.mix == "source" and ref.train_mix is not None:  # pseudo-labels: the model as adapted so far
                pred = view_probs(member_logits(spec, model, feats, dev)).argmax(1)
                weights = mix_weights(pred, ref.train_mix)
            align = fit_alignment(ref.source, moments(feats, weights=weights), cfg.align, cfg.shrink)
            feats = align.apply(feats)
            arrays.update(align.arrays())
        # EM needs calibrated posteriors (Alexandari et al. 2020: "bias-corrected calibration" then
        # EM); the temperature is fitted on the member's source validation fold, never on the target.
        temp = fit_temperature(ref.val_logits, ref.val_labels) if cfg.priors else 1.0
        ref.val_probs = view_probs(ref.val_logits, temp)  # review thresholds on the same probabilities
        probs.append(view_probs(member_logits(spec, model, feats, dev), temp))
        oods.append(ref.maha.score(feats))
        arrays["class_means"] = ref.class_means
        path = save_arrays(files / f"{spec.name}.npz", **arrays)
        docs.append({"name": spec.name, "checkpoint": Path(ckpt), "checkpoint_sha256": file_sha256(ckpt),
                     "arrays": path, "arrays_sha256": file_sha256(path), "bn_doc": bn_doc,
                     "temperature": float(temp),
                     "_feats": feats.mean(axis=1)})
    rule, how = review_rule(refs, cfg.coverage)
    return docs, np.stack(probs), {**rule.to_dict(), "how": how}, np.mean(oods, axis=0)


def fit_member_prototypes(docs: list[dict], probs: np.ndarray) -> tuple[np.ndarray, dict]:
    """Per member, prototypes on its (aligned) target embeddings from the ensemble's soft labels
    `probs` (N, C); stored in the member's arrays file. -> (ensemble prototype probs, step doc)."""
    from wbc.adapt.protos import TAU, fit_prototypes, prototype_probs
    from wbc.adapt.reference import load_arrays

    out = []
    for d in docs:
        a = load_arrays(d["arrays"])
        a["proto_centres"] = fit_prototypes(d["_feats"], probs, a["class_means"])
        save_arrays(d["arrays"], **a)
        d["arrays_sha256"] = file_sha256(d["arrays"])
        out.append(prototype_probs(d["_feats"], a["proto_centres"], TAU))
    return np.mean(out, axis=0), {"enabled": True, "tau": TAU, "iters": 2}


def fit_priors(probs: np.ndarray, enabled: bool, class_names: list[str]) -> tuple[dict, np.ndarray]:
    """EM target priors on the ensemble's probabilities (N, C); cRT heads assume uniform ones."""
    from wbc.adapt.priors import em_priors, reweight

    c = len(class_names)
    if not enabled:
        return {"enabled": False}, probs
    src = np.full(c, 1.0 / c)
    pi, iters = em_priors(probs, src)
    log.info("target priors (EM, %d iterations): %s", iters,
             ", ".join(f"{n} {p:.2f}" for n, p in zip(class_names, pi)))
    return ({"enabled": True, "source": src.tolist(), "target": [round(float(p), 5) for p in pi],
             "iters": iters, "class_names": list(class_names)}, reweight(probs, pi, src))
