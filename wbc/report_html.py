"""report.html for `wbc evaluate --out DIR` and `wbc report DIR`: built from what DIR holds.

Inputs (written by `wbc.report.write_report`): report.json (rows, metrics per fold, confusion,
class names, title, `sources`: store, caches, heads, checkpoints, optional ablation folder) and
report.npz (per row and fold the test probabilities; labels; store rows). Figures are drawn once
from these arrays; the only model pass is Grad-CAM on the gallery cells (capped per class).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import numpy as np

from wbc import figures
from wbc.errors import WbcError
from wbc.html import esc, figure, page, table, write_page
from wbc.metrics import per_class

log = logging.getLogger(__name__)
KEYS = (("mf1", "MF1"), ("bacc", "BAcc"), ("mp", "MP"), ("mspec", "MSpec"), ("ece", "ECE"))


def locate(recorded: str | None, anchor: Path) -> Path | None:
    """A path a cache recorded (relative to wherever extraction ran): as is, else under each folder
    above `anchor` (the cache), where extraction usually ran. None when not found."""
    if not recorded:
        return None
    p = Path(recorded)
    if p.exists() or p.is_absolute():
        return p.resolve() if p.exists() else None
    for base in Path(anchor).resolve().parents:
        if (base / p).exists():
            return (base / p).resolve()
    return None


def report_sources(models, folds: list[int]) -> dict:
    """Where a Table-1 report's inputs live (absolute paths), read from the caches' provenance:
    the image store, and per model and fold its cache, head and Stage-1 checkpoint (checked by sha256)."""
    from wbc.cache import open_cache
    from wbc.config import file_sha256

    out, store = [], None
    for m in models:
        ckpts = []
        for c in m.caches:
            attrs = open_cache(c).attrs
            store = store or locate(attrs.get("store_path"), Path(c))
            ck = locate(attrs.get("checkpoint_path"), Path(c))
            ok = ck is not None and file_sha256(ck) == attrs.get("checkpoint_sha256")
            ckpts.append(str(ck) if ok else None)
        out.append({"name": m.name, "caches": [str(Path(c).resolve()) for c in m.caches],
                    "heads": [str(Path(h).resolve()) for h in m.heads], "checkpoints": ckpts})
    return {"store": str(store) if store else None, "models": out, "folds": folds}


def _load(report_dir: Path) -> tuple[dict, dict | None]:
    path = report_dir / "report.json"
    if not path.is_file():
        raise WbcError(f"{report_dir}: no report.json (run `wbc evaluate --out {report_dir}` first)")
    doc = json.loads(path.read_text())
    npz = report_dir / "report.npz"
    arrays = None
    if npz.is_file():
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        if arrays["probs"].shape[0] != len(doc["rows"]):
            raise WbcError(f"{npz} holds {arrays['probs'].shape[0]} rows, report.json {len(doc['rows'])}: "
                           "rerun `wbc evaluate`")
    return doc, arrays


def _rank_marks(values: list[float], lower: bool) -> list[str]:
    from wbc.report.rows import ranks

    return ["best" if r == 0 else "second" if r == 1 else "" for r in ranks(values, lower)]


def metrics_table(doc: dict) -> str:
    rows = doc["rows"]
    cols = []
    for k, _ in KEYS:
        marks = _rank_marks([r[k]["mean"] for r in rows], k == "ece")
        cols.append([f'<span class="{m}">{100 * r[k]["mean"]:.1f} ± {100 * r[k]["std"]:.1f}</span>'
                     for r, m in zip(rows, marks)])
    body = [[esc(r["name"]), *[c[i] for c in cols], str(r["folds"][0].get("n", "")), str(len(r["folds"]))]
            for i, r in enumerate(rows)]
    return table(["Model", *[lab for _, lab in KEYS], "n", "folds"], body, raw=True)


def per_class_html(doc: dict, order: list[int]) -> str:
    names = doc["class_names"]
    body = [[esc(r["name"]), *[f"{100 * np.mean([f['f1_per_class'][i] for f in r['folds']]):.1f}" for i in order]]
            for r in doc["rows"]]
    return table(["F1 (%)", *[names[i] for i in order]], body, raw=True)


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curves_html(sources: dict) -> str:
    s1, s2 = {}, {}
    for m in sources.get("models", []):
        for k, ck in zip(sources.get("folds", []), m.get("checkpoints", [])):
            if ck:
                s1[f"{m['name']} fold {k}"] = _jsonl(Path(ck).parent / "metrics.jsonl")
        for k, h in zip(sources.get("folds", []), m.get("heads", [])):
            s2[f"{m['name']} fold {k}"] = _jsonl(Path(h).parent / "metrics.jsonl")
    parts = []
    for runs, label in ((s1, "Stage 1 (backbone fine-tuning)"), (s2, "Stage 2 (cRT head)")):
        runs = {k: v for k, v in runs.items() if v}
        if runs:
            parts.append(figure(figures.curves_chart(runs, label), f"{label} training curves"))
    return "\n".join(parts) or "<p>No metrics.jsonl found beside the checkpoints or heads.</p>"


def ablation_html(folder: str | None) -> str:
    path = Path(folder) / "ablate.csv" if folder else None
    if path is None or not path.is_file():
        return ""
    with open(path, newline="") as f:
        rows = [{"beta": float(r["beta"]), "gamma": float(r["gamma"]), "lam": float(r["lam"]),
                 "mf1": float(r["mf1_mean"]), "best": r["best"] == "1", "loss": r["loss"]} for r in csv.DictReader(f)]
    hybrid = [r for r in rows if r["loss"] == "cb_focal_hybrid"]
    rows = hybrid + _same_loss_cells(hybrid) if hybrid else rows
    best = next((r for r in rows if r["best"]), None)
    note = (f"<p>Validation Macro-F1 of each loss setting ({esc(path)}); * = best, beta={best['beta']:g} "
            f"gamma={best['gamma']:g} lambda={best['lam']:g}. A cell marked = is the same loss as a trained "
            "cell (gamma 0 or lambda 0: CB-CE at that beta), trained once and shown with its value.</p>"
            if best else "")
    return "<h2>Loss ablation</h2>" + note + figure(figures.ablation_chart(rows, "Stage-2 loss ablation"),
                                                     "loss ablation heat map")


def _confusion_png(report_dir: Path, cm: np.ndarray, names: list[str], title: str, sub: str):
    """confusion.png as `wbc evaluate` drew it beside report.json (the same best row; figures are
    made once per report), else drawn now (a folder without it)."""
    png, js = report_dir / "confusion.png", report_dir / "report.json"
    if png.is_file() and png.stat().st_mtime_ns >= js.stat().st_mtime_ns:
        return png.read_bytes()
    return figures.confusion_figure(cm, names, title, sub)


def _same_loss_cells(rows: list[dict]) -> list[dict]:
    """Heat-map cells `wbc ablate` skipped as duplicates (LossSpec.key), holding the value of the
    trained cell that is the same loss, marked `same`."""
    from itertools import product

    from wbc.losses import LossSpec

    spec = lambda b, g, lam: LossSpec("cb_focal_hybrid", b, g, lam).key()
    trained = {spec(r["beta"], r["gamma"], r["lam"]): r for r in rows}
    have = {(r["beta"], r["gamma"], r["lam"]) for r in rows}
    axes = [sorted({r[k] for r in rows}) for k in ("beta", "gamma", "lam")]
    return [{**trained[spec(b, g, lam)], "gamma": g, "lam": lam, "best": False, "same": True}
            for b, g, lam in product(*axes) if (b, g, lam) not in have and spec(b, g, lam) in trained]


def _gallery_model(doc: dict, best: dict) -> tuple[Path | None, Path | None, str]:
    """Checkpoint and head of the best row's first member at the first fold, for Grad-CAM."""
    src = doc.get("sources") or {}
    by = {m["name"]: m for m in src.get("models", [])}
    name = best["members"][0] if best.get("members") else None
    m = by.get(name)
    if not m or not m.get("checkpoints") or not m["checkpoints"][0]:
        return None, None, ""
    decoupled = not (best["kind"] == "supervised" or best["name"].startswith("Supervised"))
    head = Path(m["heads"][0]) if decoupled and m.get("heads") else None
    fold = (src.get("folds") or [0])[0]
    return Path(m["checkpoints"][0]), head, f"{name} fold {fold}" + (" with its cRT head" if head else "")


