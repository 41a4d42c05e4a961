"""The plain baseline of the PBC-LT benchmark: frozen ImageNet features + logistic regression.

An EfficientNet-Lite0 with its ImageNet weights (no fine-tuning) is written as a Stage-1
checkpoint (random 9-class head), embedded by `wbc extract` (8 views) like any other model, and a
class-weighted logistic regression is fitted per fold on the identity view of the training folds.
Rows written to OUT/reports/baseline.json: "Frozen ImageNet lite0 + LR" (identity view),
"... + LR, 8 views" (probabilities averaged over views) and "Frozen ImageNet lite0 + cRT".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def frozen_checkpoint(store_path: Path, path: Path, crop: int) -> Path:
    from wbc.backbones import create_backbone, data_config, resolve_name
    from wbc.engine.stage1.checkpointing import save_atomic, stage1_dict
    from wbc.store import open_store

    if path.exists():
        return path
    store = open_store(store_path)
    name = resolve_name("lite0")
    model = create_backbone("lite0", len(store.class_names), pretrained="package")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(stage1_dict(model, timm_name=name, alias="lite0-imagenet", class_names=store.class_names,
                            store_content_id=store.content_id, store=str(store_path), fold=-1,
                            config={"frozen": True}, data_config=data_config(model, crop=crop),
                            epoch=0, val=None, complete=True), path)
    return path


def lr_rows(cache_path: Path, folds: list[int]) -> dict[str, list[dict]]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from wbc.cache import open_cache
    from wbc.ensemble import softmax
    from wbc.metrics import HEADLINE, classification_metrics

    cache = open_cache(cache_path)
    feats = cache.read("features").astype(np.float32)  # (N, K, D)
    y, fold = cache.labels.astype(int), cache.fold
    test = fold == -1
    c = len(cache.class_names)
    out: dict[str, list[dict]] = {"Frozen ImageNet lite0 + LR": []}
    if feats.shape[1] > 1:
        out["Frozen ImageNet lite0 + LR, 8 views"] = []
    for k in folds:
        train = (fold >= 0) & (fold != k)
        scaler = StandardScaler().fit(feats[train, 0])
        clf = LogisticRegression(max_iter=2000, class_weight="balanced", C=1.0)
        clf.fit(scaler.transform(feats[train, 0]), y[train])
        p1 = clf.predict(scaler.transform(feats[test, 0]))
        z = np.stack([clf.decision_function(scaler.transform(feats[test, v])) for v in range(feats.shape[1])], 1)
        p8 = softmax(z).mean(1).argmax(1)
        preds = [("Frozen ImageNet lite0 + LR", p1)]
        if feats.shape[1] > 1:
            preds.append(("Frozen ImageNet lite0 + LR, 8 views", p8))
        for name, pred in preds:
            m = classification_metrics(y[test], pred, c)
            out[name].append({key: m[key] for key in HEADLINE})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--store", required=True)
    p.add_argument("--out", default="cache/bench")
    p.add_argument("--folds", default="0,1,2,3,4")
    p.add_argument("--crop", type=int, default=160)
    p.add_argument("--views", default="d4", help="views of the frozen extraction (identity = 8x cheaper)")
    a = p.parse_args()
    out, folds = Path(a.out), [int(x) for x in a.folds.split(",")]
    ckpt = frozen_checkpoint(Path(a.store), out / "runs" / "lite0-imagenet" / "best.pt", a.crop)
    cache = out / "features" / "lite0-imagenet.zarr"
    if not (cache / "zarr.json").exists() or not json.loads((cache / "zarr.json").read_text())["attributes"].get("complete"):
        subprocess.run([sys.executable, "-m", "wbc", "extract", str(ckpt), "--store", a.store, "--out", str(cache),
                        "--views", a.views], check=True, cwd=ROOT)
    heads = out / "runs" / "crt-lite0-imagenet"
    for k in folds:
        if not (heads / f"fold{k}" / "head.pt").exists():
            subprocess.run([sys.executable, "-m", "wbc", "crt", str(cache), "--fold", str(k), "--out", str(heads)],
                           check=True, cwd=ROOT)
    rows = lr_rows(cache, folds)
    rep = out / "reports"
    rep.mkdir(parents=True, exist_ok=True)
    (rep / "baseline.json").write_text(json.dumps({"folds": folds, "rows": rows}, indent=1))
    subprocess.run([sys.executable, "-m", "wbc", "evaluate", "--no-ensembles", "--model",
                    f"Frozen ImageNet lite0 + cRT:{cache}:{heads}/fold{{fold}}/head.pt",
                    "--folds", a.folds, "--out", str(rep / "baseline-crt")], check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
