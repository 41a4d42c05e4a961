"""Report figures from arrays already computed: confusion matrices, per-class bars, reliability
diagrams, training curves and the loss-ablation heat map. Each returns a matplotlib Figure
(`png_bytes` / `save_png` turn it into a file); nothing here reads caches or runs a model.

Classes are drawn in lineage order (`lineage_order`): the granulocyte maturation series a
haematologist reads as one (PMY -> MY -> MMY -> BNE -> SNE), then LY MO EO BA, then any other class.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

LINEAGE = ("PMY", "MY", "MMY", "BNE", "SNE", "NE", "LY", "MO", "EO", "BA")


def lineage_order(class_names: list[str]) -> list[int]:
    """Indices of class_names in lineage order; classes outside LINEAGE keep their order, last."""
    known = [class_names.index(c) for c in LINEAGE if c in class_names]
    return known + [i for i, c in enumerate(class_names) if c not in LINEAGE]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    _plt().close(fig)
    return buf.getvalue()


def save_png(fig, path: Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(fig, dpi))
    return path


def row_normalise(cm: np.ndarray) -> np.ndarray:
    cm = np.asarray(cm, np.float64)
    s = cm.sum(1, keepdims=True)
    return np.divide(cm, s, out=np.zeros_like(cm), where=s > 0)


def confusion_figure(cm: np.ndarray, class_names: list[str], title: str, subtitle: str = ""):
    """Counts and row-normalised matrices side by side, in lineage order, each with a colour bar.

    cm: (C, C) counts, rows = true class, in class_names' order. The title line gives n and
    Macro-F1 when passed in `subtitle`. Constrained layout keeps every label inside the canvas.
    """
    plt = _plt()
    order = lineage_order(list(class_names))
    cm = np.asarray(cm, np.float64)[np.ix_(order, order)]
    names = [class_names[i] for i in order]
    n = len(names)
    fig, axes = plt.subplots(1, 2, figsize=(3.2 + 1.25 * n, 1.9 + 0.48 * n), layout="constrained")
    for ax, mat, sub, fmt, label in ((axes[0], cm, "counts", "{:.0f}", "cells"),
                                     (axes[1], row_normalise(cm), "row-normalised (recall on the diagonal)",
                                      "{:.2f}", "fraction of the true class")):
        top = max(mat.max(), 1e-9)
        im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=top)
        bar = fig.colorbar(im, ax=ax, shrink=0.85, label=label)
        if fmt == "{:.0f}":  # counts: whole cells on the colour bar too
            from matplotlib.ticker import MaxNLocator

            bar.locator = MaxNLocator(integer=True)
            bar.update_ticks()
        ax.set_xticks(range(n), names, rotation=45, ha="right")
        ax.set_yticks(range(n), names)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(sub, fontsize=10)
        for i in range(n):
            for j in range(n):
                if mat[i, j] or i == j:
                    ax.text(j, i, fmt.format(mat[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if mat[i, j] > 0.6 * top else "black")
    fig.suptitle(f"{title}\n{subtitle}" if subtitle else title, fontsize=11)
    return fig


def per_class_figure(per_class: dict[str, np.ndarray], class_names: list[str], title: str):
    """Grouped bars of precision, recall and F1 per class (fractions), lineage order."""
    plt = _plt()
    order = lineage_order(list(class_names))
    x = np.arange(len(order))
    fig, ax = plt.subplots(figsize=(2.5 + 0.7 * len(order), 3.2), layout="constrained")
    for i, (key, colour) in enumerate((("precision", "#9ecae1"), ("recall", "#4292c6"), ("f1", "#08306b"))):
        ax.bar(x + (i - 1) * 0.27, np.asarray(per_class[key])[order], 0.27, label=key, color=colour)
    ax.set_xticks(x, [class_names[i] for i in order])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction")
    ax.set_title(title, fontsize=10)
    ax.legend(ncols=3, fontsize=8, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    return fig


def reliability_curve(probs: np.ndarray, labels: np.ndarray, bins: int = 15):
    """(accuracy, mean confidence, count) per equal-width confidence bin, binned exactly as
    `wbc.metrics.expected_calibration_error`. probs: (N, C); labels: (N,). Empty bins are NaN."""
    conf = probs.max(1)
    hit = probs.argmax(1) == labels
    idx = np.clip(np.digitize(conf, np.linspace(0.0, 1.0, bins + 1)[1:-1], right=True), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    acc = np.bincount(idx, hit.astype(float), bins) / np.maximum(count, 1)
    mean_conf = np.bincount(idx, conf, bins) / np.maximum(count, 1)
    empty = count == 0
    acc[empty], mean_conf[empty] = np.nan, np.nan
    return acc, mean_conf, count


def reliability_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, bins: int = 15):
    """One line per row: accuracy against mean confidence per bin; curves: name -> (probs, labels).
    The legend's ECE is the metrics table's (same bins)."""
    from wbc.metrics import expected_calibration_error

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.2), layout="constrained")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfectly calibrated")
    for name, (p, y) in curves.items():
        acc, conf, _ = reliability_curve(p, y, bins)
        ok = ~np.isnan(acc)
        ece = expected_calibration_error(p, y, bins)
        ax.plot(conf[ok], acc[ok], marker="o", ms=3, label=f"{name} (ECE {100 * ece:.1f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    return fig


def curves_figure(runs: dict[str, list[dict]], title: str):
    """Training loss and validation MF1 per epoch; runs: name -> metrics.jsonl rows.
    Stage-1 rows carry `val_mf1`, Stage-2 rows `mf1`; a final summary row (no `epoch`) is skipped."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2), layout="constrained")
    for name, rows in runs.items():
        rows = [r for r in rows if "epoch" in r]
        ep = [r["epoch"] for r in rows]
        a.plot(ep, [r.get("loss", np.nan) for r in rows], label=name)
        b.plot(ep, [r.get("val_mf1", r.get("mf1", np.nan)) for r in rows], label=name)
    a.set_ylabel("training loss")
    b.set_ylabel("validation Macro-F1")
    b.set_ylim(0, 1)
    for ax in (a, b):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    b.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    return fig


