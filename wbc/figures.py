"""Report figures from arrays already computed: confusion matrices, per-class bars, reliability
diagrams, training curves and the loss-ablation heat map; nothing here reads caches or runs a model.

The confusion matrix is a matplotlib Figure (`save_png`: confusion.png, drawn once by `wbc evaluate`
and embedded as is in report.html). The other charts are SVG text (`wbc.svg`): milliseconds each
where a matplotlib figure took 0.2-1 s, most of a report's render time.

Classes are drawn in lineage order (`lineage_order`): the granulocyte maturation series a
haematologist reads as one (PMY -> MY -> MMY -> BNE -> SNE), then LY MO EO BA, then any other class.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from wbc import svg

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


def per_class_chart(per_class: dict[str, np.ndarray], class_names: list[str], title: str) -> str:
    """Grouped bars of precision, recall and F1 per class (fractions), lineage order, as SVG."""
    order = lineage_order(list(class_names))
    slot = max(44.0, 10 + max(svg.text_width(class_names[i], 10) for i in order))
    ax = svg.Axes(60, 40, slot * len(order), 200, (0, len(order)), (0, 1.05))
    parts = ax.frame(ylabel="fraction", xticks=[k + 0.5 for k in range(len(order))],
                     xticklabels=[class_names[i] for i in order], yticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0])
    keys = (("precision", "#9ecae1"), ("recall", "#4292c6"), ("f1", "#08306b"))
    bar = 0.27 * slot
    for k, i in enumerate(order):
        for j, (key, colour) in enumerate(keys):
            v = float(np.asarray(per_class[key])[i])
            x = ax.px(k + 0.5) + (j - 1.5) * bar
            parts.append(svg.rect(x, ax.py(v), bar, ax.py(0) - ax.py(v), colour))
    width = max(ax.x0 + ax.w + 20, 360)
    leg, h = svg.legend(ax.x0, ax.y0 + ax.h + 40, [k for k, _ in keys], [c for _, c in keys], width - ax.x0)
    return svg.document(width, ax.y0 + ax.h + 40 + h + 4, parts + leg, title)


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


def reliability_chart(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, bins: int = 15) -> str:
    """One line per row: accuracy against mean confidence per bin, as SVG; curves: name -> (probs,
    labels). The legend's ECE is the metrics table's (same bins)."""
    from wbc.metrics import expected_calibration_error

    ax = svg.Axes(60, 40, 300, 300, (0, 1), (0, 1))
    parts = ax.frame("confidence (max probability)", "accuracy", xticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0],
                     yticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0])
    parts.append(svg.line(ax.px(0), ax.py(0), ax.px(1), ax.py(1), "grey", 1, stroke_dasharray="5 4"))
    names, colours = ["perfectly calibrated"], ["grey"]
    for k, (name, (p, y)) in enumerate(curves.items()):
        acc, conf, _ = reliability_curve(p, y, bins)
        ok = ~np.isnan(acc)
        colour = svg.PALETTE[k % len(svg.PALETTE)]
        pts = [(ax.px(c), ax.py(a)) for c, a in zip(conf[ok], acc[ok])]
        parts.append(svg.polyline(pts, colour))
        parts += [f'<circle cx="{svg.num(x)}" cy="{svg.num(y_)}" r="2.5" fill="{colour}"/>' for x, y_ in pts]
        names.append(f"{name} (ECE {100 * expected_calibration_error(p, y, bins):.1f})")
        colours.append(colour)
    leg, h = svg.legend(20, ax.y0 + ax.h + 50, names, colours, 400, dashed=[True])
    return svg.document(440, ax.y0 + ax.h + 50 + h, parts + leg, title)


def curves_chart(runs: dict[str, list[dict]], title: str) -> str:
    """Training loss and validation MF1 per epoch, two panels, as SVG; runs: name -> metrics.jsonl
    rows. Stage-1 rows carry `val_mf1`, Stage-2 rows `mf1`; a summary row (no `epoch`) is skipped."""
    series = {}
    for name, rows in runs.items():
        rows = [r for r in rows if "epoch" in r]
        series[name] = ([float(r["epoch"]) for r in rows], [float(r.get("loss", np.nan)) for r in rows],
                        [float(r.get("val_mf1", r.get("mf1", np.nan))) for r in rows])
    epochs = [e for ep, _, _ in series.values() for e in ep] or [0.0, 1.0]
    losses = [v for _, ls, _ in series.values() for v in ls if np.isfinite(v)] or [0.0, 1.0]
    xlim = (min(epochs), max(max(epochs), min(epochs) + 1))
    lo, hi = min(losses), max(losses)
    pad = 0.05 * ((hi - lo) or 1.0)
    panels = [(svg.Axes(70, 40, 320, 220, xlim, (lo - pad, hi + pad)), "training loss", 1),
              (svg.Axes(480, 40, 320, 220, xlim, (0, 1)), "validation Macro-F1", 2)]
    parts = []
    for ax, ylabel, col in panels:
        parts += ax.frame("epoch", ylabel)
        for k, values in enumerate(series.values()):
            pts = [(ax.px(e), ax.py(v)) for e, v in zip(values[0], values[col]) if np.isfinite(v)]
            parts.append(svg.polyline(pts, svg.PALETTE[k % len(svg.PALETTE)]))
    colours = [svg.PALETTE[k % len(svg.PALETTE)] for k in range(len(series))]
    leg, h = svg.legend(70, 310, list(series), colours, 730)
    return svg.document(830, 310 + h, parts + leg, title)


def ablation_chart(rows: list[dict], title: str) -> str:
    """MF1 heat maps, beta (rows) x gamma (columns), one panel per lambda, as SVG.
    rows: dicts with beta, gamma, lam, mf1 (fraction), best (bool), same (bool: a copy of another
    cell's value, that cell being the same loss; drawn with a leading '=')."""
    lams = sorted({r["lam"] for r in rows})
    betas = sorted({r["beta"] for r in rows})
    gammas = sorted({r["gamma"] for r in rows})
    vals = [r["mf1"] for r in rows]
    lo, hi = min(vals), max(vals)
    cw, ch = 58, 30
    parts, x0, y0 = [], 70.0, 44.0
    for lam in lams:
        ax = svg.Axes(x0, y0, cw * len(gammas), ch * len(betas), (0, len(gammas)), (len(betas), 0))
        parts += ax.frame("gamma", "beta", f"lambda {lam:g}", xticks=[j + 0.5 for j in range(len(gammas))],
                          yticks=[], xticklabels=[f"{g:g}" for g in gammas], grid=False, ylabel_gap=52)
        for i, b in enumerate(betas):
            parts.append(svg.text(x0 - 7, ax.py(i + 0.5) + 3.5, f"{b:g}", 10, "end"))
        for r in rows:
            if r["lam"] != lam:
                continue
            i, j = betas.index(r["beta"]), gammas.index(r["gamma"])
            t = (r["mf1"] - lo) / ((hi - lo) or 1.0)
            parts.append(svg.rect(ax.px(j), ax.py(i), cw, ch, svg.viridis(t), fill_opacity="0.85"))
            label = ("=" if r.get("same") else "") + f"{100 * r['mf1']:.1f}" + ("*" if r.get("best") else "")
            colour = "#fff" if t < 0.55 else "#000"
            parts.append(svg.text(ax.px(j + 0.5), ax.py(i + 0.5) + 4, label, 11, fill=colour,
                                  font_weight="bold" if r.get("best") else "normal",
                                  font_style="italic" if r.get("same") else "normal"))
        x0 += ax.w + 80
    h = ch * len(betas)
    parts += svg.colour_bar(x0 - 50, y0, h, 100 * lo, 100 * hi, "validation MF1 (%)", "ablation-bar")
    return svg.document(x0 + 40, y0 + h + 44, parts, title)


def tight_bbox_inside(fig, tol_px: float = 1.0) -> bool:
    """True when every artist (labels, titles, colour bars) lies inside the canvas."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    bb = fig.get_tightbbox(r).transformed(fig.dpi_scale_trans)  # inches -> display pixels
    w, h = fig.canvas.get_width_height()
    return bb.x0 >= -tol_px and bb.y0 >= -tol_px and bb.x1 <= w + tol_px and bb.y1 <= h + tol_px
