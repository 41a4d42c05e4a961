"""Robust Stage 1 (issue 15): recipes x WiSE-FT alpha, and the frozen pretrained member, scored on
PBC-LT test, degraded PBC-LT test and JTSC (another lab); chosen on PBC-LT validation only.

    nice -n 5 .venv/bin/python tools/bench_robust_stage1.py --work cache/rs1      # resumable
    .venv/bin/python tools/bench_robust_stage1.py --work cache/rs1 --report-only  # section from what is done

Every step is the library call behind a CLI command (listed in the section) and is skipped when its
result exists, so an interrupted run resumes; rows are processed recipe by recipe, so a short
budget still gives whole rows. Per model: `wbc extract --views identity`, `wbc crt` (fold 0, the
ablation's validation-best loss: cb_focal_hybrid beta 0.99, gamma 2, lam 1), `wbc evaluate` (test),
`wbc ensemble save` + `wbc evaluate --external JTSC --label-map SNE=NE,BNE=NE`, `wbc robustness`
(300 test images, stain_jitter and gaussian_blur at severity 3), and the same degradations on 300
validation images (selection only). Choice: the best mean of validation MF1 and degraded
validation MF1 -- never JTSC.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.benchlib import machine, write_section

ROOT = Path(__file__).resolve().parents[1]
STORE = str(ROOT / "cache" / "images" / "pbc-lt.h5")  # `wbc prepare`'s default place (README)
JTSC = str(ROOT.parent / "shared" / "data" / "jtsc" / "manifest.csv")
LABEL_MAP = "SNE=NE,BNE=NE"
RECIPES = {  # name -> (augment, recipe)
    "paper": ("randaugment", "paper"),
    "scale-degr": ("scale,degradations", "paper"),
    "lp-ft": ("randaugment", "lp-ft"),
    "scale": ("scale,randaugment", "paper"),
    # rows measured before 2026-12-07 ran "randaugment,degradations" (RandAugment twice); now refused
    "degr": ("degradations", "paper"),
}
DEGS, SEVERITY, N_DEGRADED = ("stain_jitter", "gaussian_blur"), 3, 300
ZOOMS = (1 / 1.6, 1.6)  # cells 1.6x smaller / larger in the frame


def train_cfg(args, augment: str, recipe: str):
    from wbc.engine.stage1.config import Stage1Config

    return Stage1Config(backbone="lite0", pretrained="package", epochs=args.epochs, batch_size=32, lr=3e-4,
                       patience=args.epochs, crop=args.crop, augment=augment, recipe=recipe, device="cpu",
                       workers=args.workers, seed=args.seed)


def stage1(args, work: Path, name: str) -> Path:
    from wbc.engine.stage1.train import train

    run = work / "runs" / name
    if name == "frozen":
        cfg = train_cfg(args, "none", "frozen-pretrained")
    else:
        cfg = train_cfg(args, *RECIPES[name])
    best = run / "fold0" / "best.pt"
    if not _complete(best):
        train(args.store, run, cfg, fold=0, resume=True)
    return best


def _cache_done(zarr: Path, ckpt: Path) -> bool:
    from wbc.cache import open_cache
    from wbc.errors import WbcError

    try:
        open_cache(zarr, checkpoint=ckpt)
        return True
    except WbcError:
        return False


def _complete(best: Path) -> bool:
    from wbc.backbones import load_file

    return best.is_file() and bool(load_file(best).get("complete"))


def wise(args, work: Path, recipe: str, best: Path, alpha: float, bn: bool = False) -> Path:
    """`wbc interpolate` of the recipe's run (alpha 1: the run itself, unless `bn`: then
    `--recalibrate-bn`, BatchNorm statistics re-estimated on the training images)."""
    from wbc.engine.stage1.interpolate import alpha_dir, interpolate

    if alpha == 1.0 and not bn:
        return best
    where = work / "wise" / (recipe + ("-bn" if bn else ""))
    ckpt = alpha_dir(where, alpha) / "fold0" / "best.pt"
    if not ckpt.is_file():
        interpolate(best, [alpha], where, recalibrate_bn=bn)
    return ckpt


def _val_mf1(ckpt: Path, head_path: Path, store_path: str, n: int, variants: dict) -> dict:
    """MF1 of checkpoint + cRT head on n stratified fold-0 validation images under each variant:
    name -> fn(images (B, S, S, 3) uint8, store rows) -> images."""
    from wbc.backbones import load_checkpoint
    from wbc.embed import embed_views
    from wbc.engine.evaluate.robustness import stratified_subset
    from wbc.heads import Head
    from wbc.metrics import classification_metrics
    from wbc.store import open_store

    store = open_store(store_path)
    labels, folds = np.asarray(store.labels), np.asarray(store.folds)
    val = np.flatnonzero((folds == 0) & (labels >= 0))
    rows = stratified_subset(val, labels[val], n, 0)
    model, meta = load_checkpoint(ckpt)
    head = Head.load(head_path)
    out = {}
    for name, fn in variants.items():
        preds = []
        for s in range(0, len(rows), 32):
            r = rows[s:s + 32]
            feats, _ = embed_views(model, fn(store.images(r), r), meta["data_config"], ["identity"])
            preds.append(np.asarray(head.logits(feats)).mean(1).argmax(1))
        out[name] = float(classification_metrics(labels[rows], np.concatenate(preds), store.num_classes)["mf1"])
    return out


def degraded_val(ckpt: Path, head_path: Path, store_path: str, n: int) -> dict:
    """MF1 under each of DEGS, as `wbc robustness` degrades the test rows."""
    from wbc.engine.evaluate.robustness import Degrader
    from wbc.store import open_store

    prov = open_store(store_path).provenance
    he = prov.get("stain_matrix") if prov.get("stain") == "macenko" else None
    out = _val_mf1(ckpt, head_path, store_path, n, {d: Degrader(d, SEVERITY, he) for d in DEGS})
    return {"degraded_val_mf1": float(np.mean(list(out.values()))), "degraded_val": out}


def zoomed_val(ckpt: Path, head_path: Path, store_path: str, n: int) -> dict:
    """MF1 with the cells rescaled by each of ZOOMS (wbc.sources.zoom_image, as `--zoom`): another
    camera's scale, simulated on PBC-LT itself."""
    from wbc.sources import zoom_image

    def zoomed(z):
        return lambda imgs, _rows: np.stack([zoom_image(im, z) for im in imgs])

    out = _val_mf1(ckpt, head_path, store_path, n, {f"{z:g}": zoomed(z) for z in ZOOMS})
    return {"zoomed_val_mf1": float(np.mean(list(out.values()))), "zoomed_val": out}