def ablation_figure(rows: list[dict], title: str):
    """MF1 heat maps, beta (rows) x gamma (columns), one panel per lambda.
    rows: dicts with beta, gamma, lam, mf1 (fraction), best (bool), same (bool: a copy of another
    cell's value, that cell being the same loss; drawn with a leading '=')."""
    plt = _plt()
    lams = sorted({r["lam"] for r in rows})
    betas = sorted({r["beta"] for r in rows})
    gammas = sorted({r["gamma"] for r in rows})
    vals = [r["mf1"] for r in rows]
    fig, axes = plt.subplots(1, len(lams), figsize=(1.2 + 2.4 * len(lams), 1.6 + 0.45 * len(betas) + 0.4),
                             layout="constrained", squeeze=False)
    for ax, lam in zip(axes[0], lams):
        grid = np.full((len(betas), len(gammas)), np.nan)
        for r in rows:
            if r["lam"] == lam:
                i, j = betas.index(r["beta"]), gammas.index(r["gamma"])
                grid[i, j] = r["mf1"]
                text = ("=" if r.get("same") else "") + f"{100 * r['mf1']:.1f}" + ("*" if r.get("best") else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        fontweight="bold" if r.get("best") else "normal", color="dimgrey" if r.get("same") else "black")
        im = ax.imshow(grid, cmap="viridis", vmin=min(vals), vmax=max(vals), alpha=0.85)
        ax.set_xticks(range(len(gammas)), [f"{g:g}" for g in gammas])
        ax.set_yticks(range(len(betas)), [f"{b:g}" for b in betas])
        ax.set_xlabel("gamma")
        ax.set_ylabel("beta")
        ax.set_title(f"lambda {lam:g}", fontsize=10)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.85, label="validation MF1")
    fig.suptitle(title, fontsize=11)
    return fig


def tight_bbox_inside(fig, tol_px: float = 1.0) -> bool:
    """True when every artist (labels, titles, colour bars) lies inside the canvas."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    bb = fig.get_tightbbox(r).transformed(fig.dpi_scale_trans)  # inches -> display pixels
    w, h = fig.canvas.get_width_height()
    return bb.x0 >= -tol_px and bb.y0 >= -tol_px and bb.x1 <= w + tol_px and bb.y1 <= h + tol_px