def render_report(report_dir: str | Path, per_class_cells: int = 8, saliency: bool = True,
                  device: str = "cpu", out: Path | None = None) -> Path:
    """Write DIR/report.html from DIR/report.json and DIR/report.npz; returns its path."""
    t0 = time.perf_counter()
    report_dir = Path(report_dir)
    doc, arrays = _load(report_dir)
    rows = doc["rows"]
    best = max(rows, key=lambda r: r["mf1"]["mean"])
    src = doc.get("sources") or {}
    title = doc.get("title") or "Evaluation"
    body = _summary(doc, best, report_dir, title)
    if arrays is not None:
        body.append('<h2 id="calibration">Reliability</h2>')
        labels, c = arrays["labels"], len(doc["class_names"])
        ok = labels >= 0
        curves = {r["name"]: (arrays["probs"][i][:, ok].reshape(-1, c), np.tile(labels[ok], arrays["probs"].shape[1]))
                  for i, r in enumerate(rows)}
        body.append(figure(figures.reliability_chart(curves, "Reliability (all folds' predictions pooled)"),
                           "reliability diagram"))
    if src:
        body += ['<h2 id="curves">Training curves</h2>', curves_html(src), ablation_html(src.get("ablation"))]
    body.append('<h2 id="gallery">Cells</h2>')
    stats = {"cells": 0, "saliency": 0}
    if arrays is None:
        body.append("<p>Per-cell predictions: predictions.csv beside this report.</p>")
    else:
        html_, stats = _gallery(doc, arrays, best, per_class_cells, saliency, device)
        body.append(html_)
    path = write_page(out or report_dir / "report.html", page(title, body, f"wbc evaluation report: {esc(report_dir)}"))
    log.info("report.html: %d gallery cells, %d saliency maps (%.1f s), %.1f s in all -> %s", stats["cells"],
             stats["saliency"], stats.get("saliency_s", 0.0), time.perf_counter() - t0, path)
    return path