def add_zoomed(args, work: Path, r: dict) -> dict:
    path = work / "results" / f"{r['name']}.zoom.json"
    if not path.is_file():
        path.write_text(json.dumps(zoomed_val(Path(r["checkpoint"]), Path(r["head"]), args.store, N_DEGRADED)))
    return {**r, **json.loads(path.read_text())}


def score(args, work: Path, name: str, ckpt: Path) -> dict:
    """Every number of one row; cached in work/results/NAME.json."""
    from wbc.engine.evaluate.config import RobustnessConfig
    from wbc.engine.evaluate.external import evaluate_external
    from wbc.engine.evaluate.robustness import robustness
    from wbc.engine.evaluate.table1 import ModelSpec, evaluate_table
    from wbc.engine.extract.run import ExtractConfig, extract
    from wbc.engine.stage2.crt import crt
    from wbc.ensemble import save_ensemble
    from wbc.losses import LossSpec
    from wbc.stage2 import HeadConfig

    res_path = work / "results" / f"{name}.json"
    if res_path.is_file():
        return add_zoomed(args, work, json.loads(res_path.read_text()))
    t0 = time.perf_counter()
    zarr = work / "features" / f"{name}.zarr"
    if not _cache_done(zarr, ckpt):  # a row interrupted after its extraction resumes from the cache
        extract(ckpt, args.store, zarr, ExtractConfig(views="identity", device="cpu", workers=0))
    (run,) = crt(zarr, work / "crt" / name, fold=0, config=HeadConfig(loss=LossSpec("cb_focal_hybrid", 0.99, 2.0, 1.0)))
    rows, _ = evaluate_table([ModelSpec(name, (zarr,), (run.head_path,))], [0], ensembles=False)
    test = next(r for r in rows if r.kind != "supervised")
    ens = save_ensemble([f"{ckpt}:{run.head_path}"], Path(args.store), "identity",
                        work / "ensembles" / f"{name}.yaml", caches=[zarr])
    ext = evaluate_external(ens, args.jtsc, work / "jtsc" / name, args.label_map, device="cpu")
    rob = robustness(ens, args.store, work / "robustness" / name,
                     RobustnessConfig(degradations=DEGS, severities=(SEVERITY,), max_images=N_DEGRADED,
                                      views="identity", device="cpu", workers=0))
    deg_test = [r["mf1"] for r in rob.records if r["severity"] == SEVERITY]
    out = {"name": name, "checkpoint": str(ckpt), "head": str(run.head_path),
           "val_mf1": float(run.metrics["mf1"]), "test_mf1": float(test.folds[0]["mf1"]),
           "test_bacc": float(test.folds[0]["bacc"]), "degraded_test_mf1": float(np.mean(deg_test)),
           "jtsc_mf1": float(ext.rows[-1].folds[0]["mf1"]), "jtsc_n": int(ext.rows[-1].folds[0]["n"]),
           **degraded_val(ckpt, run.head_path, args.store, N_DEGRADED), "seconds": time.perf_counter() - t0}
    res_path.parent.mkdir(parents=True, exist_ok=True)
    res_path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out), flush=True)
    return add_zoomed(args, work, out)


