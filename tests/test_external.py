"""`wbc evaluate --external`: an ensemble scored on a labelled set with coarser labels.

Tiny end-to-end setup (as tests/test_predict.py): synthetic PNGs -> prepare_store -> split ->
random test_efficientnet checkpoints -> extract -> random heads -> save_ensemble (with caches).
"""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.fixtures import cli_exit_code, stained_image, tiny_checkpoint
from wbc.cache import open_cache
from wbc.engine.evaluate.external import evaluate_external, read_labelled
from wbc.engine.evaluate.predict import predict
from wbc.engine.extract.run import ExtractConfig, extract
from wbc.ensemble import load_ensemble, save_ensemble
from wbc.errors import WbcError
from wbc.heads import Head
from wbc.prepare import PrepareConfig, prepare_store
from wbc.splits import SplitConfig, split_store
from wbc.store import open_store

CLASSES = ["A", "B", "C"]
S, CROP = 64, 48


def cell(rng, k: int, size: int = 72) -> np.ndarray:
    return stained_image(rng, size=size, lobes=1 + k, nucleus=0.2 + 0.05 * k)


def write_images(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for k, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for j in range(n):
            Image.fromarray(cell(rng, k)).save(root / c / f"{c}{j}.png")
    return root


def checkpoint(path: Path, store, seed: int) -> Path:
    return tiny_checkpoint(path, store, crop=CROP, resize=S, seed=seed, fold=seed)


def random_head(path: Path, cache: Path, seed: int) -> Path:
    attrs = open_cache(cache).attrs
    rng = np.random.default_rng(seed)
    return Head(rng.normal(size=(3, attrs["dim"])).astype(np.float32), rng.normal(size=3).astype(np.float32),
                CLASSES, cache={"checkpoint_sha256": attrs["checkpoint_sha256"]}).save(path)


def build_env(d: Path, members: int = 2, views: str = "d4") -> SimpleNamespace:
    """Store, `members` (checkpoint, cache, head) triples and an ENSEMBLE.yaml with caches."""
    images = write_images(d / "images")
    store_path = d / "store.h5"
    prepare_store(images, store_path, PrepareConfig(size=S, workers=0))
    split_store(store_path, SplitConfig(test=0.3, folds=2, seed=0))
    store = open_store(store_path)
    triples = []
    for seed in range(members):
        ckpt = checkpoint(d / f"run{seed}" / "best.pt", store, seed)
        cache = d / f"cache{seed}.zarr"
        extract(ckpt, store_path, cache, ExtractConfig(views=views, workers=0, batch_size=8))
        triples.append((ckpt, cache, random_head(d / f"head{seed}.pt", cache, seed)))
    ens = save_ensemble([f"{c}:{h}" for c, _, h in triples], store_path, views, d / "ens" / "ensemble.yaml",
                        caches=[c for _, c, _ in triples])
    return SimpleNamespace(dir=d, images=images, store_path=store_path, store=store, members=triples,
                           ensemble=ens)


def write_external(root: Path, labels: list[str], broken: bool = True) -> Path:
    """External cells: model class A/B/C look, set label given per image; manifest.csv image,label."""
    rng = np.random.default_rng(7)
    look = {"X": 0, "C": 2, "Z": 1}
    (root / "img").mkdir(parents=True)
    rows = []
    for i, y in enumerate(labels):
        Image.fromarray(cell(rng, look.get(y, i % 3), size=80)).save(root / "img" / f"{i}.png")
        rows.append((f"img/{i}.png", y))
    if broken:
        (root / "img" / "broken.png").write_bytes(b"not an image")
        rows.append(("img/broken.png", "X"))
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "label"), *rows])
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("external"))


exit_code = cli_exit_code


def test_ensemble_records_member_caches(env, tmp_path):
    ens = load_ensemble(env.ensemble)
    assert [Path(m.cache).resolve() for m in ens.members] == [c.resolve() for _, c, _ in env.members]
    doc = yaml.safe_load(env.ensemble.read_text())
    assert all(not Path(m["cache"]).is_absolute() for m in doc["members"])  # relative to the yaml
    # Without caches the file is as before (no cache key); a cache of another checkpoint is refused.
    (ckpt, cache, _), (_, other, _) = env.members
    plain = save_ensemble([str(ckpt)], env.store_path, "d4", tmp_path / "p.yaml")
    assert "cache" not in yaml.safe_load(plain.read_text())["members"][0]
    assert load_ensemble(plain).members[0].cache is None
    with pytest.raises(WbcError, match="stale cache"):
        save_ensemble([str(ckpt)], env.store_path, "d4", tmp_path / "x.yaml", caches=[other])
    with pytest.raises(WbcError, match="one cache per member"):
        save_ensemble([str(ckpt)], env.store_path, "d4", tmp_path / "x.yaml", caches=[cache, other])


