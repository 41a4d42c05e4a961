"""The PBC-LT benchmark (`make bench`): the paper's protocol with the three Lite backbones.

Every step is a `wbc` command (printed, and listed in BENCHMARKS.md) that is skipped when its
output is already complete, so an interrupted benchmark resumes where it stopped.

  prepare (Macenko, and --no-stain) -> split (PBC-LT's own test split held out, folds on the pool)
  for each backbone and fold: train -> extract (8 views) -> crt
  baseline: frozen ImageNet Lite0 (no fine-tuning) -> extract -> class-weighted logistic regression
  evaluate: Table 1 (supervised, decoupled, pairwise and full ensembles) + the baseline row
  Macenko on/off (lite0), the 27-point (beta, gamma, lambda) ablation, tau-norm / logit adjustment.

Scale knobs (environment or flags): EPOCHS, FOLDS ("0,1,2,3,4"), CROP (resize keeps 368:224),
BACKBONES ("lite0,lite1,lite2"), DATA (the pbc-lt folder); SECTION names the BENCHMARKS.md section
it writes ("pbc-lt"), so a scaled-down rerun can sit beside the main one.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.benchlib import pbc_lt_default, write_section

WBC = [sys.executable, "-m", "wbc"]
LOG: list[tuple[str, float]] = []


def run(args: list[str], done: Path | None = None) -> None:
    """Run a wbc command unless `done` exists; record the command and its wall time."""
    cmd = "wbc " + " ".join(shlex.quote(str(a)) for a in args)
    if done is not None and done.exists():
        print(f"[skip] {cmd}", flush=True)
        LOG.append((cmd, 0.0))
        return
    print(f"[run ] {cmd}", flush=True)
    t0 = time.time()
    subprocess.run([*WBC, *map(str, args)], check=True, cwd=ROOT)
    LOG.append((cmd, time.time() - t0))


def store_done(path: Path) -> Path:
    """A marker that exists only for a complete, split store."""
    import h5py

    marker = path.with_suffix(".split.ok")
    if not marker.exists() and path.exists():
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("complete") and "fold" in f:
                    marker.touch()
        except OSError:
            pass
    return marker


def stage(store: Path, name: str, backbone: str, folds: list[int], a, crt_args=(), train_extra=()) -> dict:
    """train -> extract -> crt for each fold; returns the run dir and the caches/heads path templates."""
    run_dir = Path(a.out) / "runs" / name
    cache = Path(a.out) / "features" / f"{name}-fold{{fold}}.zarr"
    heads = Path(a.out) / "runs" / f"crt-{name}"
    for k in folds:
        fold_dir = run_dir / f"fold{k}"
        resume = ["--resume"] if (fold_dir / "last.pt").exists() else []
        run(["train", store, "--backbone", backbone, "--pretrained", getattr(a, "pretrained", "package"), "--fold", k,
             "--epochs", a.epochs, "--crop", a.crop, "--batch-size", a.batch_size, "--lr", a.lr,
             *train_extra, "--out", run_dir, *resume], done=fold_dir / "best.pt" if _finished(fold_dir) else None)
        ck = Path(str(cache).format(fold=k))
        run(["extract", run_dir / f"fold{k}" / "best.pt", "--store", store, "--out", ck],
            done=ck if _complete(ck) else None)
        run(["crt", str(cache), "--fold", k, "--out", heads, *crt_args],
            done=heads / f"fold{k}" / "head.pt")
    return {"run": run_dir, "cache": str(cache), "head": str(heads / "fold{fold}" / "head.pt")}


def _ablation_best(csv_path: Path) -> dict:
    """The ablation's configuration with the best validation MF1 (chosen without the test set)."""
    import csv

    with open(csv_path, newline="") as f:
        return max(csv.DictReader(f), key=lambda r: float(r["mf1_mean"]))


def _finished(fold_dir: Path) -> bool:
    """A Stage-1 fold is finished when its best.pt is marked complete (it exists from epoch 1)."""
    import torch

    best = fold_dir / "best.pt"
    return best.exists() and bool(torch.load(best, map_location="cpu", weights_only=True).get("complete"))


def _complete(cache: Path) -> bool:
    p = cache / "zarr.json"
    return p.exists() and bool(json.loads(p.read_text()).get("attributes", {}).get("complete"))


def parse_folds(text: str) -> list[int]:
    """"0,1" -> [0, 1] (wbc's fold-list parser); "all" -> the five folds (the Makefile's FOLDS default)."""
    from wbc.errors import WbcError
    from wbc.folds import parse_fold_list as parse

    if text.strip() == "all":
        return [0, 1, 2, 3, 4]
    try:
        return parse(text)
    except WbcError as e:
        sys.exit(f"error: FOLDS: {e}")


