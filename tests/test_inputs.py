"""Hostile or sloppy inputs: the same file listed twice, dangling symlinks, decompression bombs,
malformed CSVs, BOMs, stale failure lists, and members paired with the wrong checkpoint, head or store."""

from __future__ import annotations

import csv
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from tests.fixtures import tiny_checkpoint, write_image_folder
from tests.wbc_script import one_line_error, run_wbc
from wbc.engine.evaluate.predict import list_images, predict
from wbc.ensemble import load_ensemble, save_ensemble
from wbc.errors import WbcError
from wbc.heads import Head
from wbc.prepare import PrepareConfig, prepare_store, skipped_csv_path
from wbc.splits import SplitConfig, split_store
from wbc.store import open_store

FAST = PrepareConfig(size=32, stain=False, workers=0)


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A valid PNG header claiming side x side pixels (400 M, past PIL's bomb limit) in ~100 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def skipped(store: Path) -> dict[str, str]:
    with open(skipped_csv_path(store), newline="") as f:
        return {r["path"]: r["reason"] for r in csv.DictReader(f)}


def test_same_file_twice_is_stored_once(tmp_path):
    root = write_image_folder(tmp_path / "img", classes=("A", "B"), n_per_class=3, size=48)
    rows = [(f"{c}/{i:03d}.png", c) for c in "AB" for i in range(3)]
    rows.append((str((root / "A/001.png").resolve()), "A"))  # the same file by its absolute path
    (root / "m.csv").write_text("image,label\n" + "".join(f"{p},{y}\n" for p, y in rows))
    out = tmp_path / "s.h5"
    r = prepare_store(root / "m.csv", out, FAST)
    s = open_store(out)
    assert r.n_written == len(s) == 6 and len(set(np.asarray(s.paths))) == 6
    with h5py.File(out, "r") as f:
        sha = list(f["source_sha256"].asstr()[:])
    assert len(set(sha)) == len(sha)  # no content twice: a split cannot put one image on both sides
    reason = skipped(out)[rows[-1][0]]
    assert "same file content as store row 1 (A/001.png)" in reason


def test_dangling_symlink_is_listed_not_dropped(tmp_path):
    root = write_image_folder(tmp_path / "img", classes=("A", "B"), n_per_class=2, size=48)
    (root / "A" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    out = tmp_path / "s.h5"
    prepare_store(root, out, FAST)
    assert "dangling symlink" in skipped(out)["A/gone.png"]
    assert len(open_store(out)) == 4


def test_decompression_bomb_is_skipped_by_prepare(tmp_path):
    root = write_image_folder(tmp_path / "img", classes=("A", "B"), n_per_class=2, size=48)
    bomb_png(root / "A" / "bomb.png")
    out = tmp_path / "s.h5"
    r = prepare_store(root, out, PrepareConfig(size=32, workers=0))  # Macenko on: template pass too
    assert r.n_written == 4 and "decompression bomb" in skipped(out)["A/bomb.png"]


@pytest.fixture(scope="module")
def ens(tmp_path_factory):
    """A store, two checkpoints of it, heads trained (by id) on each one's features, an ensemble."""
    d = tmp_path_factory.mktemp("inputs")
    images = write_image_folder(d / "img", classes=("A", "B", "C"), n_per_class=3, size=48)
    store = d / "s.h5"
    prepare_store(images, store, FAST)
    split_store(store, SplitConfig(test=0.34, folds=2))
    st = open_store(store)
    cks = [tiny_checkpoint(d / f"r{k}" / "best.pt", st, crop=24, resize=32, seed=k) for k in (0, 1)]
    from wbc.backbones import load_checkpoint
    from wbc.config import file_sha256

    dim = load_checkpoint(cks[0])[0].num_features
    heads = []
    for k, ck in enumerate(cks):
        rng = np.random.default_rng(k)
        h = Head(rng.normal(size=(3, dim)).astype(np.float32), np.arange(3, dtype=np.float32),
                 ["A", "B", "C"], cache={"checkpoint_sha256": file_sha256(ck)})
        heads.append(h.save(d / f"h{k}" / "head.pt"))
    return SimpleNamespace(d=d, images=images, store=store, cks=cks, heads=heads, dim=dim)


def test_ensemble_save_refuses_a_head_of_another_checkpoint(ens):
    with pytest.raises(WbcError, match="trained on features of checkpoint"):
        save_ensemble([f"{ens.cks[0]}:{ens.heads[1]}"], ens.store, "identity", ens.d / "bad.yaml")
    r = run_wbc("ensemble", "save", "--member", f"{ens.cks[0]}:{ens.heads[1]}", "--store", ens.store,
                "--out", ens.d / "bad.yaml")
    one_line_error(r, "trained on features of checkpoint")
    assert not (ens.d / "bad.yaml").exists()


def test_replaced_head_is_refused(ens, tmp_path):
    head = tmp_path / "head.pt"
    head.write_bytes(ens.heads[0].read_bytes())
    y = save_ensemble([f"{ens.cks[0]}:{head}"], ens.store, "identity", tmp_path / "e.yaml")
    assert load_ensemble(y).members[0].head_sha256
    Head(np.ones((3, ens.dim), np.float32), np.zeros(3, np.float32), ["A", "B", "C"],
         cache=own_checkpoint(ens)).save(head)  # same checkpoint, other weights
    with pytest.raises(WbcError, match="changed since the ensemble was saved"):
        load_ensemble(y)


def own_checkpoint(ens) -> dict:
    from wbc.config import file_sha256

    return {"checkpoint_sha256": file_sha256(ens.cks[0])}


def test_predict_bomb_in_failed_csv_and_stale_failed_csv_removed(ens, tmp_path):
    y = save_ensemble([f"{ens.cks[0]}:{ens.heads[0]}"], ens.store, "identity", tmp_path / "e.yaml")
    imgs = tmp_path / "new"
    imgs.mkdir()
    for p in sorted(ens.images.rglob("*.png"))[:3]:
        (imgs / p.name).write_bytes(p.read_bytes())
    bomb_png(imgs / "bomb.png")
    out = tmp_path / "pred.csv"
    r = predict(imgs, y, out, device="cpu")
    assert r.n_ok == 3 and len(r.failed) == 1 and "decompression bomb" in r.failed[0][1]
    failed = out.with_name("pred.failed.csv")
    assert failed.exists()
    (imgs / "bomb.png").unlink()
    r = predict(imgs, y, out, device="cpu")
    assert r.n_ok == 3 and not r.failed and not failed.exists()


def test_csv_bom_accepted_by_predict_and_external(ens, tmp_path):
    from wbc.engine.evaluate.external import read_labelled

    p = next(ens.images.rglob("*.png"))
    (tmp_path / "m.csv").write_bytes("\ufeffimage,label\n".encode() + f"{p},A\n".encode())
    assert list_images(tmp_path / "m.csv")[0] == [Path(p)]
    assert read_labelled(tmp_path / "m.csv") == ([Path(p)], ["A"])


@pytest.mark.parametrize("body,needle", [
    (b"image,label\nA/000.png,A\nA/001.png,A,extra\n", "m.csv:3: 3 fields but the header has 2"),
    (b"image,label\nA/000.png,A\nA/\xff01.png,A\n", "m.csv:3: not UTF-8"),
])
def test_malformed_csv_names_the_line(body, needle, tmp_path):
    (tmp_path / "m.csv").write_bytes(body)
    one_line_error(run_wbc("prepare", tmp_path / "m.csv", "--out", tmp_path / "s.h5"), needle)
    with pytest.raises(WbcError, match=needle.split(": ", 1)[1]):
        list_images(tmp_path / "m.csv")


def test_evaluate_refuses_members_from_different_stores():
    from wbc.ensemble import MemberOutput, check_compatible

    z = np.zeros((2, 1, 3), np.float32)
    a = MemberOutput(z, np.zeros(2), np.arange(2), ["A", "B", "C"], store_id="a" * 64)
    b = MemberOutput(z, np.zeros(2), np.arange(2), ["A", "B", "C"], store_id="b" * 64)
    check_compatible([a, a], ["x", "y"])
    with pytest.raises(WbcError, match="different image stores"):
        check_compatible([a, b], ["x", "y"])


def test_member_output_carries_the_cache_store_id(ens, tmp_path):
    from wbc.engine.extract.config import ExtractConfig
    from wbc.engine.extract.run import extract
    from wbc.ensemble import Member, member_output

    cache = tmp_path / "c.zarr"
    extract(ens.cks[0], ens.store, cache, ExtractConfig(views="identity", device="cpu", workers=0))
    assert member_output(Member(cache)).store_id == open_store(ens.store).content_id


def test_duplicate_found_across_an_interrupted_and_resumed_prepare(tmp_path, monkeypatch):
    import wbc.sources

    root = write_image_folder(tmp_path / "img", classes=("A", "B"), n_per_class=2, size=48)
    dup = str((root / "A/000.png").resolve())
    (root / "m.csv").write_text(f"image,label\nA/000.png,A\nB/000.png,B\n{dup},A\nB/001.png,B\n")
    original = wbc.sources.Source.iter_bytes

    def stop_at_2(self, start=0):
        for i, b in original(self, start):
            if i == 2:
                raise KeyboardInterrupt  # after rows 0-1 are committed
            yield i, b

    monkeypatch.setattr(wbc.sources.Source, "iter_bytes", stop_at_2)
    out = tmp_path / "s.h5"
    # per item (the batched backend reads a chunk of 4 ahead, so it would resume at 0)
    cfg = PrepareConfig(size=32, stain=False, workers=0, commit_every=1, stain_backend="torchstain")
    with pytest.raises(KeyboardInterrupt):
        prepare_store(root / "m.csv", out, cfg)
    monkeypatch.setattr(wbc.sources.Source, "iter_bytes", original)
    r = prepare_store(root / "m.csv", out, cfg)
    assert r.resumed_from == 2 and len(open_store(out)) == 3
    assert "same file content as store row 0 (A/000.png)" in skipped(out)[dup]