def add_adapted(args, work: Path, name: str) -> dict:
    """JTSC through `wbc adapt` (no label read) on this row's ensemble: zoom only, and the defaults
    (zoom + AdaBN + mean/std alignment). The zoom is estimated once (it depends on the images and
    the store only) and reused. Cached in work/results/NAME.adapt.json."""
    from tools.bench_crosslab import score as score_adapted
    from wbc.adapt import AdaptConfig, adapt

    path = work / "results" / f"{name}.adapt.json"
    if path.is_file():
        return json.loads(path.read_text())
    ens = work / "ensembles" / f"{name}.yaml"
    zpath = work / "results" / "_jtsc_zoom.json"
    if not zpath.is_file():
        res = adapt(args.jtsc, ens, work / "adapted" / name / "zoom.yaml", AdaptConfig(bn=False, align="none", prototypes="off",
                                                                                         device="cpu"))
        zpath.write_text(json.dumps(res.doc["steps"]["zoom"], default=float))
    zoom = str(json.loads(zpath.read_text())["zoom"])
    out = {}
    # "adapted": AdaBN + alignment as measured in the grid (before the prototype blend became the default)
    for key, cfg in (("jtsc_zoom", AdaptConfig(zoom=zoom, bn=False, align="none", prototypes="off", device="cpu")),
                     ("jtsc_adapted", AdaptConfig(zoom=zoom, prototypes="off", device="cpu"))):
        res = adapt(args.jtsc, ens, work / "adapted" / name / f"{key}.yaml", cfg)
        sc = score_adapted(res, Path(args.jtsc), res_classes(ens), args.label_map)
        out[f"{key}_mf1"] = float(sc["mf1"])
    out["jtsc_zoom_value"] = float(zoom)
    path.write_text(json.dumps(out))
    return out


def res_classes(ens: Path) -> list[str]:
    import yaml

    return yaml.safe_load(ens.read_text())["class_names"]


