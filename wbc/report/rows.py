"""Report rows and the tables shared by every report: ranking (best **bold**, second
<u>underlined</u>), markdown and rich renderings, per-class F1, JSON.

A `RowResult` is one model row of a table (Table 1, an external set): per-fold metrics, the
confusion matrix summed over folds, and the probabilities the HTML report draws.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from rich.table import Table

from wbc.metrics import HEADLINE

LABELS = {"mf1": "MF1", "bacc": "BAcc", "mp": "MP", "mspec": "MSpec", "ece": "ECE"}
LOWER_IS_BETTER = {"ece"}
KEYS = (*HEADLINE, "ece")


@dataclass
class RowResult:
    name: str
    kind: str
    members: tuple[str, ...]
    folds: list[dict] = field(default_factory=list)  # per-fold metrics (+ ece, temperature)
    confusion: np.ndarray | None = None  # summed over folds
    probs: list[np.ndarray] = field(default_factory=list)  # per fold (N, C): what the report draws
    labels: np.ndarray | None = None  # (N,) true class, -1 = unlabelled
    index: np.ndarray | None = None  # (N,) image-store row

    def stat(self, key: str) -> tuple[float, float]:
        v = np.array([f[key] for f in self.folds], np.float64)
        return float(v.mean()), float(v.std())


def ranks(values: list[float], lower_better: bool = False) -> list[int]:
    """0 for the best value, 1 for the second best (ties share a rank), 2 for the rest."""
    distinct = sorted(set(np.round(values, 6)), reverse=not lower_better)
    top = distinct[:2]
    return [top.index(v) if v in top else 2 for v in np.round(values, 6)]


def ranked_cells(rows: Sequence, keys: Sequence[str], value: Callable, text: Callable) -> list[list[tuple[str, int]]]:
    """Per row, per metric key: (text(row, key), rank of value(row, key) among the rows)."""
    cols = []
    for k in keys:
        rk = ranks([value(r, k) for r in rows], k in LOWER_IS_BETTER)
        cols.append([(text(r, k), rk[i]) for i, r in enumerate(rows)])
    return [list(c) for c in zip(*cols)]


def marked(cells: list[tuple[str, int]], style: str = "md") -> list[str]:
    """Best bold, second underlined: in markdown (`md`) or rich markup (`rich`)."""
    best, second = (("**{}**", "<u>{}</u>") if style == "md" else ("[bold]{}[/]", "[underline]{}[/]"))
    return [best.format(t) if rk == 0 else second.format(t) if rk == 1 else t for t, rk in cells]


def _mean_std(r: RowResult, k: str) -> str:
    return f"{100 * r.stat(k)[0]:.1f} ± {100 * r.stat(k)[1]:.1f}"


def _cells(rows: list[RowResult], keys) -> list[list[tuple[str, int]]]:
    """Per row, per metric: ('73.1 ± 2.0', rank) with values in percent (ECE too)."""
    return ranked_cells(rows, keys, lambda r, k: r.stat(k)[0], _mean_std)


def markdown_table(rows: list[RowResult], keys=KEYS) -> str:
    lines = ["| Model | " + " | ".join(LABELS[k] for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for r, cells in zip(rows, _cells(rows, keys)):
        lines.append(f"| {r.name} | " + " | ".join(marked(cells)) + " |")
    return "\n".join(lines)


def rich_table(rows: list[RowResult], title: str, keys=KEYS) -> Table:
    t = Table(title=title)
    t.add_column("Model")
    for k in keys:
        t.add_column(LABELS[k], justify="right")
    for r, cells in zip(rows, _cells(rows, keys)):
        t.add_row(r.name, *marked(cells, "rich"))
    return t


def per_class_table(rows: list[RowResult], class_names: list[str]) -> str:
    """Per-class F1 (mean over folds, percent) for each row, as markdown."""
    lines = ["| Model | " + " | ".join(class_names) + " |", "|---|" + "---:|" * len(class_names)]
    for r in rows:
        f1 = np.mean([f["f1_per_class"] for f in r.folds], axis=0)
        lines.append(f"| {r.name} | " + " | ".join(f"{100 * v:.1f}" for v in f1) + " |")
    return "\n".join(lines)


def best_row(rows: list[RowResult], key: str = "mf1") -> RowResult:
    return max(rows, key=lambda r: r.stat(key)[0])


def to_json(rows: list[RowResult], class_names: list[str], extra: dict | None = None) -> dict:
    return {
        "class_names": class_names,
        **(extra or {}),
        "rows": [
            {
                "name": r.name,
                "kind": r.kind,
                "members": list(r.members),
                **{k: {"mean": r.stat(k)[0], "std": r.stat(k)[1]} for k in KEYS},
                "folds": r.folds,
                "confusion": r.confusion.tolist() if r.confusion is not None else None,
            }
            for r in rows
        ],
    }


def confusion_png(cm: np.ndarray, class_names: list[str], title: str, path, subtitle: str = ""):
    """Counts and row-normalised confusion matrices side by side (lineage order, colour bars)."""
    from wbc.figures import confusion_figure, save_png

    return save_png(confusion_figure(cm, class_names, title, subtitle), path)
