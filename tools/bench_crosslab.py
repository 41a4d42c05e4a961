"""Cross-lab benchmark (section "crosslab" of BENCHMARKS.md): `wbc adapt` step by step.

On one Stage-1 run (lite0 on PBC-LT, fold 0) with its cRT head (the validation-best loss,
beta 0.99, gamma 2, lam 1):
  1. JTSC (another lab; SNE,BNE -> NE), the ladder: as is -> + zoom auto -> + AdaBN -> + feature
     alignment (mean/std) -> + prototype blend (the default); prototypes alone, target priors by EM,
     past the guard, the target's own class mix; plus AdaBN without zoom and CORAL. No step reads a JTSC label; labels only score.
  2. PBC-LT held-out test, clean and degraded (`wbc.degrade`, after Macenko, seed = store row),
     a stratified subset written as PNGs: the same ladder with AdaBN estimated on those images.
  3. PBC-LT clean test from the cache with adaptation off (the source files are never modified,
     so it cannot change), and the review flags / risk-coverage on it and on JTSC.

Knobs (environment): CKPT, CACHE, STORE, JTSC (manifest), OUT (default cache/xlab-bench),
SECTION (BENCHMARKS.md section, default crosslab; TITLE its heading's tail, e.g. the model),
MAX_IMAGES (PBC-LT subset, default 200), DEGRADED (name:severity,... default
stain_jitter:4,gaussian_blur:3,jpeg:4,gaussian_noise:3,illumination:4), PBC_VIEWS (views of the PBC-LT ladders, default identity,rot90: CPU
time), SKIP_EXTRA=1 (no CORAL / AdaBN-without-zoom rows on JTSC), SKIP_PBC=1 (JTSC only).
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools.benchlib import machine, write_section

WBC = [str(Path(sys.executable).with_name("wbc"))]
LOG: list[tuple[str, float]] = []
MAIN = ROOT / "cache"
CKPT = Path(os.environ.get("CKPT", MAIN / "xlab/runs/lite0-c160/fold0/best.pt"))
CACHE = Path(os.environ.get("CACHE", MAIN / "xlab/features/lite0-c160-fold0.zarr"))
STORE = Path(os.environ.get("STORE", MAIN / "images/pbc-lt.h5"))
JTSC = Path(os.environ.get("JTSC", ROOT.parent / "shared" / "data" / "jtsc" / "manifest.csv"))
OUT = Path(os.environ.get("OUT", ROOT / "cache/xlab-bench"))
MAX_IMAGES = int(os.environ.get("MAX_IMAGES", "200"))
DEGRADED = os.environ.get("DEGRADED", "stain_jitter:4,gaussian_blur:3,jpeg:4,gaussian_noise:3,illumination:4")
PBC_VIEWS = os.environ.get("PBC_VIEWS", "identity,rot90")  # PBC-LT ladders: 4x cheaper than d4 on CPU
# SUBSET="train,val,test" rows: extract an own cache of a stratified subset (when the full cache is
# not there or CPU time is short); VIEWS: the ensemble's views; HEAD: crt or stage1.
SUBSET = os.environ.get("SUBSET", "")
VIEWS = os.environ.get("VIEWS", "d4")
HEAD = os.environ.get("HEAD", "crt")
LABEL_MAP = "SNE=NE,BNE=NE"
SECTION = os.environ.get("SECTION", "crosslab")
TITLE = os.environ.get("TITLE", "")


def run(args: list, done: Path | None = None) -> None:
    cmd = "wbc " + " ".join(shlex.quote(str(a)) for a in args)
    if done is not None and done.exists():
        print(f"[skip] {cmd}", flush=True)
        return
    print(f"[run ] {cmd}", flush=True)
    t0 = time.time()
    subprocess.run([*WBC, *map(str, args)], check=True, cwd=ROOT)
    LOG.append((cmd, time.time() - t0))


def timed(label: str, fn):
    t0 = time.time()
    out = fn()
    LOG.append((label, time.time() - t0))
    return out


def labels_of(manifest: Path) -> dict[str, str]:
    with open(manifest, newline="") as f:
        return {str(manifest.parent / r["image"]): r["label"] for r in csv.DictReader(f)}


def score(res, manifest: Path, class_names, label_map) -> dict:
    """MF1 / BAcc of an adapt result over the set's labels (the bench reads labels; adapt never
    does), and its review flags / risk-coverage."""
    from wbc.labelmap import LabelMap
    from wbc.metrics import classification_metrics
    from wbc.selective import selective_report

    lab = labels_of(manifest)
    y = [lab[str(p)] for p in res.paths]
    lm = LabelMap.parse(label_map, list(class_names), sorted(set(lab.values())))
    s = lm.score(res.probs, y)
    m = classification_metrics(s.y_true, s.y_pred, len(s.labels))
    sel = selective_report(s.y_true, s.y_pred, res.confidence[s.kept], res.review[s.kept], len(s.labels),
                           res.doc["review"])
    return {"mf1": m["mf1"], "bacc": m["bacc"], "acc": m["acc"], "n": len(s.y_true), "selective": sel}


def report_row(report_dir: Path) -> dict:
    doc = json.loads((report_dir / "report.json").read_text())
    row = doc["rows"][-1]
    fold = row["folds"][0] if "folds" in row else row
    return {"mf1": fold["mf1"], "bacc": fold["bacc"], "acc": fold.get("acc"), "n": fold.get("n"),
            "zoom": doc.get("zoom"), "selective": doc.get("selective")}


def ladder(name: str, manifest: Path, ens: Path, label_map, extra: bool) -> list[dict]:
    """As is, zoom auto, + AdaBN, + alignment, all (priors), + prototypes, forced past the guard
    [CORAL, AdaBN without zoom], and AdaBN / alignment on the target's own class mix (--mix none).

    Every adapt variant writes the same ADAPTED.yaml path, so they share its AdaBN checkpoint and
    target embeddings (reused when source, target images, zoom and views match): one BN pass and
    one embedding pass per zoom; the variants after it cost no backbone pass."""
    from wbc.adapt import AdaptConfig, adapt

    out = OUT / name
    adapted = out / "adapted" / "adapted.yaml"
    rows = []
    for step, zoom in (("as is", "1"), ("+ zoom auto", "auto")):
        d = out / ("as-is" if zoom == "1" else "zoom")
        run(["evaluate", "--ensemble", ens, "--external", manifest, *label_map_args(label_map),
             "--zoom", zoom, "--out", d, "--title", f"{name}: {step}"], done=d / "report.json")
        rows.append({"step": step, **report_row(d)})

    def variant(step: str, cfg: AdaptConfig) -> None:
        res = timed(f"adapt {name}: {step}", lambda: adapt(manifest, ens, adapted, cfg))
        s = res.doc["steps"]
        rows.append({"step": step, **score(res, manifest, class_names(ens), label_map),
                     "zoom": s["zoom"]["zoom"], "stain": s["stain"], "priors": s["priors"].get("target"),
                     "zoom_estimate": s["zoom"]["estimate"],
                     "shift": s["shift"] if s["shift"].get("enabled") else None})

    variant("+ AdaBN", AdaptConfig(align="none", prototypes="off"))
    variant("+ alignment (mean/std)", AdaptConfig(prototypes="off"))
    variant("+ prototype blend (the default)", AdaptConfig())
    variant("+ prototypes only", AdaptConfig(prototypes="only"))
    variant("+ alignment + target priors", AdaptConfig(priors=True, prototypes="off"))
    variant("default, forced (--no-guard)", AdaptConfig(guard=False))
    variant("+ alignment, forced (--no-guard)", AdaptConfig(guard=False, prototypes="off"))
    if extra:
        variant("default, CORAL instead of mean/std", AdaptConfig(align="coral"))
        variant("AdaBN only, no zoom", AdaptConfig(zoom="off", align="none", prototypes="off"))
    # the target's own class mix (before wbc.adapt.mix): AdaBN and alignment on marginal statistics
    variant("+ AdaBN, --mix none", AdaptConfig(align="none", mix="none", prototypes="off"))
    variant("+ alignment, --mix none", AdaptConfig(mix="none", prototypes="off"))
    variant("+ alignment, --mix none, forced (--no-guard)", AdaptConfig(mix="none", guard=False, prototypes="off"))
    # the default, as a lab runs it (no backbone pass: AdaBN and embeddings are reused)
    run(["adapt", manifest, "--ensemble", ens, "--out", adapted])
    return rows


def label_map_args(label_map) -> list[str]:
    return ["--label-map", label_map] if label_map else []


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def class_names(ens: Path) -> list[str]:
    import yaml

    return yaml.safe_load(ens.read_text())["class_names"]


def write_pbc_subset(degradation: str, severity: int) -> Path:
    """A stratified subset of PBC-LT test images as stored (after Macenko), degraded, as PNGs."""
    from PIL import Image

    from wbc.degrade import degrade_batch
    from wbc.engine.evaluate.robustness import stratified_subset
    from wbc.store import open_store

    d = OUT / "pbc-sets" / f"{degradation}-{severity}"
    manifest = d / "manifest.csv"
    if manifest.exists():
        return manifest
    st = open_store(STORE)
    test = np.flatnonzero(np.asarray(st.folds) == -1)
    rows = stratified_subset(test, np.asarray(st.labels)[test], MAX_IMAGES, 0)
    (d / "img").mkdir(parents=True, exist_ok=True)
    out = []
    for r in rows:
        im = st.image(int(r))[None]
        if severity > 0:
            im = degrade_batch(degradation, im, severity, np.array([r]))
        Image.fromarray(im[0]).save(d / "img" / f"{r}.png")
        out.append((f"img/{r}.png", st.class_names[int(st.labels[r])]))
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([("image", "label"), *out])
    return manifest


def cached_test(ens: Path) -> dict:
    """PBC-LT clean test from the cache (adaptation off): MF1, review flags, risk-coverage."""
    from wbc.adapt.reference import member_reference, review_rule
    from wbc.cache import open_cache
    from wbc.ensemble import load_ensemble, view_probs
    from wbc.heads import load_head
    from wbc.metrics import classification_metrics
    from wbc.selective import selective_report

    m = load_ensemble(ens).members[0]
    ref = member_reference(m)
    rule, how = review_rule([ref], 0.95)
    c = open_cache(m.cache)
    rows = c.rows("test")
    f = c.read("features", rows).astype(np.float32)
    logits = load_head(m.head).logits(f) if m.head else c.read("stage1_logits", rows)
    probs = view_probs(logits)
    y, p = np.asarray(c.labels)[rows], probs.argmax(1)
    conf, ood = probs.max(1), ref.maha.score(f)
    met = classification_metrics(y, p, len(c.class_names))
    sel = selective_report(y, p, conf, rule.flags(conf, ood), len(c.class_names), rule.to_dict())
    return {"mf1": met["mf1"], "bacc": met["bacc"], "acc": met["acc"], "n": len(rows), "selective": sel,
            "rule": {**rule.to_dict(), "how": how}}


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def render(jtsc: list[dict], pbc: dict[str, list[dict]], clean: dict, seconds: float) -> str:
    from wbc.backbones import load_file

    epoch = load_file(CKPT).get("epoch")
    head = ("cRT head `wbc crt --fold 0 --beta 0.99 --gamma 2 --lam 1`" if HEAD == "crt"
            else "the Stage-1 classifier (no cRT)")
    cache = (f"an own cache of a stratified subset of {SUBSET} training/validation/test rows" if SUBSET
             else f"cache {CACHE}")
    lines = [(f"Machine: {machine()}. Wall time {seconds / 60:.0f} min. Model: {CKPT} (lite0, package ImageNet "
             f"weights, crop 160, lr 3e-4, fold 0; checkpoint of epoch {epoch}), {head}, reference statistics "
             f"from {cache}; ensemble views {VIEWS}. No step reads a target label; the labels only score."), "",
             "### JTSC (300 cells, another lab; label map SNE=NE,BNE=NE)", "",
             "| step | zoom | MF1 | BAcc | acc |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['step']} | {r.get('zoom') or 1} | {pct(r['mf1'])} | {pct(r['bacc'])} | {pct(r.get('acc'))} |"
              for r in jtsc]
    last = next(r for r in jtsc if "target priors" in r["step"])  # the row with the EM priors
    lines += ["", stain_line("JTSC", last.get("stain")), zoom_line(last.get("zoom_estimate")),
              f"Target priors (EM): {last.get('priors')}", guard_line(jtsc), ""]
    for name, rows in pbc.items():
        lines += [f"### PBC-LT test, {name} ({rows[0]['n']} cells, views {PBC_VIEWS}, adapted on those images)", "",
                  "| step | zoom | MF1 | BAcc |", "|---|---:|---:|---:|"]
        lines += [f"| {r['step']} | {r.get('zoom') or 1} | {pct(r['mf1'])} | {pct(r['bacc'])} |" for r in rows]
        lines += ["", stain_line(name, rows[-1].get("stain")), guard_line(rows), ""]
    lines += ["### PBC-LT clean test, adaptation off (from the cache)", "",
              (f"MF1 {pct(clean['mf1'])}, BAcc {pct(clean['bacc'])} on {clean['n']} cells: `wbc adapt` writes new "
              "files and never modifies the source checkpoint, head or cache, so this cannot change."), "",
              "### Confidence and review flags", "",
              (f"Thresholds ({clean['rule']['how']}): confidence < {clean['rule']['conf_min']:.3f} or ood_score > "
              f"{clean['rule']['ood_max']:.2f}."), "",
              ("| set | cells | flagged | un-flagged | acc all | acc un-flagged | MF1 all | MF1 un-flagged | "
              "acc at 50% coverage | acc at 90% coverage | AURC |"),
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, sel in (("PBC-LT test (cache)", clean["selective"]),
                      *((f"JTSC, {r['step']}", r.get("selective")) for r in jtsc)):
        if not sel or "review" not in sel:
            continue
        r = sel["review"]
        at90 = next(p for p in sel["risk_coverage"]["points"] if p["coverage"] == 0.9)
        at50 = next(p for p in sel["risk_coverage"]["points"] if p["coverage"] == 0.5)
        lines.append(f"| {name} | {r['n']} | {r['n_flagged']} | {pct(r['coverage'])}% | {pct(r['acc_all'])} | "
                     f"{pct(r['acc_unflagged'])} | {pct(r['mf1_all'])} | {pct(r['mf1_unflagged'])} | "
                     f"{pct(at50['acc'])} | {pct(at90['acc'])} | {sel['risk_coverage']['aurc']:.3f} |")
    lines += ["", ("Defaults of `wbc adapt`: zoom auto, AdaBN, mean/std alignment, both on target cells weighted to "
              "the training class mix by the model's own predictions (`--mix source`; the '--mix none' rows take "
              "the target's own mix), and the mean of the head's and the target prototypes' probabilities "
              "(`--prototypes blend`; '+ alignment' rows: `--prototypes off`), all only where the target is "
              "shifted (the guard; 'forced' rows run past it); target priors (`--priors`) are an option. `review` flags a cell whose "
              "confidence is low OR whose ood_score is high; 'acc at 50%/90% coverage' ranks by confidence alone."),
              "", "### Commands (wall time)", "", "```"]
    lines += [f"{cmd}   # {t:.0f} s" for cmd, t in LOG]
    lines += ["```"]
    return "\n".join(lines)


def guard_line(rows: list[dict]) -> str:
    sh = next((r.get("shift") for r in rows if r.get("shift")), None)
    if not sh:
        return ""
    return (f"Guard: {100 * sh['share_beyond_val95']:.1f}% of cells beyond the in-domain 95th percentile of "
            f"ood_score (threshold {100 * sh['threshold']:.0f}%) -> "
            f"{'shifted: every step runs' if sh['shifted'] else 'in-domain: the default keeps the plain ensemble'}.")


def stain_line(name: str, stain: dict | None) -> str:
    if not stain:
        return ""
    clamp = "not reported" if stain.get("n_clamped") is None else stain["n_clamped"]
    return (f"Stain ({name}): Macenko failed on {stain['n_failed']} images; images with over 1% of their "
            f"stained pixels at a negative H or E concentration (off-H&E colour): {clamp} (the store's "
            f"clamp is {'on' if stain.get('clamp') else 'off: prepared before it existed'}).")


def zoom_line(est: dict | None) -> str:
    if not est:
        return ""
    return (f"Zoom estimate: raw {est['raw']:.3f} (90% interval {est['low']:.3f}-{est['high']:.3f}, "
            f"{est['n_unmeasured']} of {est['n_target'] + est['n_unmeasured']} images unmeasurable): "
            f"{est['reason']} -> zoom {est['zoom']}.")


def subset_cache() -> Path:
    """Features of a stratified subset of training, validation (fold 0) and test rows."""
    from wbc.engine.evaluate.robustness import stratified_subset
    from wbc.engine.extract.run import ExtractConfig, extract
    from wbc.store import open_store

    out = OUT / "features.zarr"
    if (out / "zarr.json").exists():
        return out
    st = open_store(STORE)
    folds, labels = np.asarray(st.folds), np.asarray(st.labels)
    n_train, n_val, n_test = (int(v) for v in SUBSET.split(","))
    pick = []
    for sel, n in (((folds >= 0) & (folds != 0), n_train), (folds == 0, n_val), (folds == -1, n_test)):
        rows = np.flatnonzero(sel)
        pick.append(stratified_subset(rows, labels[rows], n, 0))
    timed(f"extract {SUBSET} rows x {VIEWS}", lambda: extract(
        CKPT, STORE, out, ExtractConfig(views=VIEWS, workers=0), rows=np.sort(np.concatenate(pick))))
    return out


def main() -> None:
    global CACHE
    t0 = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    if SUBSET:
        CACHE = subset_cache()
    member = str(CKPT)
    if HEAD == "crt":
        head = OUT / "crt" / "fold0" / "head.pt"
        run(["crt", CACHE, "--fold", "0", "--beta", "0.99", "--gamma", "2", "--lam", "1", "--out", OUT / "crt"],
            done=head)
        member = f"{CKPT}:{head}"
    ens = OUT / "ensemble.yaml"
    run(["ensemble", "save", "--member", member, "--cache", CACHE, "--store", STORE, "--views", VIEWS,
         "--out", ens], done=ens)
    ens_pbc = OUT / "ensemble-pbc.yaml"
    run(["ensemble", "save", "--member", member, "--cache", CACHE, "--store", STORE,
         "--views", PBC_VIEWS, "--out", ens_pbc], done=ens_pbc)
    clean = timed("PBC-LT test from the cache (review flags)", lambda: cached_test(ens))
    extra = os.environ.get("SKIP_EXTRA") != "1"
    jtsc = ladder("jtsc", JTSC, ens, LABEL_MAP, extra)
    pbc = {}
    sets = [] if os.environ.get("SKIP_PBC") == "1" else ["none:0", *[d for d in DEGRADED.split(",") if d]]
    (OUT / "results.json").write_text(json.dumps({"jtsc": jtsc, "clean": clean}, indent=1, default=float))
    for item in sets:
        name, sev = item.split(":")
        manifest = timed(f"write PBC-LT test subset {item}", lambda n=name, s=int(sev): write_pbc_subset(n, s))
        pbc["clean" if sev == "0" else f"{name} {sev}"] = ladder(f"pbc-{name}-{sev}", manifest, ens_pbc, None, False)
        (OUT / "results.json").write_text(json.dumps({"jtsc": jtsc, "pbc": pbc, "clean": clean}, indent=1, default=float))
    body = render(jtsc, pbc, clean, time.time() - t0)
    head = f"## Cross-lab adaptation (`tools/bench_crosslab.py`){': ' + TITLE if TITLE else ''}"
    write_section(SECTION, head + "\n\n" + body)
    print(body)


if __name__ == "__main__":
    main()