def _summary(doc: dict, best: dict, report_dir: Path, title: str) -> list[str]:
    """Navigation, the data scored with n per class, the metrics tables, the confusion matrix and
    the per-class bars of the best row."""
    names, src = doc["class_names"], doc.get("sources") or {}
    order = figures.lineage_order(names)
    cm = np.asarray(best["confusion"])
    n = best["folds"][0]["n"]
    support = cm.sum(1) // max(len(best["folds"]), 1)
    scored = doc.get("scored") or (f"held-out test rows (fold -1) of image store {src.get('store') or '?'}"
                                   f"; folds {doc.get('folds')}")
    counts = ", ".join(f"{names[i]} {int(support[i])}" for i in order)
    sub = f"{best['name']}: n = {n} cells" + (f" x {len(best['folds'])} folds' models (summed)" if len(best["folds"]) > 1 else "")
    sub += f", Macro-F1 {100 * best['mf1']['mean']:.1f}"
    return [('<nav><a href="#metrics">Metrics</a><a href="#confusion">Confusion</a><a href="#calibration">'
            'Calibration</a><a href="#curves">Training</a><a href="#gallery">Cells</a></nav>'),
            f"<p><b>Data scored:</b> {esc(scored)}.<br><b>n = {n} cells</b>; n per class: {esc(counts)}.</p>",
            '<h2 id="metrics">Metrics</h2>', metrics_table(doc),
            ("<p>Percent, mean ± std over folds; <span class='best'>best bold</span>, "
             "<span class='second'>second underlined</span>; ECE: lower is better.</p>"), per_class_html(doc, order),
            '<h2 id="confusion">Confusion matrix of the best row</h2>',
            figure(_confusion_png(report_dir, cm, names, title, sub), "confusion matrix"),
            figure(figures.per_class_chart(per_class(cm), names, f"{best['name']}: per-class precision, recall, F1"),
                   "per-class bars")]


def _gallery(doc: dict, arrays: dict, best: dict, per_class_cells: int, saliency: bool, device: str
             ) -> tuple[str, dict]:
    """The best row's cell gallery (probabilities averaged over its fold models) with its caption."""
    from wbc.gallery import gallery_html, select_cells

    names = doc["class_names"]
    probs = arrays["probs"][doc["rows"].index(best)].mean(0)
    groups = select_cells(probs, arrays["labels"], arrays["index"], names, per_class_cells)
    ckpt, head, who = _gallery_model(doc, best)
    store = _open_store((doc.get("sources") or {}).get("store"))
    html_, stats = gallery_html(groups, names, store, ckpt, head, device, saliency)
    caption = (f"<p>{esc(best['name'])}, probabilities averaged over its {arrays['probs'].shape[1]} fold model(s). "
               f"Per true class: misclassified cells first, then the least confident correct ones (at most "
               f"{per_class_cells}). ")
    if stats["saliency"]:
        caption += (f"Left: the cell as the model sees it (Macenko, centre crop); right: Grad-CAM for the "
                    f"predicted class ({esc(who)}).</p>")
    else:
        why = "left out (--no-saliency)" if not saliency else f"not drawn ({esc(who) or 'no checkpoint found'})"
        caption += f"The cells as stored (Macenko); saliency maps {why}.</p>"
    return caption + html_, stats


def _open_store(path):
    if not path or not Path(path).is_file():
        if path:
            log.warning("image store %s not found: the gallery shows no images", path)
        return None
    from wbc.store import open_store

    return open_store(path)


def render_run(run_dir: str | Path, out: Path | None = None) -> Path:
    """run.html: training curves of every metrics.jsonl under a Stage-1 or cRT run folder."""
    run_dir = Path(run_dir)
    runs = {str(p.parent.relative_to(run_dir)) or run_dir.name: _jsonl(p)
            for p in sorted(run_dir.glob("**/metrics.jsonl"))}
    runs = {k: v for k, v in runs.items() if any("epoch" in r for r in v)}
    if not runs:
        raise WbcError(f"{run_dir}: no metrics.jsonl with epochs found")
    body = [f"<p><b>Run:</b> {esc(run_dir)} ({len(runs)} fold(s)).</p>",
            figure(figures.curves_chart(runs, f"Training curves: {run_dir.name}"), "training curves")]
    return write_page(out or run_dir / "run.html", page(f"Training run {run_dir.name}", body, "wbc run report"))