def bn_rows(args, work: Path) -> None:
    """Rows `RECIPE-aA-bn`: WiSE with BatchNorm statistics re-estimated on the training images, for
    each alpha of --bn-alphas (0 = the pretrained backbone under source statistics)."""
    for recipe in args.recipes:
        best = work / "runs" / recipe / "fold0" / "best.pt"
        if not _complete(best):
            continue
        for a in args.bn_alphas:
            name = f"{recipe}-a{a:g}-bn"
            score(args, work, name, wise(args, work, recipe, best, a, bn=True))
            print(name, add_adapted(args, work, name), flush=True)


def adapt_all(args, work: Path) -> None:
    for p in sorted((work / "results").glob("*.json")):
        name = p.stem
        if name.endswith((".zoom", ".adapt")) or name.startswith(("ens-", "_")) or not (work / "ensembles" / f"{name}.yaml").is_file():
            continue
        print(name, add_adapted(args, work, name), flush=True)


def plan(recipes: list[str]) -> list[tuple[str, float | None]]:
    """(recipe, alpha) in the order run: breadth first, so a short budget still answers the main
    question: the fine-tuned model, its WiSE midpoint and the frozen floor (alpha None), then each
    other recipe at alpha 1 and 0.5, then the rest of the alpha grid."""
    first, rest = recipes[0], recipes[1:]
    jobs = [(first, 1.0), (first, 0.5), ("frozen", None), (first, 0.25), ("ens", None)]
    jobs += [(r, a) for r in rest for a in (1.0, 0.5)]
    jobs += [(first, 0.75)] + [(r, a) for r in rest for a in (0.25, 0.75)]
    return jobs


def score_ensemble(args, work: Path, names: list[str]) -> dict:
    """The frozen member beside a fine-tuned one (`wbc ensemble save` with two members): val and test
    from the caches, degraded test from the cached groups, JTSC through the images. Informative
    only: no degraded or zoomed validation, so it is not a candidate of the choice."""
    from wbc.engine.evaluate.config import RobustnessConfig
    from wbc.engine.evaluate.external import evaluate_external
    from wbc.engine.evaluate.robustness import robustness
    from wbc.engine.evaluate.table1 import ModelSpec, evaluate_table
    from wbc.ensemble import Member, ensemble_probs, member_output, save_ensemble
    from wbc.metrics import classification_metrics

    name = "+".join(names)
    res_path = work / "results" / f"ens-{name}.json"
    if res_path.is_file():
        return json.loads(res_path.read_text())
    rs = [json.loads((work / "results" / f"{n}.json").read_text()) for n in names]
    zarrs = [work / "features" / f"{n}.zarr" for n in names]
    outs = [member_output(Member(z, Path(r["head"])), (0,)) for z, r in zip(zarrs, rs)]
    val = classification_metrics(outs[0].labels, ensemble_probs(outs).argmax(1), len(outs[0].class_names))
    rows, _ = evaluate_table([ModelSpec(n, (z,), (Path(r["head"]),)) for n, z, r in zip(names, zarrs, rs)],
                             [0], ensembles=True)
    test = next(r for r in rows if r.kind != "supervised" and len(r.members) == len(names))
    ens = save_ensemble([f"{r['checkpoint']}:{r['head']}" for r in rs], Path(args.store), "identity",
                        work / "ensembles" / f"ens-{name}.yaml", caches=zarrs)
    ext = evaluate_external(ens, args.jtsc, work / "jtsc" / f"ens-{name}", args.label_map, device="cpu")
    rob = robustness(ens, args.store, work / "robustness" / f"ens-{name}",
                     RobustnessConfig(degradations=DEGS, severities=(SEVERITY,), max_images=N_DEGRADED,
                                      views="identity", device="cpu", workers=0))
    deg = [r["mf1"] for r in rob.records if r["severity"] == SEVERITY and r["row"].startswith("Ensemble")]
    out = {"name": f"ens-{name}", "val_mf1": float(val["mf1"]), "test_mf1": float(test.folds[0]["mf1"]),
           "degraded_test_mf1": float(np.mean(deg)), "jtsc_mf1": float(ext.rows[-1].folds[0]["mf1"]),
           "ensemble": str(ens)}
    res_path.write_text(json.dumps(out, indent=1))
    return out


