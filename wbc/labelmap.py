"""Score a model on an external set whose labels differ: map model classes onto the set's labels.

A label map is many-to-one, MODEL=SET: `--label-map SNE=NE,BNE=NE` sends the model's segmented and
band neutrophils to the set's single neutrophil label. Classes with the same name in both map to
each other unless the map says otherwise; `ERB=` (empty target) marks a model class as having no
counterpart even if the set has a label of that name. The map may also be a file:

- YAML (`.yaml`/`.yml`): a mapping `{SNE: NE, BNE: NE, ERB: null}` (quote names YAML would read
  as booleans or numbers, such as NO or ON);
- CSV (`.csv`): two columns `model,set` per line, an optional `model,set` header, `#` comments.

Two lists are always reported, never silently dropped:
- `unmapped_model`: model classes with no counterpart in the set; their probability is dropped;
- `unscorable`: set labels no model class maps to; samples with those labels are left out of the
  metrics (counted in `MappedScores.dropped`), since the model cannot predict them.

Scoring (`LabelMap.score`): the probability of a set label is the SUM of the probabilities of the
model classes mapped to it; the prediction is the argmax over the scored (mappable) set labels
only. The mass of unmapped model classes is dropped before the argmax, so a cell the model calls
ERB is assigned to the most probable label the set can check rather than counted as an error.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from wbc.errors import WbcError

log = logging.getLogger(__name__)

_FILE_SUFFIXES = {".yaml", ".yml", ".csv"}
_EXAMPLE = "e.g. --label-map SNE=NE,BNE=NE or a .yaml/.csv file"


@dataclass(frozen=True)
class MappedScores:
    """Predictions of a model on an external set, over the set's scored labels.

    y_true, y_pred: (M,) int64 indices into `labels` (M = samples whose label is scorable).
    probs: (M, L) summed probabilities per scored label, renormalised to sum to 1.
    coverage: (M,) probability mass the model put on mappable classes (1 = none dropped).
    kept: (N,) bool, which input samples were scored. dropped: {set label: samples left out}.
    """

    y_true: np.ndarray
    y_pred: np.ndarray
    labels: list[str]
    probs: np.ndarray
    coverage: np.ndarray
    kept: np.ndarray
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LabelMap:
    """model class -> set label (many-to-one) between a model and an external labelled set."""

    model_classes: tuple[str, ...]
    set_labels: tuple[str, ...]
    mapping: dict[str, str]  # only mapped model classes
    given: dict[str, str | None]  # the user's explicit entries, for provenance

    @classmethod
    def parse(
        cls,
        text: str | Path | None,
        model_classes: Sequence[str],
        set_labels: Sequence[str],
    ) -> LabelMap:
        """Build from `MODEL=SET,...`, a YAML/CSV path, or None/"" (same names only)."""
        model_classes, set_labels = tuple(model_classes), tuple(set_labels)
        for what, names in (("model classes", model_classes), ("set labels", set_labels)):
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate {what}: {list(names)}")
        given = _read(text)
        unknown = sorted(k for k in given if k not in model_classes)
        if unknown:
            raise WbcError(
                f"label map names unknown model class(es) {unknown}; "
                f"the model's classes are {list(model_classes)}"
            )
        unknown = sorted({v for v in given.values() if v is not None and v not in set_labels})
        if unknown:
            raise WbcError(
                f"label map names unknown set label(s) {unknown}; "
                f"the external set's labels are {list(set_labels)}"
            )
        mapping = {c: c for c in model_classes if c in set_labels and c not in given}
        mapping.update({k: v for k, v in given.items() if v is not None})
        mapping = {c: mapping[c] for c in model_classes if c in mapping}  # model order
        if not mapping:
            raise WbcError(
                f"the external set's labels {list(set_labels)} share no class with the model's "
                f"{list(model_classes)}; map them with MODEL=SET pairs ({_EXAMPLE})"
            )
        lm = cls(model_classes, set_labels, mapping, given)
        first, *rest = lm.summary().splitlines()
        log.info("label map: %s", first)
        for line in rest:
            log.warning("label map: %s", line)
        return lm

    @property
    def unmapped_model(self) -> list[str]:
        """Model classes with no counterpart in the set (their probability is dropped)."""
        return [c for c in self.model_classes if c not in self.mapping]

    @property
    def scored_labels(self) -> list[str]:
        """Set labels at least one model class maps to, in the set's order."""
        targets = set(self.mapping.values())
        return [s for s in self.set_labels if s in targets]

    @property
    def unscorable(self) -> list[str]:
        """Set labels the model cannot produce (their samples are left out of the metrics)."""
        targets = set(self.mapping.values())
        return [s for s in self.set_labels if s not in targets]

    def matrix(self) -> np.ndarray:
        """(C_model, L) float64 0/1: row c has a 1 in the column of the label class c maps to."""
        col = {s: j for j, s in enumerate(self.scored_labels)}
        m = np.zeros((len(self.model_classes), len(col)))
        for i, c in enumerate(self.model_classes):
            if c in self.mapping:
                m[i, col[self.mapping[c]]] = 1.0
        return m

    def summary(self) -> str:
        """One line of pairs, then one line per non-empty unmapped/unscorable list."""
        pairs = ", ".join(f"{c}->{s}" for c, s in self.mapping.items())
        lines = [f"mapped: {pairs}"]
        if self.unmapped_model:
            lines.append(f"model classes with no counterpart (mass dropped): {self.unmapped_model}")
        if self.unscorable:
            lines.append(f"set labels the model cannot produce (not scored): {self.unscorable}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-able record for a report's provenance."""
        return {
            "mapping": dict(self.mapping),
            "given": dict(self.given),
            "unmapped_model": self.unmapped_model,
            "unscorable": self.unscorable,
            "scored_labels": self.scored_labels,
        }

    def score(self, probs: np.ndarray, labels: Sequence[str] | np.ndarray) -> MappedScores:
        """Map model probabilities onto the set's labels and predict.

        probs: (N, C_model) class probabilities (softmax, or an ensemble's average).
        labels: (N,) the samples' set labels, as names or int indices into `set_labels`.
        Samples whose label is unscorable are left out and counted in `dropped`.
        """
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim != 2 or probs.shape[1] != len(self.model_classes):
            raise ValueError(f"probs must be (N, {len(self.model_classes)}), got {probs.shape}")
        true_idx = self._label_indices(labels)
        if len(true_idx) != len(probs):
            raise ValueError(f"{len(probs)} probability rows but {len(true_idx)} labels")
        mass = probs @ self.matrix()  # (N, L)
        coverage = mass.sum(1)
        scored = self.scored_labels
        to_scored = np.array([scored.index(s) if s in scored else -1 for s in self.set_labels])
        y_all = to_scored[true_idx]
        kept = y_all >= 0
        dropped = {}
        for j in np.flatnonzero(to_scored < 0):
            if n := int(np.sum(true_idx == j)):
                dropped[self.set_labels[j]] = n
        if dropped:
            log.warning("left out of the metrics (label the model cannot produce): %s", dropped)
        mass, cov = mass[kept], coverage[kept]
        return MappedScores(
            y_true=y_all[kept].astype(np.int64),
            y_pred=mass.argmax(1).astype(np.int64),
            labels=scored,
            probs=mass / np.maximum(cov, 1e-12)[:, None],
            coverage=cov,
            kept=kept,
            dropped=dropped,
        )

    def _label_indices(self, labels: Sequence[str] | np.ndarray) -> np.ndarray:
        arr = np.asarray(labels)
        if arr.dtype.kind in "iu":
            bad = (arr < 0) | (arr >= len(self.set_labels))
            if bad.any():
                raise WbcError(
                    f"label index {int(arr[bad][0])} outside the set's labels 0..{len(self.set_labels) - 1}"
                )
            return arr.astype(np.int64)
        index = {s: i for i, s in enumerate(self.set_labels)}
        unknown = sorted({str(s) for s in arr if s not in index})
        if unknown:
            raise WbcError(
                f"sample labels {unknown} are not among the set's labels {list(self.set_labels)}"
            )
        return np.array([index[s] for s in arr], dtype=np.int64)


def _read(text: str | Path | None) -> dict[str, str | None]:
    """The user's explicit entries, model class -> set label (None = no counterpart)."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return {}
    path = Path(text)
    if isinstance(text, Path) or path.suffix.lower() in _FILE_SUFFIXES or path.is_file():
        if not path.is_file():
            raise WbcError(f"label map file not found: {path}")
        if path.suffix.lower() == ".csv":
            return _pairs(_csv_rows(path), str(path))
        return _yaml(path)
    items = [item for item in text.split(",") if item.strip()]  # a trailing comma is harmless
    return _pairs([item.split("=", 1) if "=" in item else [item] for item in items], "--label-map")


def _csv_rows(path: Path) -> list[list[str]]:
    lines = [
        ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    rows = list(csv.reader(lines))
    if rows and [c.strip().lower() for c in rows[0]] == ["model", "set"]:
        rows = rows[1:]
    return rows


def _pairs(rows: list[list[str]], source: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for row in rows:
        if len(row) != 2 or not row[0].strip():
            raise WbcError(
                f"{source}: bad entry {'='.join(row)!r}; expected MODEL=SET ({_EXAMPLE})"
            )
        model, target = row[0].strip(), row[1].strip() or None
        if model in out and out[model] != target:
            raise WbcError(f"{source}: model class {model!r} mapped twice ({out[model]}, {target})")
        out[model] = target
    return out


def _yaml(path: Path) -> dict[str, str | None]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise WbcError(f"{path}: not valid YAML ({e.__class__.__name__})") from e
    if not isinstance(data, dict):
        raise WbcError(f"{path}: expected a mapping MODEL: SET ({_EXAMPLE})")
    out: dict[str, str | None] = {}
    for k, v in data.items():
        if isinstance(v, (list, dict)):
            raise WbcError(f"{path}: {k!r} must map to one set label, got {v!r}")
        out[str(k)] = None if v is None or str(v).strip() == "" else str(v).strip()
    return out
