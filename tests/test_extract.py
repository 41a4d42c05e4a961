"""`wbc extract` end to end on a tiny store and a tiny timm model (CPU, a few seconds)."""

import errno
import json
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torch.multiprocessing as mp

import wbc.embed as embed_mod
import wbc.engine.extract.run as ex
from tests.fixtures import make_tiny_store
from wbc.backbones import data_config
from wbc.cache import done_blocks, open_cache, open_for_writing
from wbc.cli import main
from wbc.engine.extract.run import ExtractConfig, extract
from wbc.errors import WbcError
from wbc.store import open_store

S, CROP = 64, 48  # stored size, centre crop (no resize: the reference below is pure numpy)
CFG = ExtractConfig(chunk_rows=4, workers=0, batch_size=3)  # 24 rows -> 6 blocks, 2 forwards each

# Each view written with numpy on an (H, W, 3) image, independently of wbc.views.
NP_VIEWS = {
    "identity": lambda a: a,
    "rot90": lambda a: np.rot90(a),
    "rot180": lambda a: np.rot90(a, 2),
    "rot270": lambda a: np.rot90(a, 3),
    "hflip": lambda a: a[:, ::-1],
    "vflip": lambda a: a[::-1],
    "transpose": lambda a: a.transpose(1, 0, 2),
    "antitranspose": lambda a: a[::-1, ::-1].transpose(1, 0, 2),
}


def save_checkpoint(path: Path, store, seed: int = 0) -> Path:
    """A Stage-1 checkpoint (docs/ARCHITECTURE.md section 2) of a tiny random timm model."""
    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=len(store.class_names))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "format": "wbc.stage1/1", "model": model.state_dict(), "timm_name": "test_efficientnet",
        "alias": "test_efficientnet", "class_names": list(store.class_names),
        "store_content_id": store.content_id, "fold": 0, "config": {},
        "data_config": data_config(model, crop=CROP, resize=S), "epoch": 3,
    }, path)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("extract")
    store_path = make_tiny_store(d / "store.h5", size=S)
    store = open_store(store_path)
    ckpt = save_checkpoint(d / "run" / "fold0" / "best.pt", store)
    ref = d / "ref.zarr"
    extract(ckpt, store_path, ref, CFG)
    return SimpleNamespace(dir=d, store_path=store_path, store=store, ckpt=ckpt, ref=ref)


def direct_forward(ckpt: Path, image: np.ndarray, view: str):
    """The same view embedded by hand: numpy crop + view + normalise, plain fp32 forward."""
    meta = torch.load(ckpt, weights_only=True)
    model = timm.create_model(meta["timm_name"], pretrained=False, num_classes=len(meta["class_names"]))
    model.load_state_dict(meta["model"])
    model.eval()
    o = (S - CROP) // 2
    a = NP_VIEWS[view](image[o:o + CROP, o:o + CROP]).astype(np.float32) / 255.0
    dc = meta["data_config"]
    a = (a - np.array(dc["mean"], np.float32)) / np.array(dc["std"], np.float32)
    x = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]
    with torch.no_grad():
        emb = model.forward_head(model.forward_features(x), pre_logits=True)[0]
        return emb.numpy(), model(x)[0].numpy()


def assert_same_store(a: Path, b: Path, group=None):
    ga, gb = open_for_writing(a, group), open_for_writing(b, group)
    for name in ("features", "stage1_logits", "labels", "index", "fold", "done"):
        np.testing.assert_array_equal(ga[name][:], gb[name][:], err_msg=name)
    skip = {"timings", "created"}
    da = {k: v for k, v in ga.attrs.asdict().items() if k not in skip}
    db = {k: v for k, v in gb.attrs.asdict().items() if k not in skip}
    assert da == db


def test_cached_features_equal_direct_forward_per_view(env):
    c = open_cache(env.ref, checkpoint=env.ckpt, store=env.store)
    assert c.features.shape == (24, 8, c.dim) and c.views == list(NP_VIEWS)
    np.testing.assert_array_equal(c.index, np.arange(24))
    np.testing.assert_array_equal(c.labels, env.store.labels)
    np.testing.assert_array_equal(c.fold, env.store.folds)
    for row in (0, 13, 23):
        feats = c.features[row].astype(np.float32)
        for k, view in enumerate(c.views):
            emb, logits = direct_forward(env.ckpt, env.store.image(int(c.index[row])), view)
            tol = 2e-3 * np.abs(emb).max()  # fp16 rounding of the cached embedding
            np.testing.assert_allclose(feats[k], emb, rtol=2e-3, atol=tol, err_msg=view)
            np.testing.assert_allclose(c.stage1_logits[row, k], logits, rtol=1e-4, atol=1e-5)
        # the 8 views are 8 different inputs: no view repeats the original
        for i in range(8):
            for j in range(i + 1, 8):
                assert np.abs(feats[i] - feats[j]).max() > 0, (c.views[i], c.views[j])


