"""Render the PBC-LT benchmark's BENCHMARKS.md section from the reports bench_pbc.py wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from benchlib import machine

KEYS = ("mf1", "bacc", "mp", "mspec")


def _fmt(v: dict) -> str:
    return f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}"


def _rows(report: Path, prefix: str = "") -> list[tuple[str, list[str]]]:
    if not report.exists():
        return []
    doc = json.loads(report.read_text())
    return [(prefix + r["name"], [_fmt(r[k]) for k in KEYS]) for r in doc["rows"]]


def _baseline_rows(out: Path) -> list[tuple[str, list[str]]]:
    path = out / "reports" / "baseline.json"
    rows = []
    if path.exists():
        doc = json.loads(path.read_text())
        for name, folds in doc["rows"].items():
            cells = []
            for k in KEYS:
                v = np.array([f[k] for f in folds])
                cells.append(f"{100 * v.mean():.1f} ± {100 * v.std():.1f}")
            rows.append((name, cells))
    rows += [r for r in _rows(out / "reports" / "baseline-crt" / "report.json") if r[0].startswith("Decoupled")]
    return rows


def bar_checks(out: Path) -> list[str]:
    """Issue 7's bar, checked on the means: decoupled > supervised on BAcc (per backbone), the full
    ensemble > every single model on MF1, every Table 1 row > the frozen-features + LR baseline."""
    t1, base = out / "reports" / "table1" / "report.json", out / "reports" / "baseline.json"
    if not t1.exists():
        return ["(Table 1 not run)"]
    rows = json.loads(t1.read_text())["rows"]
    bacc = {r["name"]: r["bacc"]["mean"] for r in rows}
    single = [r for r in rows if r["kind"] in ("supervised", "decoupled")]
    full = [r for r in rows if r["kind"] == "ensemble" and r["name"].startswith("Ensemble all")]
    ok = lambda c: "PASS" if c else "FAIL"
    lines = []
    for r in single:
        if r["kind"] == "decoupled":
            sup = "Supervised " + r["name"].removeprefix("Decoupled ")
            if sup in bacc:
                d, s = bacc[r["name"]], bacc[sup]
                lines.append(f"- {ok(d > s)}: {r['name']} BAcc {100 * d:.1f} > {sup} {100 * s:.1f}")
    best = max(single, key=lambda r: r["mf1"]["mean"]) if single else None
    for f in full:
        m = f["mf1"]["mean"]
        lines.append(f"- {ok(m > best['mf1']['mean'])}: {f['name']} MF1 {100 * m:.1f} > best single model "
                     f"({best['name']}) {100 * best['mf1']['mean']:.1f}")
    if base.exists():
        for name, folds in json.loads(base.read_text())["rows"].items():
            b = float(np.mean([f["mf1"] for f in folds]))
            worse = [r["name"] for r in rows if r["mf1"]["mean"] <= b]
            lines.append(f"- {ok(not worse)}: every Table 1 row's MF1 > {name} {100 * b:.1f}"
                         + (f" (not: {', '.join(worse)})" if worse else ""))
    return lines


def _table(rows: list[tuple[str, list[str]]]) -> str:
    if not rows:  # a step left out with SKIP= (or not reached yet) shows as such, not as an empty table
        return "(not run)"
    lines = ["| Model | MF1 | BAcc | MP | MSpec |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | " + " | ".join(c) + " |" for n, c in rows]
    return "\n".join(lines)


def render(a, out: Path, folds: list[int], seconds: float, log: list[tuple[str, float]]) -> str:
    parts = [
        "## PBC-LT benchmark (`make bench`, `tools/bench_pbc.py`)",
        "",
        f"Machine: {machine()}. Total wall time {seconds / 60:.1f} min (steps already done were skipped).",
        (f"Settings: backbones {a.backbones} with offline ImageNet weights (`--pretrained package`), "
        f"Stage 1 {a.epochs} epochs at crop {a.crop} (resize keeps 368:224), batch {a.batch_size}, lr {a.lr:g}, "
        f"folds {folds} of 5 (PBC-LT's balanced test split, 900 cells, is the held-out test; "
        "the folds split its 2,438-cell long-tailed pool); 8 dihedral views; cRT with the paper's defaults."),
        "Values: percent, mean ± std over the folds run, on the held-out test.",
        "",
        "### Table 1",
        "",
        (out / "reports" / "table1" / "report.md").read_text().split("\n", 2)[2].split("## Per-class")[0].strip()
        if (out / "reports" / "table1" / "report.md").exists() else "(not run)",
        "",
        "### The bar (issue 7), checked on the means",
        "",
        *bar_checks(out),
        "",
        "### Plain baseline (same benchmark): frozen ImageNet features",
        "",
        _table(_baseline_rows(out)),
        "",
        "### Macenko on/off (lite0, decoupled)",
        "",
        _table([r for r in _rows(out / "reports" / "macenko-on" / "report.json", "Macenko on: ")
                + _rows(out / "reports" / "macenko-off" / "report.json", "Macenko off: ")]),
        "",
        "### Post-hoc: tau-normalisation and logit adjustment (lite0)",
        "",
        _table([r for r in _rows(out / "reports" / "posthoc" / "report.json") if r[0].startswith("Decoupled")]),
        "",
        "### Loss ablation, 27 points (lite0 cache)",
        "",
        (out / "runs" / "ablate-lite0" / "ablate.md").read_text().strip()
        if (out / "runs" / "ablate-lite0" / "ablate.md").exists() else "(not run)",
        "",
        "### Commands (wall time; 0 = already done)",
        "",
        "```",
        *[f"{cmd}    # {t / 60:.1f} min" for cmd, t in log],
        "```",
    ]
    return "\n".join(parts)