def run_all(args, work: Path) -> None:
    for recipe, alpha in args.jobs or plan(args.recipes):
        if recipe == "ens":
            try:  # an extra, informative row: its failure must not stop the grid
                score_ensemble(args, work, ["frozen", f"{args.recipes[0]}-a1"])
            except Exception as e:  # noqa: BLE001
                print(f"ensemble row failed: {type(e).__name__}: {e}", flush=True)
        elif recipe == "frozen":
            score(args, work, "frozen", stage1(args, work, "frozen"))
        else:
            best = stage1(args, work, recipe)
            score(args, work, f"{recipe}-a{alpha:g}", wise(args, work, recipe, best, alpha))


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _select(r: dict, zoom: bool) -> float | None:
    keys = ["val_mf1", "degraded_val_mf1"] + (["zoomed_val_mf1"] if zoom else [])
    return None if any(k not in r for k in keys) else float(np.mean([r[k] for k in keys]))


def _choice(res: dict, zoom: bool, paper: dict | None) -> str:
    cands = [(n, r, _select(r, zoom)) for n, r in res.items() if _select(r, zoom) is not None]
    if not cands or paper is None:
        return "no row finished"
    name, b, _ = max(cands, key=lambda t: t[2])
    gap = 100 * (paper["test_mf1"] - b["test_mf1"])
    ok = b["jtsc_mf1"] >= 0.53 and gap <= 2.0
    return (f"**{name}**: JTSC {_pct(b['jtsc_mf1'])} MF1, PBC-LT test {_pct(b['test_mf1'])} against the "
            f"paper recipe's {_pct(paper['test_mf1'])} ({abs(gap):.1f} points {'below' if gap > 0 else 'above'}); "
            f"target (JTSC >= 53 and within 2 points on test) {'MET' if ok else 'NOT MET'}")


def load_results(work: Path) -> dict:
    res = {}
    for p in sorted((work / "results").glob("*.json")):
        if p.stem.endswith((".zoom", ".adapt")) or p.stem.startswith("_"):
            continue
        r = json.loads(p.read_text())
        for extra in (p.with_name(p.stem + ".zoom.json"), p.with_name(p.stem + ".adapt.json")):
            r.update(json.loads(extra.read_text()) if extra.is_file() else {})
        res[p.stem] = r
    return res


def _zoom_note(work: Path) -> str:
    z = work / "results" / "_jtsc_zoom.json"
    if not z.is_file():
        return "auto"
    d = json.loads(z.read_text())
    return f"auto = {d['zoom']:g}" + (f", raw {d['estimate']['raw']:.3f}" if d.get("estimate") else "")


def _jobs(args) -> str:
    return ", ".join(f"{r}-a{a:g}" for r, a in args.jobs) or "all"


