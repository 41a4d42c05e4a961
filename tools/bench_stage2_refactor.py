"""Stage 2 before and after a refactor: the same `wbc crt` / `wbc ablate` / `wbc evaluate` commands
run by two source trees on one feature cache, and (optionally) two `tools/bench_crt.py` JSONs.

Usage: .venv/bin/python tools/bench_stage2_refactor.py --old /tmp/h13-old \
           --cache cache/xlab/features/lite0-c160-fold0.zarr --fold 0 --out /tmp/h13-bench/real \
           [--bench-old old.json old2.json --bench-new new.json new2.json] [--section stage2-refactor]
           [--print-only]

Each tree runs, with PYTHONPATH set to it: `wbc crt` with the defaults, the 27-point `wbc ablate`,
`wbc crt` with the ablation's best loss on validation, and `wbc evaluate` of both heads on the
held-out test. Reported per tree: validation and test MF1, the ablation's best configuration, the
largest weight difference between the two trees' heads, and wall times (one run each, on a shared
machine). Outputs of a finished step are reused (delete --out to rerun).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.benchlib import machine, write_section


def wbc(tree: Path, *args) -> float:
    """Run `python -m wbc ARGS` from `tree` (its code first on the path); wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(tree), "WBC_NO_PROGRESS": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "wbc", *map(str, args)], cwd=tree, env=env, check=True)
    return time.perf_counter() - t0


def run_tree(tree: Path, cache: str, fold: int, out: Path) -> dict:
    """The four commands in `tree`; their figures."""
    seconds = out / "seconds.json"  # wall times of the steps run so far (a rerun reuses their outputs)
    res: dict = {"seconds": json.loads(seconds.read_text()) if seconds.exists() else {}}
    steps = [("crt", ["crt", cache, "--fold", fold, "--out", out / "crt", "--threads", 1], out / "crt" / f"fold{fold}" / "head.pt"),
             ("ablate", ["ablate", cache, "--fold", fold, "--out", out / "ablate", "--threads", 1], out / "ablate" / "ablate.csv")]
    for name, args, done in steps:
        if not done.exists():
            res["seconds"][name] = wbc(tree, *args)
            seconds.write_text(json.dumps(res["seconds"]))
    rows = list(csv.DictReader((out / "ablate" / "ablate.csv").open()))
    best = next(r for r in rows if r["best"] == "1")
    res["ablate_best"] = {"label": best["label"], "val_mf1": float(best["mf1_mean"])}
    head_best = out / "crt-best" / f"fold{fold}" / "head.pt"
    if not head_best.exists():
        res["seconds"]["crt-best"] = wbc(tree, "crt", cache, "--fold", fold, "--out", out / "crt-best", "--threads", 1,
                                         "--beta", best["beta"], "--gamma", best["gamma"], "--lam", best["lam"])
        seconds.write_text(json.dumps(res["seconds"]))
    if not (out / "eval" / "report.json").exists():
        wbc(tree, "evaluate", "--no-ensembles", "--folds", fold, "--out", out / "eval",
            "--model", f"default:{cache}:{out / 'crt' / 'fold{fold}' / 'head.pt'}",
            "--model", f"best:{cache}:{out / 'crt-best' / 'fold{fold}' / 'head.pt'}")
    report = json.loads((out / "eval" / "report.json").read_text())
    res["test_mf1"] = {r["name"]: r["mf1"]["mean"] for r in report["rows"]}
    for name in ("crt", "crt-best"):
        final = json.loads((out / name / f"fold{fold}" / "metrics.jsonl").read_text().splitlines()[-1])
        res[f"{name}_val_mf1"] = final["metrics"]["mf1"]
        res[f"{name}_best_epoch"] = final["best_epoch"]
    return res


def weight_gap(a: Path, b: Path) -> float:
    import torch

    wa, wb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    return max(float((wa[k] - wb[k]).abs().max()) for k in ("weight", "bias"))


