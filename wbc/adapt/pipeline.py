"""`wbc adapt`: fit an ensemble to another lab's unlabelled images; writes ADAPTED.yaml.

Steps (each switchable off, each recorded with its figures):
1. stain: the training store's Macenko template, as for prediction; failures are counted.
2. zoom: cell scale of the target against the training store (`wbc.adapt.scale`).
3. bn: AdaBN per member (`wbc.adapt.bn`), saved as a new checkpoint beside ADAPTED.yaml.
4. align: target embeddings (of the adapted backbone) mapped onto the training embeddings'
   moments, read from the member's feature cache (`wbc.adapt.align`).
5. priors: the target's class priors by EM on the adapted ensemble's posteriors (`wbc.adapt.priors`).
Plus the review rule (thresholds on the source validation fold, `wbc.adapt.reference`).
Labels in a target CSV are never read: only its `image` column is.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

from wbc.config import file_sha256
from wbc.errors import WbcError
from wbc.log import progress

log = logging.getLogger(__name__)
PROTO_MODES = ("blend", "only", "off")
MIN_TARGET = 16  # BatchNorm statistics and target moments from fewer cells are noise
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class AdaptConfig:
    zoom: str = "auto"  # "auto" (estimated), "off" (1) or a number
    bn: bool = True
    align: str = "meanstd"  # "meanstd", "coral" or "none"
    # AdaBN and alignment on target cells weighted to the training class mix by pseudo-labels
    # (wbc.adapt.mix); "none": the target's own mix, as before
    mix: str = "source"
    shrink: float = 0.1  # CORAL covariance shrinkage towards the diagonal
    # Off by default: EM assumes pure label shift (p(x|y) unchanged), which another lab's cells violate
    # even after AdaBN, so source-calibrated posteriors mislead it (BENCHMARKS: blurred PBC-LT 60.2 -> 41.6).
    priors: bool = False
    # Class prototypes re-estimated on the target (wbc.adapt.protos): "blend" averages their
    # probabilities with the head's, "only" uses them alone, "off". On every shifted set measured
    # (JTSC, blurred PBC-LT) they raised Macro-F1; alone they rank cells worse for review, so the
    # default is the blend (BENCHMARKS "crosslab"). True / False mean "only" / "off".
    prototypes: str = "blend"
    coverage: float = 0.95  # in-domain fraction left un-flagged by `review`
    # AdaBN, alignment, priors and prototypes only when the target is measurably shifted
    # (wbc.adapt.steps.measure_shift): on in-domain cells with another class mix they cost 4-17
    # Macro-F1 points (BENCHMARKS).
    guard: bool = True
    max_images: int = 2000  # target images used (a seeded sample beyond it): memory and time
    scale_images: int = 200  # images measured per side for the zoom estimate
    batch_size: int = 32
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        mode = self.prototypes
        if isinstance(mode, bool):
            mode = "only" if mode else "off"
        if mode not in PROTO_MODES:
            raise WbcError(f"--prototypes must be one of {', '.join(PROTO_MODES)}, got {self.prototypes!r}")
        object.__setattr__(self, "prototypes", mode)


@dataclass
class AdaptResult:
    out: Path
    doc: dict
    probs: np.ndarray  # (N_used, C) adapted ensemble probabilities on the target images
    paths: list[Path] = field(default_factory=list)
    confidence: np.ndarray | None = None  # (N_used,), as predict writes them for these images
    ood: np.ndarray | None = None
    review: np.ndarray | None = None


def target_paths(target: str | Path) -> list[Path]:
    """Image paths of a folder (recursive) or a CSV's `image` column; nothing else is read."""
    target = Path(target)
    if target.is_dir():
        paths = sorted(p for p in target.rglob("*") if p.suffix.lower() in IMAGE_EXT)
    elif target.is_file() and target.suffix.lower() == ".csv":
        with open(target, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            if "image" not in header:
                raise WbcError(f"{target}: a CSV needs an 'image' column (paths relative to the CSV)")
            col = header.index("image")
            paths = [target.parent / row[col] for row in reader if len(row) > col and row[col]]
    else:
        raise WbcError(f"{target}: give a folder of images or a CSV with an 'image' column")
    if not paths:
        raise WbcError(f"{target}: no images found")
    return paths


def _store_path(ensemble_path: Path) -> Path:
    doc = yaml.safe_load(Path(ensemble_path).read_text()) or {}
    return Path(ensemble_path).parent / doc["store"]["path"]


def _normalise(provenance: dict, rgb: np.ndarray) -> tuple[np.ndarray, bool, float | None]:
    """(image, stain ok, fraction of stained pixels with a negative H or E concentration, i.e.
    off-H&E colour the clamp removes; None for a --no-stain store)."""
    from wbc.stain import StainNormalizer, try_normalize_with_info

    if provenance.get("stain") != "macenko":
        return rgb, True, None
    out, ok, reason, info = try_normalize_with_info(StainNormalizer.from_provenance(provenance), rgb)
    if not ok:
        log.warning("stain normalisation failed, image kept as is: %s", reason)
    return out, ok, info.get("clamped_fraction_stained")


def load_target(paths: list[Path], provenance: dict):
    """Decode and stain-normalise every image (native size). -> images, kept paths, failed, stats."""
    from wbc.sources import ImageDecodeError, decode_image

    images, kept, failed, digests = [], [], [], []
    stain_failed, clamped = 0, []
    with progress() as bar:
        task = bar.add_task("read target", total=len(paths))
        for p in paths:
            bar.advance(task)
            try:
                data = Path(p).read_bytes()
                rgb, note = decode_image(data)
            except (OSError, ImageDecodeError) as e:
                failed.append((str(p), str(e)))
                continue
            if not note.startswith("grayscale"):
                rgb, ok, frac = _normalise(provenance, rgb)
                stain_failed += not ok
                if frac is not None:
                    clamped.append(frac)
            images.append(rgb)
            kept.append(Path(p))
            digests.append(hashlib.sha256(data).hexdigest())
    # an image "had to be clamped" when over 1% of its stained pixels had a negative concentration
    stats = {"n_stain_failed": stain_failed,
             "n_stain_clamped": int(sum(f > 0.01 for f in clamped)) if clamped else None,
             "stain_clamp_on": bool((provenance.get("stain_params") or {}).get("clamp", False)),
             "target_id": hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()}
    return images, kept, failed, stats


def auto_zoom(ensemble_path, paths: list[Path], n: int = 200, seed: int = 0, images=None):
    """ScaleEstimate of `paths` (or already-normalised `images`) against the training store."""
    from wbc.adapt.scale import estimate_zoom, sizes
    from wbc.store import open_store

    store_path = _store_path(ensemble_path)
    if not store_path.is_file():
        raise WbcError(f"zoom auto needs the training store {store_path} (recorded in {ensemble_path}); "
                       "give --zoom as a number instead")
    store = open_store(store_path)
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(np.asarray(store.folds) >= 0) if store.is_split else np.arange(len(store))
    rows = np.sort(rng.choice(rows, min(n, len(rows)), replace=False))
    src = sizes(store.image(int(i)) for i in rows)
    if images is None:
        images, _, _, _ = load_target(list(paths), store.provenance)
    pick = rng.choice(len(images), min(n, len(images)), replace=False)
    try:
        return estimate_zoom(src, sizes(images[int(i)] for i in pick), seed=seed)
    except ValueError as e:
        raise WbcError(f"{e}; give --zoom as a number (or --no-zoom)") from None


def _prepared(images: list[np.ndarray], zoom: float, size: int) -> np.ndarray:
    from wbc.sources import resize_square, zoom_image

    return np.stack([resize_square(zoom_image(im, zoom), size) for im in images])


def adapt(target: str | Path, ensemble_path: str | Path, out: str | Path,
          cfg: AdaptConfig = AdaptConfig()) -> AdaptResult:
    """Adapt the ensemble at `ensemble_path` to the unlabelled images of `target`; write `out`."""
    from wbc.adapt.steps import adapt_members, fit_priors
    from wbc.ensemble import load_ensemble

    ensemble_path, out = Path(ensemble_path), Path(out)
    ens = load_ensemble(ensemble_path)
    paths = target_paths(target)
    if len(paths) > cfg.max_images:
        rng = np.random.default_rng(cfg.seed)
        paths = [paths[i] for i in np.sort(rng.choice(len(paths), cfg.max_images, replace=False))]
    images, kept, failed, stats = load_target(paths, ens.provenance)
    if len(images) < MIN_TARGET:
        why = f" ({len(failed)} unreadable, e.g. {failed[0][1]})" if failed else ""
        raise WbcError(f"{target}: {len(images)} readable image(s){why}; adaptation needs at least "
                       f"{MIN_TARGET} cells from the target lab")
    zoom_doc = {"enabled": cfg.zoom != "off", "zoom": 1.0, "estimate": None}
    if cfg.zoom == "auto":
        est = auto_zoom(ensemble_path, kept, cfg.scale_images, cfg.seed, images=images)
        zoom_doc.update(zoom=est.zoom, estimate=est.to_dict())
    elif cfg.zoom != "off":
        from wbc.sources import check_zoom

        zoom_doc["zoom"] = check_zoom(float(cfg.zoom))
    x = _prepared(images, zoom_doc["zoom"], int(ens.provenance["settings"]["size"]))
    del images
    files = out.with_name(out.stem + ".files")
    asked = cfg
    shift_doc, refs = {"enabled": False}, None
    if cfg.guard and (cfg.bn or cfg.align != "none" or cfg.priors or cfg.prototypes != "off"):
        from wbc.adapt.steps import measure_shift

        shift_doc, refs = measure_shift(ens, x, cfg, files, stats["target_id"], zoom_doc["zoom"])
        if not shift_doc["shifted"]:
            log.warning("target looks in-domain (%.0f%% of cells beyond the in-domain 95th percentile of "
                        "ood_score, threshold %.0f%%): AdaBN, alignment, priors and prototypes skipped "
                        "(--no-guard forces them)",
                        100 * shift_doc["share_beyond_val95"], 100 * shift_doc["threshold"])
            # priors and prototypes too: on clean PBC-LT test cells they cost 7.7 / 4.2 points (BENCHMARKS)
            cfg = replace(cfg, bn=False, align="none", priors=False, prototypes="off")
    members, member_probs, review, ood = adapt_members(ens, x, files, cfg, stats["target_id"], zoom_doc["zoom"], refs)
    head = member_probs.mean(axis=0)  # the ensemble's head probabilities, before priors
    pri_doc, probs = fit_priors(head, cfg.priors, ens.class_names)
    proto_doc = {"enabled": False, "mode": "off"}
    if cfg.prototypes != "off":
        from wbc.adapt.steps import fit_member_prototypes

        pp, proto_doc = fit_member_prototypes(members, probs)  # fitted on the (prior-corrected) posteriors
        # the blend's head half is the heads' own probabilities: priors live inside the prototypes
        probs = pp if cfg.prototypes == "only" else (head + pp) / 2
        proto_doc["mode"] = cfg.prototypes
    base = out.parent
    doc = {
        "format": "wbc.adapted/1",
        "ensemble": {"path": _rel(ensemble_path, base), "sha256": file_sha256(ensemble_path)},
        "target": {"source": str(target), "id": stats["target_id"], "n_images": len(paths),
                   "n_used": len(kept), "n_failed": len(failed),
                   "n_stain_failed": stats["n_stain_failed"], "n_stain_clamped": stats["n_stain_clamped"]},
        "steps": {"stain": {"template": "training store", "n_failed": stats["n_stain_failed"],
                            "n_clamped": stats["n_stain_clamped"], "clamp": stats["stain_clamp_on"]},
                  "zoom": zoom_doc, "shift": shift_doc,
                  "bn": {"enabled": cfg.bn, "members": [m.pop("bn_doc") for m in members]},
                  "align": {"enabled": cfg.align != "none", "method": cfg.align, "shrink": cfg.shrink,
                            "mix": cfg.mix},
                  "priors": pri_doc, "prototypes": proto_doc},
        "review": review,
        "predicted": _counts(probs, ens.class_names),
        "config": asdict(asked),
        "members": [{k: _rel(v, base) if k in ("checkpoint", "arrays") else v for k, v in m.items()
                     if not k.startswith("_")} for m in members],
    }
    from wbc.adapt.bundle import write_adapted

    write_adapted(out, doc)
    if failed:
        with open(out.with_name(out.stem + ".failed.csv"), "w", newline="") as f:
            csv.writer(f).writerows([("image", "reason"), *failed])
        log.warning("%d target images could not be read (listed in %s.failed.csv)", len(failed), out.stem)
    from wbc.selective import ReviewRule

    rule = ReviewRule(review["conf_min"], review["ood_max"], review["coverage"], review["achieved"], review["n_val"])
    return AdaptResult(out, doc, probs, kept, probs.max(axis=1), ood, rule.flags(probs.max(axis=1), ood))


def _rel(path, base: Path) -> str:
    import os

    return os.path.relpath(Path(path).resolve(), base.resolve())


def _counts(probs: np.ndarray, class_names: list[str]) -> dict:
    """Predicted class counts on the target after adaptation (a label-free sanity check)."""
    top = np.bincount(probs.argmax(1), minlength=len(class_names))
    return {c: int(n) for c, n in zip(class_names, top)}
