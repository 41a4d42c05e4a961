"""`wbc ablate`'s report: one row per loss configuration (mean ± std over folds) as ablate.csv,
ablate.md and a rich table."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from wbc.losses import LossSpec
from wbc.metrics import HEADLINE


@dataclass
class AblateRow:
    label: str
    spec: LossSpec
    mean_std: dict  # metric -> (mean, std)
    per_fold: list[dict]
    best: bool = False


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


def rich_table(rows: list[AblateRow]) -> Table:
    """The ablation table for the terminal; the chosen (best MF1) configuration in green."""
    folds = len(rows[0].per_fold)
    table = Table(title=f"Loss ablation: {len(rows)} configurations, mean ± std over {folds} fold(s) (%)")
    for col in ("configuration", "MF1", "BAcc", "MP", "MSpec"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for r in rows:
        style = "bold green" if r.best else None
        table.add_row(("* " if r.best else "") + r.label, *(fmt(r.mean_std[m]) for m in HEADLINE), style=style)
    return table