def report(args, work: Path) -> str:
    res = load_results(work)
    order = {n: i for i, n in enumerate(["frozen"] + [f"{rc}-a{a:g}{bn}" for rc in RECIPES for bn in ("", "-bn")
                                                     for a in (0, 0.25, 0.5, 0.75, 1.0)])}
    names = sorted(res, key=lambda n: order.get(n, 99))
    table = "\n".join(
        f"| {n} | {_pct(r['val_mf1'])} | {_pct(r.get('degraded_val_mf1'))} | {_pct(r.get('zoomed_val_mf1'))} | "
        f"{_pct(r['test_mf1'])} | {_pct(r['degraded_test_mf1'])} | {_pct(r['jtsc_mf1'])} | "
        f"{_pct(r.get('jtsc_zoom_mf1'))} | {_pct(r.get('jtsc_adapted_mf1'))} |"
        for n, r in ((n, res[n]) for n in names))
    paper = res.get("paper-a1")
    title = "" if args.section == "robust-stage1" else f" [{args.section}: rows {_jobs(args)}]"
    return f"""## Robust Stage 1: recipes x WiSE-FT alpha, frozen member (tools/bench_robust_stage1.py){title}

lite0 (`--pretrained package`), fold 0 of `{args.store}`, {args.epochs} epochs, crop {args.crop}, batch 32,
lr 3e-4, CPU (one torch thread). Rows: `paper` (RandAugment, the default), `scale-degr` (`--augment
scale,degradations`), `lp-ft` (`--recipe lp-ft`), `scale` (`--augment scale,randaugment`), `degr` (`--augment degradations`: RandAugment, then damage; rows measured before 2026-12-07 ran `randaugment,degradations`, RandAugment twice); `-aA` is
`wbc interpolate --alpha A` of that run (a1 = the fine-tuned checkpoint itself); `frozen` is `wbc train
--recipe frozen-pretrained` (ImageNet backbone + linear probe, epoch 0). Every row: `wbc extract --views
identity`, `wbc crt --fold 0 --beta 0.99 --gamma 2 --lam 1` (val = its fold-0 validation MF1), `wbc
evaluate` (PBC-LT test, 900 images), `wbc robustness --max-images 300 --degradation stain_jitter
--degradation gaussian_blur --severities 3 --views identity` (degraded test: mean of the two), the same two
degradations on 300 fold-0 validation images (degraded val), the same 300 validation images with the
cells rescaled 1/1.6x and 1.6x in the frame (zoomed val, `wbc.sources.zoom_image`), and `wbc ensemble
save` + `wbc evaluate --external {args.jtsc} --label-map {LABEL_MAP}` (JTSC, 300 cells, 5 classes, as is,
no --zoom); then `wbc adapt JTSC --ensemble ROW.yaml` (no label read) with the zoom alone (`--no-bn
--align none`, zoom {_zoom_note(work)}) and with its defaults (zoom, AdaBN, mean/std alignment).
JTSC is never used to choose. Macro-F1, %.

| row | val | degraded val | zoomed val | PBC-LT test | degraded test | JTSC | JTSC zoom auto | JTSC adapted |
|---|---|---|---|---|---|---|---|---|
{table}

Chosen by mean(val, degraded val) (the issue's rule): {_choice(res, False, paper)}.
Chosen by mean(val, degraded val, zoomed val): {_choice(res, True, paper)}.

Machine: {machine()}; {args.machine_note}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("cache/rs1"))
    p.add_argument("--store", default=STORE)
    p.add_argument("--jtsc", default=JTSC)
    p.add_argument("--label-map", default=LABEL_MAP)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--crop", type=int, default=96)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--recipes", default="paper,scale-degr,lp-ft,scale,degr")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--adapt-only", action="store_true", help="add the JTSC adapt columns to finished rows")
    p.add_argument("--bn-only", action="store_true", help="only the rows with --recalibrate-bn (see --bn-alphas)")
    p.add_argument("--bn-alphas", default="0,0.5,0.25,1")
    p.add_argument("--machine-note", default="", help="what else ran on the machine meanwhile")
    p.add_argument("--notes", help="markdown file appended to the section (the reading of the grid)")
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    p.add_argument("--jobs", default="", help="only these rows, e.g. degr:1,paper:1,degr:0.5 (default: the whole grid)")
    p.add_argument("--seed", type=int, default=0, help="Stage-1 seed (a second seed: another --work)")
    p.add_argument("--section", default="robust-stage1", help="BENCHMARKS.md section to write")
    args = p.parse_args()
    args.jobs = [(r, float(a)) for r, a in (j.split(":") for j in args.jobs.split(",") if j)]
    args.recipes = [r for r in args.recipes.split(",") if r]
    args.bn_alphas = [float(a) for a in args.bn_alphas.split(",") if a]
    from wbc.log import setup_logging

    setup_logging()
    if args.adapt_only:
        adapt_all(args, args.work)
    elif args.bn_only:
        bn_rows(args, args.work)
    elif not args.report_only:
        run_all(args, args.work)
    body = report(args, args.work)
    if args.notes:  # the reading of the numbers, kept beside them when the table is regenerated
        body += "\n" + Path(args.notes).read_text()
    if args.no_write:
        print(body)
    else:
        write_section(args.section, body)


if __name__ == "__main__":
    main()
