"""Robustness benchmark (section "robustness" of BENCHMARKS.md): Macenko on/off x degradation training.

One Lite backbone with cRT, four variants, each scored three ways:
  BACKBONE                Macenko store,    default augmentation   (reused from tools/bench_pbc.py)
  BACKBONE-nostain        --no-stain store, default augmentation   (reused from tools/bench_pbc.py)
  BACKBONE-deg            Macenko store,    --augment degradations (trained here)
  BACKBONE-nostain-deg    --no-stain store, --augment degradations (trained here)
  1. PBC-LT held-out test MF1: `wbc evaluate --model`, mean +- std over the fold models;
  2. JTSC MF1 (another lab, stain and camera; SNE,BNE -> NE): `wbc evaluate --ensemble --external`
     through the full predict path, the fold models' ensemble and each fold model;
  3. mean MF1 over every degradation x severity 1-4: `wbc robustness` (ensemble and fold models).

Every step is a `wbc` command skipped when its output is complete (the PBC-LT benchmark's stores,
Stage-1 runs, caches and heads under --out are reused as they are), so an interrupted run resumes;
degraded features are kept in the members' caches and read back by a rerun.

Scale knobs (flags or environment): FOLDS, EPOCHS, CROP, BATCH, LR (pass bench_pbc's, so its runs are
reused), STORES, BENCH_OUT, BACKBONE, JTSC_ZOOM (default: estimated), MAX_IMAGES (test subset
for the degraded extraction, 0 = all), VIEWS (degraded extraction; default identity: 8x cheaper
than the caches' d4), SEVERITIES, DEGRADATIONS (default all), DEG_AUGMENT (the train augmentation
of the -deg variants).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools import bench_pbc
from tools.benchlib import BENCH, machine, pbc_lt_default, write_section

run = bench_pbc.run


def variant(name: str, store: Path, a, train_extra: list[str]) -> dict:
    """Stage the variant, save its ensemble (with caches), score PBC-LT, JTSC and degradations."""
    # bench_pbc's own stage (same paths and Stage-1 arguments), so its runs are reused as they are.
    m = bench_pbc.stage(store, name, a.backbone, a.fold_list, a, train_extra=train_extra)
    out = Path(a.out) / "reports" / "robustness-bench"
    ens = Path(a.out) / "ensembles" / f"{name}.yaml"
    members, deps = [], []
    for k in a.fold_list:
        ckpt, head, cache = Path(f"{m['run']}/fold{k}/best.pt"), Path(m["head"].format(fold=k)), m["cache"].format(fold=k)
        members += ["--member", f"{ckpt}:{head}", "--cache", cache]
        deps += [ckpt, head, Path(cache) / "zarr.json"]
    run(["ensemble", "save", *members, "--store", store, "--out", ens], done=ens if _newer(ens, *deps) else None)
    run(["evaluate", "--no-ensembles", "--model", f"{name}:{m['cache']}:{m['head']}",
         "--folds", ",".join(map(str, a.fold_list)), "--out", out / "pbc" / name])
    jtsc = out / "jtsc" / name
    run(["evaluate", "--ensemble", ens, "--external", Path(a.jtsc) / "manifest.csv",
         "--label-map", a.label_map, "--out", jtsc, "--title", f"JTSC: {name}"],
        done=jtsc / "report.json" if _newer(jtsc / "report.json", ens) else None)
    # The same at the cell scale of PBC-LT: JTSC's 120 px crops show cells ~1.6x wider (tools/cell_scale.py).
    jz = out / "jtsc-zoom" / name
    run(["evaluate", "--ensemble", ens, "--external", Path(a.jtsc) / "manifest.csv", "--zoom", a.jtsc_zoom,
         "--label-map", a.label_map, "--out", jz, "--title", f"JTSC at zoom {a.jtsc_zoom:g}: {name}"],
        done=jz / "report.json" if _newer(jz / "report.json", ens) and _zoom_of(jz) == a.jtsc_zoom else None)
    extra = ["--max-images", a.max_images, "--severities", a.severities]
    extra += ["--views", a.views] if a.views else []
    for d in filter(None, a.degradations.split(",")):
        extra += ["--degradation", d]
    run(["robustness", store, "--ensemble", ens, "--out", out / "robustness" / name, *extra])
    return {"pbc": out / "pbc" / name / "report.json", "jtsc": jtsc / "report.json", "jtsc_zoom": jz / "report.json",
            "robustness": out / "robustness" / name / "robustness.json"}


def _zoom_of(report_dir: Path) -> float | None:
    p = report_dir / "report.json"
    return json.loads(p.read_text()).get("zoom") if p.exists() else None


def _newer(path: Path, *deps: Path) -> bool:
    """path exists and is at least as new as every dependency (else its step reruns)."""
    return path.exists() and all(path.stat().st_mtime >= d.stat().st_mtime for d in deps)


def _ms(values) -> str:
    v = 100 * np.asarray(values, np.float64)
    return f"{v.mean():.1f} ± {v.std():.1f}"


def summarise(name: str, paths: dict) -> dict:
    pbc = json.loads(paths["pbc"].read_text())
    dec = next(r for r in pbc["rows"] if r["kind"] == "decoupled")
    jt = json.loads(paths["jtsc"].read_text())
    jz = json.loads(paths["jtsc_zoom"].read_text())
    rb = json.loads(paths["robustness"].read_text())
    members = [s for s in rb["summary"] if not s["row"].startswith("Ensemble")]
    ens = rb["summary"][-1]
    per_deg = {}
    for d in rb["degradations"]:
        v = [r["mf1"] for r in rb["records"] if r["row"] == ens["row"] and r["degradation"] == d and r["severity"]]
        per_deg[d] = float(np.mean(v))
    curve = {s: float(np.mean([r["mf1"] for r in rb["records"] if r["row"] == ens["row"] and r["severity"] == s]))
             for s in rb["severities"]}
    return {"name": name, "pbc": f"{100 * dec['mf1']['mean']:.1f} ± {100 * dec['mf1']['std']:.1f}",
            "jtsc_ens": f"{100 * jt['rows'][-1]['mf1']['mean']:.1f}",
            "jtsc_members": _ms([r["mf1"]["mean"] for r in jt["rows"][:-1]]) if len(jt["rows"]) > 1 else "-",
            "jtsc_zoom": f"{100 * jz['rows'][-1]['mf1']['mean']:.1f}",
            "deg_ens": f"{100 * ens['mean_mf1']:.1f}", "clean_ens": f"{100 * ens['clean_mf1']:.1f}",
            "deg_members": _ms([s["mean_mf1"] for s in members]) if len(rb["summary"]) > 1 else "-",
            "per_deg": per_deg, "curve": curve, "rb": rb, "jt": jt}


def compare_png(results: list[dict], path: Path) -> Path:
    """Ensemble MF1 (mean over degradations) against severity, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for r in results:
        xs = sorted(r["curve"])
        ax.plot(xs, [100 * r["curve"][x] for x in xs], marker="o", label=r["name"])
    ax.set_xlabel("severity")
    ax.set_ylabel("MF1 (%), mean over degradations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render(a, results: list[dict], flags: dict, seconds: float, png: Path) -> str:
    rb, jt = results[0]["rb"], results[0]["jt"]
    lines = [
        "## Robustness (`tools/bench_robustness.py`)", "",
        (f"{a.backbone} + cRT, folds {','.join(map(str, a.fold_list))} ({a.epochs} epochs, crop {a.crop}, lr {a.lr:g}); "
        f"degradation training: `wbc train --augment {a.deg_augment}`."),
        (f"PBC-LT: held-out test ({rb['n_test']} cells), decoupled row, mean ± std over the fold models. "
        f"JTSC: {jt['n_images']} cells from another lab (stain, camera), label map `{a.label_map}`, "
        f"{jt['n_scored']} scored; model classes with no counterpart: {', '.join(jt['unmapped_model']) or 'none'}. "
        f"JTSC's 120 px crops show the cells wider than PBC-LT's frames do; the zoom column shrinks each image's "
        f"content by {a.jtsc_zoom:g} inside its frame (`--zoom`, padding with the background) to PBC-LT's cell "
        "scale, estimated without labels by `tools/cell_scale.py`. "
        f"Degraded: {rb['n_images']} test cells, views {', '.join(rb['views'])}, degradations "
        f"{', '.join(rb['degradations'])} at severities {', '.join(map(str, rb['severities'][1:]))}; "
        "mean MF1 over all of them. Ensemble = the fold models' mean softmax. MF1 in percent."), "",
        ("| Macenko | degradation training | PBC-LT test MF1 | JTSC MF1 (ensemble) | JTSC MF1 (fold models) "
        f"| JTSC MF1 at zoom {a.jtsc_zoom:g} (ensemble) "
        "| degraded MF1 (ensemble) | degraded MF1 (fold models) | clean MF1 (ensemble, same views) |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        mac, deg = flags[r["name"]]
        lines.append(f"| {'on' if mac else 'off'} | {'on' if deg else 'off'} | {r['pbc']} | {r['jtsc_ens']} | "
                     f"{r['jtsc_members']} | {r['jtsc_zoom']} | {r['deg_ens']} | {r['deg_members']} | {r['clean_ens']} |")
    degs = list(results[0]["per_deg"])
    lines += ["", "Ensemble MF1 per degradation (mean over severities):", "",
              "| variant | " + " | ".join(degs) + " |", "|---|" + "---:|" * len(degs)]
    lines += [f"| {r['name']} | " + " | ".join(f"{100 * r['per_deg'][d]:.1f}" for d in degs) + " |"
              for r in results]
    lines += ["", (f"Plot (ensemble MF1 against severity per variant): `{png}`; per-variant reports under "
              f"`{Path(a.out) / 'reports' / 'robustness-bench'}`."), "",
              (f"Total wall time {seconds / 60:.1f} min. Machine: {machine()}. Other processes may share "
              "the CPU; timings may be disturbed."), "", "<details><summary>Commands</summary>", "", "```"]
    lines += [f"{cmd}   # {t:.0f} s" for cmd, t in bench_pbc.LOG]
    lines += ["```", "</details>"]
    return "\n".join(lines)


def main() -> None:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=env("DATA", str(pbc_lt_default())))
    p.add_argument("--jtsc", default=env("JTSC", str(ROOT.parent / "shared" / "data" / "jtsc")))
    p.add_argument("--out", default=env("BENCH_OUT", "cache/bench"))
    p.add_argument("--backbone", default=env("BACKBONE", "lite0"))
    p.add_argument("--pretrained", default=env("PRETRAINED", "package"))
    p.add_argument("--epochs", type=int, default=int(env("EPOCHS", "6")))
    p.add_argument("--folds", default=env("FOLDS", "0,1,2,3,4"))
    p.add_argument("--crop", type=int, default=int(env("CROP", "160")))
    p.add_argument("--batch-size", type=int, default=int(env("BATCH", "32")))
    p.add_argument("--lr", type=float, default=float(env("LR", "1e-4")))
    p.add_argument("--stores", default=env("STORES", "cache/images"), help="where bench_pbc's stores live")
    p.add_argument("--size", type=int, default=int(env("SIZE", "368")), help="stored image side (prepare)")
    p.add_argument("--deg-augment", default=env("DEG_AUGMENT", "degradations"))
    p.add_argument("--label-map", default=env("LABEL_MAP", "SNE=NE,BNE=NE"))
    p.add_argument("--jtsc-zoom", type=float, default=float(env("JTSC_ZOOM", "0") or 0),
                   help="--zoom for the JTSC rerun (0: estimate with tools/cell_scale.py)")
    p.add_argument("--max-images", type=int, default=int(env("MAX_IMAGES", "0")))
    p.add_argument("--views", default=env("VIEWS", "identity"))
    p.add_argument("--severities", default=env("SEVERITIES", "1,2,3,4"))
    p.add_argument("--degradations", default=env("DEGRADATIONS", ""), help="comma list (default: all)")
    p.add_argument("--skip", default=env("SKIP", ""), help="comma list: nostain, deg")
    p.add_argument("--bench-file", type=Path, default=BENCH, help="where the section is written")
    a = p.parse_args()
    a.fold_list = bench_pbc.parse_folds(a.folds)
    if not a.jtsc_zoom:
        from tools.cell_scale import median_size

        t, e = (median_size(Path(m) / "manifest.csv", 200)[0] for m in (a.data, a.jtsc))
        a.jtsc_zoom = round(t / e, 2)
    skip = set(filter(None, a.skip.split(",")))
    out, t0 = Path(a.out), time.time()
    stores = {True: Path(a.stores) / "pbc-lt.h5", False: Path(a.stores) / "pbc-lt-nostain.h5"}
    b, deg_args = a.backbone, ["--augment", a.deg_augment]
    plan = [(b, True, False, []), (f"{b}-nostain", False, False, []),
            (f"{b}-deg", True, True, deg_args), (f"{b}-nostain-deg", False, True, deg_args)]
    plan = [v for v in plan if not ("nostain" in skip and not v[1]) and not ("deg" in skip and v[2])]
    for mac in sorted({v[1] for v in plan}, reverse=True):
        extra = [] if mac else ["--no-stain"]
        run(["prepare", Path(a.data) / "manifest.csv", "--out", stores[mac], "--size", a.size, *extra],
            done=bench_pbc.store_done(stores[mac]))
        run(["split", stores[mac], "--folds", 5, "--seed", 0], done=bench_pbc.store_done(stores[mac]))
    results, flags = [], {}
    for name, mac, deg, train_extra in plan:
        results.append(summarise(name, variant(name, stores[mac], a, train_extra)))
        flags[name] = (mac, deg)
    png = compare_png(results, out / "reports" / "robustness-bench" / "compare.png")
    body = render(a, results, flags, time.time() - t0, png)
    write_section("robustness", body, path=a.bench_file)
    print(body)


if __name__ == "__main__":
    main()