def test_external_end_to_end_with_coarser_labels(env, tmp_path):
    labels = ["X"] * 5 + ["C"] * 3 + ["Z"] * 2  # A,B -> X; C -> C by name; Z: model cannot produce it
    manifest = write_external(tmp_path / "ext", labels)
    res = evaluate_external(env.ensemble, manifest, tmp_path / "rep", "A=X,B=X", device="cpu")
    assert res.labels == ["C", "X"] and res.label_map.unscorable == ["Z"] and res.label_map.unmapped_model == []
    assert [Path(p).name for p, _ in res.failed] == ["broken.png"]
    assert res.dropped == {"Z": 2}
    assert [r.name for r in res.rows] == ["test-fold0", "test-fold1", "Ensemble (2 members)"]
    for name in ("report.md", "report.json", "confusion.png", "predictions.csv", "failed.csv"):
        assert (tmp_path / "rep" / name).exists(), name
    ens_row = res.rows[-1]
    assert ens_row.folds[0]["n"] == 8 and ens_row.confusion.sum() == 8
    # The probabilities are the predict path's: same numbers as `wbc predict` on the same files.
    pred = predict(manifest, env.ensemble, tmp_path / "p.csv", device="cpu")
    with open(tmp_path / "rep" / "predictions.csv") as f:
        got = np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in csv.DictReader(f)])
    np.testing.assert_allclose(got, pred.probs, atol=1e-4)
    # Reference metrics: summed probabilities of A and B vs C, argmax, macro-F1 over C and X.
    y = np.array([1] * 5 + [0] * 3)
    mass = np.stack([pred.probs[:8, 2], pred.probs[:8, 0] + pred.probs[:8, 1]], axis=1)
    from sklearn.metrics import f1_score

    assert ens_row.folds[0]["mf1"] == pytest.approx(f1_score(y, mass.argmax(1), average="macro", labels=[0, 1]))
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert doc["unscorable"] == ["Z"] and doc["dropped"] == {"Z": 2} and len(doc["rows"]) == 3
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "cannot produce (not scored): Z" in md and "| A | X |" in md


def test_cli_external_lists_unmapped_model_classes(env, tmp_path):
    manifest = write_external(tmp_path / "ext", ["X"] * 4 + ["Z"] * 2, broken=False)
    out = tmp_path / "rep"
    assert exit_code(["evaluate", "--ensemble", str(env.ensemble), "--external", str(manifest),
                      "--label-map", "A=X,B=X", "--out", str(out), "--device", "cpu"]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["unmapped_model"] == ["C"] and doc["unscorable"] == ["Z"] and doc["zoom"] == 1.0
    assert "no counterpart in the set: C" in (out / "report.md").read_text()


def test_zoom_is_the_predict_path_on_rescaled_images(env, tmp_path):
    """--zoom Z: the store's stain normalisation on the image's own pixels, then the zoom, then the resize."""
    from wbc.sources import resize_square, zoom_image
    from wbc.stain import normalise_like, preprocess_like_store

    manifest = write_external(tmp_path / "ext", ["X"] * 3 + ["C"] * 3, broken=False)
    prov = load_ensemble(env.ensemble).provenance
    img = tmp_path / "ext" / "img" / "0.png"
    rgb = np.asarray(Image.open(img).convert("RGB"))
    want = resize_square(zoom_image(normalise_like(prov, rgb)[0], 0.5), int(prov["settings"]["size"]))
    assert np.array_equal(preprocess_like_store(img, prov, 0.5), want)
    assert not np.array_equal(preprocess_like_store(img, prov, 1.0), want)
    res = evaluate_external(env.ensemble, manifest, tmp_path / "rep", "A=X,B=X", device="cpu", zoom=0.5)
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["zoom"] == 0.5
    assert res.rows[-1].folds[0]["n"] == 6
    assert exit_code(["predict", str(tmp_path / "ext" / "img"), "--ensemble", str(env.ensemble), "--zoom", "0",
                      "--out", str(tmp_path / "q.csv")]) == 2


def test_bad_input(env, tmp_path, capsys):
    manifest = write_external(tmp_path / "ext", ["X", "Z"], broken=False)
    base = ["evaluate", "--ensemble", str(env.ensemble), "--external", str(manifest), "--out", str(tmp_path / "r")]
    assert exit_code([*base, "--label-map", "Q=X"]) == 2  # unknown model class
    assert "unknown model class" in capsys.readouterr().err
    assert exit_code(base) == 2  # X, Z share no class with A, B, C
    assert "share no class" in capsys.readouterr().err
    assert exit_code(["evaluate", "--external", str(manifest)]) == 2  # no --ensemble
    assert exit_code([*base, "--model", "a:x.zarr"]) == 2
    (tmp_path / "nolabel.csv").write_text("image\nimg/0.png\n")
    with pytest.raises(WbcError, match="no label"):
        read_labelled(tmp_path / "nolabel.csv")
