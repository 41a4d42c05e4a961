"""ADAPTED.yaml: an ensemble adapted to another lab's images, read by predict / evaluate --external.

```
format: wbc.adapted/1
ensemble: {path, sha256}             # the source ENSEMBLE.yaml (relative to this file)
target: {source, id, n_images, n_used, n_failed, n_stain_failed, n_stain_clamped}
steps:                               # each with `enabled` and its figures
  zoom: {enabled, zoom, estimate}    # estimate: wbc.adapt.scale.ScaleEstimate or null
  bn: {enabled, note}
  align: {enabled, method, shrink}
  priors: {enabled, source, target, iters, class_names}
  prototypes: {enabled, mode (blend|only|off), tau, iters}  # nearest-centroid on target prototypes (then priors are in them)
review: {coverage, conf_min, ood_max, achieved, n_val, how}
members:                             # per ensemble member, in order
  - {name, checkpoint, checkpoint_sha256, temperature, arrays, arrays_sha256}
```
`checkpoint` is the AdaBN checkpoint (beside this file) when bn is enabled, else the source one;
`arrays` an npz (allow_pickle=False) with the source training moments (src_mean, src_std, src_cov),
the alignment (align_matrix, align_shift_in, align_shift_out) and the Mahalanobis model
(maha_whiten, maha_centres), the training class means and, with prototypes, proto_centres.
Paths are relative to this file; a changed file is refused (sha256).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

from wbc.adapt.align import Alignment
from wbc.adapt.reference import load_arrays
from wbc.config import file_sha256
from wbc.errors import WbcError
from wbc.fsutil import atomic_write
from wbc.selective import Mahalanobis, ReviewRule

FORMAT = "wbc.adapted/1"


@dataclass
class MemberAdaptation:
    alignment: Alignment | None
    maha: Mahalanobis | None
    prototypes: np.ndarray | None = None  # (C, D) unit target prototypes: nearest-centroid probs
    temperature: float = 1.0  # of the member's view softmax (calibrated on source validation for EM)
    proto_blend: bool = False  # True: the mean of the head's and the prototypes' probabilities


@dataclass
class Adaptation:
    """What predict applies on top of an ensemble (identity when loaded from a plain ensemble)."""

    zoom: float = 1.0
    members: list[MemberAdaptation] = field(default_factory=list)
    priors: tuple[np.ndarray, np.ndarray] | None = None  # (target, source) class priors
    review: ReviewRule | None = None
    doc: dict = field(default_factory=dict)  # the ADAPTED.yaml, for reports


def is_adapted(path: str | Path) -> bool:
    """True for an ADAPTED.yaml (cheap: reads the YAML only)."""
    p = Path(path)
    if not p.is_file():
        return False
    doc = yaml.safe_load(p.read_text()) or {}
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def _checked(base: Path, rel: str, sha: str, what: str, path: Path) -> Path:
    f = base / rel
    if not f.is_file():
        raise WbcError(f"{path}: {what} {f} not found")
    if file_sha256(f) != sha:
        raise WbcError(f"{path}: {what} {f} changed since it was written (sha256 differs); rerun `wbc adapt`")
    return f


def load_adapted(path: str | Path):
    """-> (Ensemble with the adapted members' checkpoints, Adaptation)."""
    from wbc.ensemble import load_ensemble

    path = Path(path)
    doc = yaml.safe_load(path.read_text()) or {}
    if doc.get("format") != FORMAT:
        raise WbcError(f"{path} is not an adapted ensemble (format {doc.get('format')!r}, want {FORMAT!r})")
    base = path.parent
    ens_path = _checked(base, doc["ensemble"]["path"], doc["ensemble"]["sha256"], "source ensemble", path)
    ens = load_ensemble(ens_path)
    if len(doc["members"]) != len(ens.members):
        raise WbcError(f"{path}: {len(doc['members'])} members, its ensemble {ens_path} has {len(ens.members)}")
    steps = doc["steps"]
    members = []
    for i, spec in enumerate(doc["members"]):
        ckpt = _checked(base, spec["checkpoint"], spec["checkpoint_sha256"], "checkpoint", path)
        ens.members[i] = replace(ens.members[i], checkpoint=ckpt, checkpoint_sha256=spec["checkpoint_sha256"])
        a = load_arrays(_checked(base, spec["arrays"], spec["arrays_sha256"], "arrays", path))
        align = Alignment.from_arrays(steps["align"]["method"], a) if steps["align"]["enabled"] else None
        pdoc = steps.get("prototypes") or {}
        protos = a.get("proto_centres") if pdoc.get("enabled") else None
        members.append(MemberAdaptation(align, Mahalanobis(a["maha_whiten"], a["maha_centres"]), protos,
                                        float(spec.get("temperature", 1.0)),
                                        pdoc.get("mode", "only") == "blend"))  # files before modes: "only"
    pri = steps["priors"]
    priors = (np.asarray(pri["target"]), np.asarray(pri["source"])) if pri["enabled"] else None
    if any(m.prototypes is not None for m in members):
        priors = None  # the prototypes were fitted on prior-corrected posteriors: already included
    r = doc["review"]
    review = ReviewRule(r["conf_min"], r["ood_max"], r["coverage"], r["achieved"], r["n_val"])
    zoom = float(steps["zoom"]["zoom"]) if steps["zoom"]["enabled"] else 1.0
    return ens, Adaptation(zoom, members, priors, review, doc)


def write_adapted(out: Path, doc: dict) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:  # the YAML is written last: no ADAPTED.yaml means the adaptation is not done
        f.write(yaml.safe_dump(doc, sort_keys=False))
    return out
