"""`wbc robustness`'s report: per row, MF1/BAcc per degradation x severity, the summary over
them, robustness.md/.json/.csv and a plot of MF1 against severity."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from wbc.degrade import MAX_SEVERITY, describe


def summarise(records: list[dict], rows: list[str]) -> list[dict]:
    """Per row: clean MF1/BAcc, mean MF1/BAcc over every degradation x severity >= 1, the worst."""
    out = []
    for row in rows:
        mine = [r for r in records if r["row"] == row]
        clean = next(r for r in mine if r["severity"] == 0)
        deg = [r for r in mine if r["severity"] > 0]
        worst = min(deg, key=lambda r: r["mf1"]) if deg else clean
        out.append({"row": row, "clean_mf1": clean["mf1"], "clean_bacc": clean["bacc"],
                    "mean_mf1": float(np.mean([r["mf1"] for r in deg])) if deg else clean["mf1"],
                    "mean_bacc": float(np.mean([r["bacc"] for r in deg])) if deg else clean["bacc"],
                    "worst": f"{worst['degradation']}/{worst['severity']}", "worst_mf1": worst["mf1"]})
    return out


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def summary_markdown(summary: list[dict]) -> str:
    lines = ["| Model | clean MF1 | clean BAcc | mean MF1 (degraded) | mean BAcc (degraded) | worst (MF1) |",
             "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {s['row']} | {_pct(s['clean_mf1'])} | {_pct(s['clean_bacc'])} | {_pct(s['mean_mf1'])} | "
              f"{_pct(s['mean_bacc'])} | {s['worst']} ({_pct(s['worst_mf1'])}) |" for s in summary]
    return "\n".join(lines)


def row_markdown(records: list[dict], row: str) -> str:
    """Degradations x severities of one row: 'MF1 / BAcc' in percent, plus the mean per severity."""
    mine = [r for r in records if r["row"] == row]
    degs = list(dict.fromkeys(r["degradation"] for r in mine))
    sevs = sorted({r["severity"] for r in mine})
    cell = {(r["degradation"], r["severity"]): r for r in mine}
    lines = ["| degradation | " + " | ".join(f"severity {s}" for s in sevs) + " |", "|---|" + "---:|" * len(sevs)]
    for d in degs:
        lines.append(f"| {d} | " + " | ".join(
            f"{_pct(cell[d, s]['mf1'])} / {_pct(cell[d, s]['bacc'])}" for s in sevs) + " |")
    means = [(np.mean([cell[d, s]["mf1"] for d in degs]), np.mean([cell[d, s]["bacc"] for d in degs])) for s in sevs]
    lines.append("| **mean** | " + " | ".join(f"{_pct(a)} / {_pct(b)}" for a, b in means) + " |")
    return "\n".join(lines)


def robustness_png(records: list[dict], rows: list[str], path: Path) -> Path:
    """MF1 against severity, one line per degradation, one panel per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(3, len(rows))
    nrows = -(-len(rows) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False, sharey=True)
    for ax, row in zip(axes.flat, rows):
        mine = [r for r in records if r["row"] == row]
        for d in dict.fromkeys(r["degradation"] for r in mine):
            pts = sorted((r["severity"], 100 * r["mf1"]) for r in mine if r["degradation"] == d)
            ax.plot(*zip(*pts), marker="o", label=d)
        ax.set_title(row, fontsize=9)
        ax.set_xlabel("severity")
        ax.set_ylabel("MF1 (%)")
        ax.set_xticks(range(MAX_SEVERITY + 1))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_robustness_report(rows: list[str], records: list[dict], summary: list[dict], settings: dict,
                            out: Path) -> dict[str, Path]:
    """robustness.md, .json, .csv (one line per row x degradation x severity) and .png under out.

    records: one dict per (row, degradation, severity) with mf1, bacc, n; summary: `summarise`'s."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"robustness.{k}" for k in ("md", "json", "csv", "png")}
    md = [f"# Robustness: {Path(settings['ensemble']).name} on {Path(settings['store']).name}", "",
          (f"{settings['n_images']} of {settings['n_test']} held-out test images (stain: {settings['stain']}), "
          f"views {', '.join(settings['views'])}; severity 0 = clean. Values are percent."), "",
          summary_markdown(summary), "",
          "Mean over every degradation and severity >= 1; plot of MF1 against severity: robustness.png.", ""]
    for row in rows:
        md += [f"## {row} (MF1 / BAcc)", "", row_markdown(records, row), ""]
    md += ["## Degradations", "", describe()]
    paths["md"].write_text("\n".join(md))
    paths["json"].write_text(json.dumps({**settings, "rows": rows, "summary": summary,
                                         "records": records}, indent=1, default=float))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, ["row", "degradation", "severity", "mf1", "bacc", "n"])
        w.writeheader()
        w.writerows(records)
    robustness_png(records, rows, paths["png"])
    return paths