def bench_rows(olds: list[dict], news: list[dict]) -> list[str]:
    """tools/bench_crt.py figures of the two trees side by side (runs of a tree joined by ' / ')."""
    def ratio(r):
        return r["sequential_s"] / r["grid_s"] if "sequential_s" in r else float("nan")

    figs = [("(1) one head: wall s", lambda r: r["single_s"]), ("(1) one head: CPU s", lambda r: r["cpu"]["single"]),
            ("(2) 27-head grid in one pass: wall s", lambda r: r["grid_s"]),
            ("(2) 27-head grid in one pass: CPU s", lambda r: r["cpu"]["grid"]),
            ("(2) the 27 heads one after another: CPU s", lambda r: r["cpu"].get("sequential", float("nan"))),
            ("(2) one after another / grid: wall", ratio),
            ("(2) one after another / grid: CPU", lambda r: r["cpu"].get("sequential", float("nan")) / r["cpu"]["grid"]),
            ("(2) grid vs alone: max weight difference", lambda r: r.get("max_weight_diff", float("nan"))),
            ("(3) streaming: peak RSS above the baseline, MiB", lambda r: (r["stream"]["peak"] - r["stream"]["base"]) / 2**20),
            ("fp32 GEMM GFLOP/s measured in the run (best of 2)", lambda r: r["gemm"] / 1e9)]
    def cell(runs: list[dict], f) -> str:
        return " / ".join(f"{f(r):.3g}" for r in runs)

    return [f"| {name} | {cell(olds, f)} | {cell(news, f)} |" for name, f in figs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True, help="source tree of the code before the change")
    ap.add_argument("--new", type=Path, default=ROOT)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "cache/bench/stage2-refactor")
    ap.add_argument("--bench-old", type=Path, nargs="*", default=[], help="bench_crt.json file(s) of the old tree")
    ap.add_argument("--bench-new", type=Path, nargs="*", default=[], help="... of the new tree, run in turn with them")
    ap.add_argument("--bench-epochs", type=int, default=15, help="the --epochs the bench_crt JSONs ran with")
    ap.add_argument("--section", default="stage2-refactor")
    ap.add_argument("--print-only", action="store_true")
    a = ap.parse_args()
    res = {v: run_tree(t.resolve(), a.cache, a.fold, a.out / v) for v, t in (("old", a.old), ("new", a.new))}
    gaps = {n: weight_gap(*(a.out / v / n / f"fold{a.fold}" / "head.pt" for v in ("old", "new"))) for n in ("crt", "crt-best")}
    (a.out / "result.json").write_text(json.dumps({**res, "weight_gap": gaps}, indent=1))
    o, n = res["old"], res["new"]
    pct = lambda x: f"{100 * x:.2f}"
    lines = [
        "## stage2-refactor (`tools/bench_stage2_refactor.py`)", "",
        (f"The Stage-2 library refactor (issue 13: `wbc.stage2.fit`, `HeadConfig`, `Head`, `FeatureCache.split`) "
         f"against the code before it, same commands on the same cache (`{a.cache}`, validation fold {a.fold}, "
         "1 torch thread): `wbc crt` with the defaults, the 27-point `wbc ablate`, `wbc crt` with the "
         "ablation's best loss, `wbc evaluate` of both heads on the held-out test."), "",
        "| figure | before | after |", "|---|---|---|",
        f"| cRT defaults: validation MF1 (best epoch) | {pct(o['crt_val_mf1'])} ({o['crt_best_epoch']}) | {pct(n['crt_val_mf1'])} ({n['crt_best_epoch']}) |",
        f"| cRT defaults: test MF1 | {pct(o['test_mf1']['Decoupled default'])} | {pct(n['test_mf1']['Decoupled default'])} |",
        f"| ablation's best on validation | {o['ablate_best']['label']}: {pct(o['ablate_best']['val_mf1'])} | {n['ablate_best']['label']}: {pct(n['ablate_best']['val_mf1'])} |",
        f"| cRT with that loss: validation / test MF1 | {pct(o['crt-best_val_mf1'])} / {pct(o['test_mf1']['Decoupled best'])} | {pct(n['crt-best_val_mf1'])} / {pct(n['test_mf1']['Decoupled best'])} |",
        f"| max abs weight difference of the heads, before vs after | | {gaps['crt']:.1e} (defaults), {gaps['crt-best']:.1e} (best) |",
    ]
    for step in ("crt", "ablate", "crt-best"):
        if step in o["seconds"] and step in n["seconds"]:
            lines.append(f"| `wbc {step.replace('-best', '')}` wall s{' (best loss)' if 'best' in step else ''} | "
                         f"{o['seconds'][step]:.1f} | {n['seconds'][step]:.1f} |")
    if a.bench_old and a.bench_new:
        bo, bn = ([json.loads(p.read_text()) for p in ps] for ps in (a.bench_old, a.bench_new))
        lines += ["", (f"`tools/bench_crt.py --epochs {a.bench_epochs}` (synthetic {bo[0]['rows']:,} images x 8 views x "
                       f"2048; {len(bo)} run(s) per tree, the trees in turn, on the same cache; values of successive "
                       "runs joined by ' / '; the machine was shared with other jobs, so wall times swing with their "
                       "load and CPU seconds are the steadier figure):"), "",
                  "| figure | before | after |", "|---|---|---|", *bench_rows(bo, bn)]
    old_rev = subprocess.run(["git", "-C", str(a.old), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=False).stdout.strip() or "?"
    lines += ["", f"Machine: {machine()}. Old tree: commit {old_rev} (`git worktree add --detach {a.old} {old_rev}`).",
              f"Command: `python tools/{Path(__file__).name} {' '.join(sys.argv[1:])}`."]
    md = "\n".join(lines)
    print(md)
    if not a.print_only:
        write_section(a.section, md)


if __name__ == "__main__":
    main()