def main() -> None:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=env("DATA", str(pbc_lt_default())))
    p.add_argument("--out", default=env("BENCH_OUT", "cache/bench"))
    p.add_argument("--stores", default=env("STORES", "cache/images"))
    p.add_argument("--epochs", type=int, default=int(env("EPOCHS", "6")))
    p.add_argument("--folds", default=env("FOLDS", "0,1,2,3,4"))
    p.add_argument("--crop", type=int, default=int(env("CROP", "160")))
    p.add_argument("--batch-size", type=int, default=int(env("BATCH", "32")))
    p.add_argument("--lr", type=float, default=float(env("LR", "1e-4")))
    p.add_argument("--baseline-views", default=env("BASELINE_VIEWS", "d4"))
    p.add_argument("--backbones", default=env("BACKBONES", "lite0,lite1,lite2"))
    p.add_argument("--skip", default=env("SKIP", ""), help="comma list: nostain,ablate,posthoc,baseline")
    p.add_argument("--section", default=env("SECTION", "pbc-lt"), help="the BENCHMARKS.md section to write")
    a = p.parse_args()
    folds = parse_folds(a.folds)
    skip = set(filter(None, a.skip.split(",")))
    out = Path(a.out)
    manifest = Path(a.data) / "manifest.csv"
    t_start = time.time()

    # The stores live where `wbc prepare` puts them by default, so the benchmark reuses them.
    stores = {"macenko": Path(a.stores) / "pbc-lt.h5", "nostain": Path(a.stores) / "pbc-lt-nostain.h5"}
    for kind, store in stores.items():
        if kind == "nostain" and "nostain" in skip:
            continue
        extra = ["--no-stain"] if kind == "nostain" else []
        run(["prepare", manifest, "--out", store, *extra], done=store_done(store))
        run(["split", store, "--folds", 5, "--seed", 0], done=store_done(store))

    models = {}
    for b in a.backbones.split(","):
        models[b] = stage(stores["macenko"], b, b, folds, a)
    fold_arg = ",".join(map(str, folds))
    table = out / "reports" / "table1"
    model_args = [x for b, m in models.items() for x in ("--model", f"{b}:{m['cache']}:{m['head']}")]
    run(["evaluate", *model_args,
         "--folds", fold_arg, "--out", table, "--title", "PBC-LT held-out test (900 cells)"])

    write_results(a, out, folds, time.time() - t_start)
    if "ablate" not in skip:
        run(["ablate", models["lite0"]["cache"], "--fold", fold_arg,
             "--out", out / "runs" / "ablate-lite0", "--overwrite"])
    write_results(a, out, folds, time.time() - t_start)
    if "posthoc" not in skip:
        lc = models["lite0"]["cache"]
        for tag, extra in (("tau", ["--tau", "auto"]), ("la", ["--logit-adjust", "1.0"])):
            heads = out / "runs" / f"crt-lite0-{tag}"
            for k in folds:
                run(["crt", lc, "--fold", k, "--out", heads, *extra], done=heads / f"fold{k}" / "head.pt")
        best = _ablation_best(out / "runs" / "ablate-lite0" / "ablate.csv")
        heads = out / "runs" / "crt-lite0-best"
        for k in folds:
            run(["crt", lc, "--fold", k, "--out", heads, "--beta", best["beta"], "--gamma", best["gamma"],
                 "--lam", best["lam"]], done=heads / f"fold{k}" / "head.pt")
        run(["evaluate", "--no-ensembles",
             "--model", f"cRT:{lc}:{models['lite0']['head']}",
             "--model", f"cRT best-on-validation ({best['label']}):{lc}:{heads}/fold{{fold}}/head.pt",
             "--model", f"cRT+tau:{lc}:{out}/runs/crt-lite0-tau/fold{{fold}}/head.pt",
             "--model", f"cRT+LA:{lc}:{out}/runs/crt-lite0-la/fold{{fold}}/head.pt",
             "--folds", fold_arg, "--out", out / "reports" / "posthoc"])
    write_results(a, out, folds, time.time() - t_start)
    if "baseline" not in skip:
        args = ["--store", stores["macenko"], "--out", out, "--folds", fold_arg, "--crop", str(a.crop),
                "--views", a.baseline_views]
        t0 = time.time()
        subprocess.run([sys.executable, str(ROOT / "tools" / "bench_baseline.py"), *map(str, args)], check=True, cwd=ROOT)
        LOG.append(("python tools/bench_baseline.py " + " ".join(map(str, args)), time.time() - t0))
    write_results(a, out, folds, time.time() - t_start)
    if "nostain" not in skip:
        ns = stage(stores["nostain"], "lite0-nostain", "lite0", folds, a)
        run(["evaluate", "--model", f"lite0-macenko:{models['lite0']['cache']}:{models['lite0']['head']}",
             "--folds", fold_arg, "--out", out / "reports" / "macenko-on"])
        run(["evaluate", "--model", f"lite0-nostain:{ns['cache']}:{ns['head']}", "--folds", fold_arg,
             "--out", out / "reports" / "macenko-off"])
    write_results(a, out, folds, time.time() - t_start)


def write_results(a, out: Path, folds: list[int], seconds: float) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_report import render

    body = render(a, out, folds, seconds, LOG)
    write_section(a.section, body)
    print(body)


if __name__ == "__main__":
    main()