def test_resume_after_interruption_gives_identical_store(env, tmp_path, monkeypatch):
    real, calls = ex._check_finite, []

    def interrupt_third_block(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(ex, "_check_finite", interrupt_third_block)
    out = tmp_path / "c.zarr"
    with pytest.raises(KeyboardInterrupt):
        extract(env.ckpt, env.store_path, out, CFG)
    assert done_blocks(open_for_writing(out)).tolist() == [True, True] + [False] * 4
    with pytest.raises(WbcError, match=r"incomplete \(2 of 6 row blocks"):
        open_cache(out)
    monkeypatch.undo()
    s = extract(env.ckpt, env.store_path, out, CFG)
    assert s["blocks_written"] == 4
    assert_same_store(out, env.ref)


def test_stale_cache_is_refused(env, tmp_path):
    other_ckpt = save_checkpoint(tmp_path / "other.pt", env.store, seed=1)
    with pytest.raises(WbcError, match=r"stale cache .*checkpoint [0-9a-f]{12} but .*other.pt is [0-9a-f]{12}"):
        open_cache(env.ref, checkpoint=other_ckpt)
    other_store = make_tiny_store(tmp_path / "other.h5", size=S, seed=1)
    sid = open_store(other_store).content_id[:12]
    with pytest.raises(WbcError, match=rf"image store {env.store.content_id[:12]} but .*other.h5 is {sid}"):
        open_cache(env.ref, store=other_store)


def test_refuses_bad_pairings_and_existing_output(env, tmp_path):
    wrong_classes = make_tiny_store(tmp_path / "x.h5", classes=("A", "B", "X"), size=S)
    with pytest.raises(WbcError, match="class mismatch"):
        extract(env.ckpt, wrong_classes, tmp_path / "a.zarr", CFG)
    other = make_tiny_store(tmp_path / "o.h5", size=S, seed=1)
    with pytest.raises(WbcError, match="trained on image store .*--other-store"):
        extract(env.ckpt, other, tmp_path / "b.zarr", CFG)
    with pytest.raises(WbcError, match="already a complete cache; pass --overwrite"):
        extract(env.ckpt, env.store_path, env.ref, CFG)
    out = tmp_path / "ext.zarr"
    extract(env.ckpt, other, out, ExtractConfig(chunk_rows=8, workers=0, other_store=True))
    c = open_cache(out, checkpoint=env.ckpt, store=other)
    assert c.attrs["checkpoint_store_content_id"] == env.store.content_id
    s = extract(env.ckpt, other, out, ExtractConfig(chunk_rows=8, workers=0, other_store=True, overwrite=True))
    assert s["blocks_written"] == 3


def test_partial_cache_of_other_settings_is_not_resumed(env, tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "_check_finite", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    out = tmp_path / "c.zarr"
    with pytest.raises(KeyboardInterrupt):
        extract(env.ckpt, env.store_path, out, CFG)
    monkeypatch.undo()
    with pytest.raises(WbcError, match="partial cache of a different extraction .*views"):
        extract(env.ckpt, env.store_path, out, ExtractConfig(views="rotations", chunk_rows=4, workers=0))


def test_checkpoint_source_forms(env, tmp_path):
    assert ex.resolve_checkpoint(env.ckpt.parent.parent) == env.ckpt  # run root with one fold
    assert ex.resolve_checkpoint(env.ckpt.parent) == env.ckpt
    run = tmp_path / "run"
    for k in (0, 1):
        (run / f"fold{k}").mkdir(parents=True)
        shutil.copy(env.ckpt, run / f"fold{k}" / "best.pt")
    with pytest.raises(WbcError, match="2 folds .*ambiguous.*fold0"):
        ex.resolve_checkpoint(run)
    with pytest.raises(WbcError, match="no best.pt"):
        ex.resolve_checkpoint(tmp_path)


def test_nan_embeddings_stop_and_name_the_rows(env, tmp_path, monkeypatch):
    real, calls = embed_mod.embed, []

    def nan_in_second_block(model, x):
        e = real(model, x)
        if x.shape[0] > 1:  # not the dimension probe
            calls.append(1)
            if len(calls) == 2:
                e[1] = float("nan")  # view 0 of image 1 of block 1 = store row 5
        return e

    monkeypatch.setattr(embed_mod, "embed", nan_in_second_block)
    out = tmp_path / "c.zarr"
    cfg = ExtractConfig(chunk_rows=4, workers=0, batch_size=4)
    with pytest.raises(WbcError, match=rf"NaN/inf.*store rows \[5\] \({env.store.paths[5]}\)"):
        extract(env.ckpt, env.store_path, out, cfg)
    g = open_for_writing(out)
    assert done_blocks(g).tolist() == [True] + [False] * 5 and not g.attrs["complete"]


def test_disk_full_leaves_an_incomplete_resumable_store(env, tmp_path, monkeypatch):
    real, calls = ex.write_rows, []

    def full_disk(*a):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a)

    monkeypatch.setattr(ex, "write_rows", full_disk)
    out = tmp_path / "c.zarr"
    with pytest.raises(WbcError, match="disk full while writing .*rerun the same command"):
        extract(env.ckpt, env.store_path, out, CFG)
    with pytest.raises(WbcError, match="incomplete"):
        open_cache(out)
    monkeypatch.undo()

    def full_at_the_end(g, **attrs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ex, "mark_complete", full_at_the_end)
    with pytest.raises(WbcError, match="disk full"):
        extract(env.ckpt, env.store_path, out, CFG)
    assert done_blocks(open_for_writing(out)).all() and not open_for_writing(out).attrs["complete"]
    monkeypatch.undo()
    extract(env.ckpt, env.store_path, out, CFG)
    assert_same_store(out, env.ref)


def test_named_group_with_an_image_transform(env, tmp_path):
    out = tmp_path / "c.zarr"
    shutil.copytree(env.ref, out)
    test_rows = np.flatnonzero(env.store.folds == -1)

    def invert(images, rows):  # images (B, S, S, 3) uint8, store rows (B,)
        assert len(images) == len(rows)
        return 255 - images

    with pytest.raises(ValueError, match="go together"):
        extract(env.ckpt, env.store_path, out, CFG, group="invert", image_fn=invert)
    extract(env.ckpt, env.store_path, out, CFG, group="invert", image_fn=invert,
            image_transform="invert", rows=test_rows)
    v = open_cache(out, group="invert", checkpoint=env.ckpt, store=env.store)
    np.testing.assert_array_equal(v.index, test_rows)
    assert (v.fold == -1).all() and v.attrs["image_transform"] == "invert"
    emb, _ = direct_forward(env.ckpt, 255 - env.store.image(int(test_rows[0])), "rot90")
    np.testing.assert_allclose(v.features[0, 1].astype(np.float32), emb, rtol=2e-3,
                               atol=2e-3 * np.abs(emb).max())
    assert_same_store(out, env.ref)  # the main cache is untouched
    assert open_cache(out).cache_id != v.cache_id


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, ckpt, store, out):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    extract(ckpt, store, out, CFG)


