"""`wbc predict` on image files equals `evaluate`'s probabilities from the cache for the same images."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tests.fixtures import stained_image, tiny_checkpoint
from wbc.cache import open_cache
from wbc.cli import main
from wbc.engine.evaluate.predict import predict
from wbc.engine.extract.run import ExtractConfig, extract
from wbc.ensemble import Member, load_ensemble, member_output, save_ensemble, view_probs
from wbc.errors import WbcError
from wbc.heads import Head
from wbc.prepare import PrepareConfig, prepare_store
from wbc.splits import SplitConfig, split_store
from wbc.store import open_store

CLASSES = ["A", "B", "C"]
S, CROP = 64, 48


def write_images(root: Path) -> Path:
    """Synthetic stained cells as PNG files in class folders; returns the folder."""
    rng = np.random.default_rng(0)
    for ci, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for j in range(6):
            img = stained_image(rng, size=72, lobes=1 + ci, nucleus=0.2 + 0.05 * ci)
            Image.fromarray(img).save(root / c / f"{c}{j}.png")
    return root


def checkpoint(path: Path, store, seed: int) -> Path:
    return tiny_checkpoint(path, store, crop=CROP, resize=S, seed=seed, fold=0)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    images = write_images(d / "images")
    store_path = d / "store.h5"
    prepare_store(images, store_path, PrepareConfig(size=S, workers=0))
    split_store(store_path, SplitConfig(test=0.2, folds=2, seed=0))
    store = open_store(store_path)
    cfg = ExtractConfig(workers=0, batch_size=4)
    members = []
    for seed in (0, 1):
        ckpt = checkpoint(d / f"run{seed}" / "best.pt", store, seed)
        cache = d / f"cache{seed}.zarr"
        extract(ckpt, store_path, cache, cfg)
        attrs = open_cache(cache).attrs
        rng = np.random.default_rng(seed)
        dim = attrs["dim"]
        head = Head(rng.normal(size=(3, dim)).astype(np.float32), rng.normal(size=3).astype(np.float32),
                    CLASSES, cache={"checkpoint_sha256": attrs["checkpoint_sha256"]}).save(d / f"head{seed}.pt")
        members.append((ckpt, cache, head))
    return SimpleNamespace(dir=d, images=images, store_path=store_path, store=store, members=members)


def test_predict_equals_evaluate_from_cache(env):
    specs = [f"{c}:{h}" for c, _, h in env.members] + [str(env.members[0][0])]  # 2 decoupled + 1 supervised
    ens = save_ensemble(specs, env.store_path, "d4", env.dir / "ens" / "ensemble.yaml")
    result = predict(env.images, ens, env.dir / "pred.csv", batch_size=5, device="cpu")
    assert result.n_ok == len(env.store) and not result.failed
    # Reference: the same members from their caches, rows reordered to predict's file order.
    outs = [member_output(Member(c, h)) for _, c, h in env.members]
    outs.append(member_output(Member(env.members[0][1], None)))
    ref = np.mean([view_probs(o.logits) for o in outs], axis=0)
    order = {p: i for i, p in enumerate(sorted(str(p.relative_to(env.images)) for p in env.images.rglob("*.png")))}
    stored = list(open_store(env.store_path).paths)
    perm = [order[stored[int(i)]] for i in outs[0].index]
    np.testing.assert_allclose(result.probs[perm], ref, atol=2e-3)
    text = (env.dir / "pred.csv").read_text().splitlines()
    assert text[0] == "image,predicted,confidence,ood_score,review,prob_A,prob_B,prob_C"
    assert len(text) == 1 + len(env.store)


def test_unreadable_images_are_listed_not_dropped(env, tmp_path):
    ens = save_ensemble([str(env.members[0][0])], env.store_path, "identity", tmp_path / "e.yaml")
    folder = tmp_path / "new"
    folder.mkdir()
    Image.open(next(env.images.rglob("*.png"))).save(folder / "ok.png")
    (folder / "broken.png").write_bytes(b"not an image")
    result = predict(folder, ens, tmp_path / "p.csv", device="cpu")
    assert result.n_ok == 1
    assert [Path(p).name for p, _ in result.failed] == ["broken.png"]
    assert "broken.png" in result.failed_path.read_text()


def test_ensemble_file_checks(env, tmp_path):
    ens = save_ensemble([str(env.members[0][0])], env.store_path, "d4", tmp_path / "e.yaml")
    assert load_ensemble(ens).views[0] == "identity" and len(load_ensemble(ens).views) == 8
    with pytest.raises(WbcError, match="no --member"):
        save_ensemble([], env.store_path, "d4", tmp_path / "x.yaml")
    ckpt = env.members[0][0]
    original = ckpt.read_bytes()
    try:
        ckpt.write_bytes(original + b"x")
        with pytest.raises(WbcError, match="changed since"):
            load_ensemble(ens)
    finally:
        ckpt.write_bytes(original)


def test_cli_predict(env, tmp_path):
    ens = save_ensemble([str(env.members[0][0])], env.store_path, "identity", tmp_path / "e.yaml")
    code = 0
    try:
        main(["predict", str(env.images), "--ensemble", str(ens), "--out", str(tmp_path / "p.csv"),
              "--device", "cpu"])
    except SystemExit as e:
        code = int(e.code or 0)
    assert code == 0 and (tmp_path / "p.csv").exists()
    try:
        main(["predict", str(tmp_path / "missing"), "--ensemble", str(ens)])
    except SystemExit as e:
        code = int(e.code or 0)
    assert code == 2