def test_two_gloo_processes_write_the_same_store_as_one(env, tmp_path):
    out = tmp_path / "c.zarr"
    # fork: the children inherit imported torch/timm (spawn re-imports them: ~10 s on 2 cores)
    mp.start_processes(_rank_main, args=(2, _free_port(), env.ckpt, env.store_path, out), nprocs=2,
                       join=True, start_method="fork")
    assert_same_store(out, env.ref)
    assert open_cache(out).attrs["timings"]["ranks"] == 2


def test_cli_extract_and_cache_info(env, tmp_path, capsys):
    out = tmp_path / "c.zarr"
    args = ["extract", str(env.ckpt.parent), "--store", str(env.store_path), "--out", str(out),
            "--chunk-rows", "4", "--workers", "0", "--batch-size", "3"]
    main(args)
    assert_same_store(out, env.ref)
    ran = open_cache(out).attrs["ran"]  # what ran, beside what was asked (amp on by default)
    assert open_cache(out).attrs["config"]["amp"]
    if ran["device"] == "cpu":
        assert not ran["amp"] and ran["dtype"] == "float32"
    with pytest.raises(SystemExit) as e:
        main(args)  # complete output without --overwrite
    assert e.value.code == 2
    capsys.readouterr()
    main(["cache", "info", str(out), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] and info["shapes"]["features"][:2] == [24, 8] and info["size_bytes"] > 0
    main(["cache", "info", str(out)])
    assert "checkpoint sha256" in capsys.readouterr().out
