"""`wbc prepare` / `split` / `info`: sources, Macenko in the store, bad input, resume, CLI."""

import csv
import io
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

import wbc.prepare as prep
from tests.fixtures import HE_DEFAULT, stained_image, write_image_folder
from wbc.cli import main
from wbc.errors import WbcError
from wbc.prepare import PrepareConfig, prepare_store
from wbc.sources import WBCBENCH_CLASSES, resize_square
from wbc.splits import SplitConfig, split_store
from wbc.stain import estimate_stain, preprocess_like_store, stain_distance
from wbc.store import open_store

HE_B = np.stack([np.array([0.45, 0.80, 0.40]), np.array([0.15, 0.90, 0.40])], axis=1)
HE_B = HE_B / np.linalg.norm(HE_B, axis=0)
CFG = PrepareConfig(size=48, workers=0)


def _png(arr, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG") if mode else Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _skipped(report) -> dict:
    with open(report.skipped_csv) as f:
        return {r["path"]: r["reason"] for r in csv.DictReader(f)}


def test_folder_round_trip_and_macenko_applied(tmp_path):
    src = write_image_folder(tmp_path / "src", ("A", "B"), 4, seed=0)
    write_image_folder(tmp_path / "src", ("B",), 2, seed=5, he=HE_B)  # overwrites B/000, B/001
    r = prepare_store(src, tmp_path / "s.h5", CFG)
    s = open_store(r.out)
    assert len(s) == 8 and s.class_names == ["A", "B"] and s.size == 48
    assert s.labels.tolist() == [0] * 4 + [1] * 4 and s.paths[0] == "A/000.png"
    assert s.stain_ok.all() and r.n_stain_failed == 0 and r.n_skipped == 0
    tpl = s.provenance["template"]
    assert tpl["spec"] == "auto" and tpl["path"] in s.paths and tpl["candidates"] == 8
    he_tpl = np.array(s.provenance["stain_matrix"])
    assert he_tpl.shape == (3, 2) and len(s.provenance["max_conc"]) == 2
    # Macenko really ran: the differently stained source image changed and now has the template's stains
    orig = np.asarray(Image.open(src / "B/000.png").convert("RGB"))
    assert stain_distance(estimate_stain(orig)[0], he_tpl) > 10
    stored = s.image(s.paths.index("B/000.png"))
    assert np.abs(stored.astype(int) - resize_square(orig, 48).astype(int)).mean() > 3
    assert stain_distance(estimate_stain(stored)[0], he_tpl) < 6
    # predict's preprocessing reproduces the stored image
    np.testing.assert_array_equal(preprocess_like_store(src / "B/000.png", s.provenance), stored)


def test_no_stain_stores_resized_originals_and_template_path(tmp_path):
    src = write_image_folder(tmp_path / "src", ("A", "B"), 2)
    r = prepare_store(src, tmp_path / "n.h5", PrepareConfig(size=40, stain=False, workers=0))
    s = open_store(r.out)
    orig = np.asarray(Image.open(src / "A/001.png").convert("RGB"))
    np.testing.assert_array_equal(s.image(1), resize_square(orig, 40))
    assert s.provenance["stain"] == "none" and s.stain_ok.all()
    r2 = prepare_store(src, tmp_path / "t.h5", PrepareConfig(size=40, template=str(src / "B/000.png"), workers=0))
    assert open_store(r2.out).provenance["template"]["path"] == str(src / "B/000.png")
    assert open_store(r2.out).content_id != s.content_id
    Image.fromarray(np.full((50, 50, 3), 236, np.uint8)).save(tmp_path / "blank.png")
    with pytest.raises(WbcError, match="template .* cannot be used: too little stain"):
        prepare_store(src, tmp_path / "u.h5", PrepareConfig(template=str(tmp_path / "blank.png"), workers=0))


def test_bad_inputs_are_reported_not_fatal(tmp_path):
    src = write_image_folder(tmp_path / "src", ("A", "B"), 3)
    good = (src / "A/000.png").read_bytes()
    jpg = io.BytesIO()
    Image.open(io.BytesIO(good)).convert("RGB").save(jpg, "JPEG")
    (src / "A/truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    (src / "A/garbage.png").write_bytes(b"this is not an image")
    (src / "A/readme.txt").write_text("notes")
    (src / "Empty").mkdir()
    cell = stained_image(np.random.default_rng(3), 96, HE_DEFAULT)
    (src / "B/gray.png").write_bytes(_png(cell.mean(axis=2).astype(np.uint8)))
    rgba = np.dstack([cell, np.full(cell.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0
    (src / "B/rgba.png").write_bytes(_png(rgba))
    (src / "B/deep16.png").write_bytes(_png(cell[..., 0].astype(np.uint16) * 257))  # mode I;16
    Image.fromarray(np.full((64, 64, 3), 236, np.uint8)).save(src / "B/blank.png")
    Image.fromarray(cell[:3, :3]).save(src / "B/tiny.png")
    r = prepare_store(src, tmp_path / "s.h5", CFG)
    skipped = _skipped(r)
    assert skipped["A/truncated.jpg"].startswith("corrupt image")
    assert skipped["A/garbage.png"].startswith("not an image")
    assert skipped["A/readme.txt"].startswith("not an image file (extension '.txt')")
    assert skipped["Empty/"].startswith("empty class folder")
    s = open_store(r.out)
    assert s.class_names == ["A", "B"] and len(s.skipped) == 4 == r.n_skipped
    note = dict(zip(s.paths, s.notes))
    ok = dict(zip(s.paths, s.stain_ok))
    assert not ok["B/gray.png"] and note["B/gray.png"].startswith("grayscale")
    assert not ok["B/deep16.png"] and "16-bit" in note["B/deep16.png"]
    # 16-bit scaled, not clipped to white
    assert 20 < s.image(s.paths.index("B/deep16.png")).mean() < 235
    assert ok["B/rgba.png"] and note["B/rgba.png"] == "alpha composited on white"
    assert not ok["B/blank.png"] and note["B/blank.png"].startswith("too little stain")
    assert not ok["B/tiny.png"]
    assert r.n_stain_failed == 4 and s.provenance["counts"]["stain_failed"] == 4
    assert r.stain_failures["too little stain"] == 2


def test_manifest_problems(tmp_path):
    write_image_folder(tmp_path / "imgs", ("A", "B"), 3)
    rows = [("imgs/A/000.png", "A", "train", "p1"), ("imgs/A/001.png", "A", "test", "p2"),
            ("imgs/A/002.png", "", "train", "p3"), ("imgs/A/000.png", "B", "train", "p1"),
            ("imgs/B/000.png", "B", "train", "p4"), ("imgs/B/404.png", "B", "train", "p5"),
            ("imgs/B/001.png", "B", "Validation", "p6")]
    man = tmp_path / "m.csv"
    with open(man, "w", newline="") as f:
        csv.writer(f).writerows([("image", "label", "split", "group"), *rows])
    r = prepare_store(man, tmp_path / "s.h5", CFG)
    sk = _skipped(r)
    assert sk["imgs/A/002.png"].startswith("no label in manifest")
    assert sk["imgs/A/000.png"].startswith("duplicate path")
    assert sk["imgs/B/404.png"] == "file not found"
    s = open_store(r.out)
    assert s.paths == ["imgs/A/000.png", "imgs/A/001.png", "imgs/B/000.png", "imgs/B/001.png"]
    assert s.source_splits == ["train", "test", "train", "val"] and s.groups[0] == "p1"
    tpl = s.provenance["template"]  # candidates: only rows marked train (404.png fails)
    assert (tpl["candidates"], tpl["candidates_failed"]) == (3, 1)
    (tmp_path / "bad.csv").write_text("file,class\na.png,A\n")
    with pytest.raises(WbcError, match=r"missing column\(s\) \['image', 'label'\]"):
        prepare_store(tmp_path / "bad.csv", tmp_path / "b.h5", CFG)
    (tmp_path / "bad2.csv").write_text("image,label,split\nimgs/A/000.png,A,holdout\n")
    with pytest.raises(WbcError, match="unknown split 'holdout'"):
        prepare_store(tmp_path / "bad2.csv", tmp_path / "b.h5", CFG)


def test_parquet_wbcbench_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(0)
    recs = []
    for i in range(14):
        label = ["BA", "LY", "SNE"][i % 3] if i < 12 else None
        split = "test" if label is None else "train"
        recs.append({"image": {"bytes": _png(stained_image(rng, 64)), "path": f"img{i}.png"},
                     "image_id": f"id{i}", "label": label, "wbcbench_split": split, "severity": 0,
                     "original_image_id": f"o{i}", "patient_hash": f"pt{i // 2}"})
    recs.append({**recs[0], "image_id": "id0"})  # duplicate id
    recs.append({**recs[1], "image_id": "idX", "label": "XX"})  # unknown label
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "part-0.parquet")
    r = prepare_store(tmp_path, tmp_path / "out" / "w.h5", CFG)
    s = open_store(r.out)
    assert s.class_names == list(WBCBENCH_CLASSES) and len(s) == 14
    assert (s.labels[12:] == -1).all() and s.labels[0] == WBCBENCH_CLASSES.index("BA")
    assert s.groups[:3] == ["pt0", "pt0", "pt1"] and s.source_splits[-1] == "test"
    assert {p for p, _ in s.skipped} == {"id0", "idX"}
    split_store(r.out, SplitConfig(test=0.25, folds=2))
    f = open_store(r.out).folds
    assert (f[12:] == -2).all() and set(f[:12].tolist()) <= {-1, 0, 1}


@pytest.mark.parametrize("backend", ["batched", "torchstain"])
def test_interrupted_prepare_resumes(tmp_path, monkeypatch, backend):
    import wbc.prepare_batch as prep_batch

    src = write_image_folder(tmp_path / "src", ("A", "B"), 5)
    cfg = PrepareConfig(size=48, workers=0, commit_every=4, stain_backend=backend)
    full = prepare_store(src, tmp_path / "full.h5", cfg)
    # the per-item task (torchstain) or per-chunk task (batched: chunks of 4) that sees item 6 dies
    mod, name = (prep_batch, "prepare_chunk") if backend == "batched" else (prep, "_prepare_task")
    real = getattr(mod, name)

    def dying(*args):
        if 6 in ([i for i, _ in args[-1]] if backend == "batched" else [args[0][0]]):
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(mod, name, dying)
    with pytest.raises(KeyboardInterrupt):
        prepare_store(src, tmp_path / "s.h5", cfg)
    with pytest.raises(WbcError, match="incomplete"):
        open_store(tmp_path / "s.h5")  # a partial store is never taken for a complete one
    monkeypatch.setattr(mod, name, real)
    with pytest.raises(WbcError, match="different source or settings"):
        prepare_store(src, tmp_path / "s.h5", PrepareConfig(size=40, workers=0))
    r = prepare_store(src, tmp_path / "s.h5", cfg)
    assert r.resumed_from == 4 and r.n_written == 10
    assert r.content_id == full.content_id
    again = prepare_store(src, tmp_path / "s.h5", cfg)  # complete, same plan: a no-op
    assert again.resumed_from == 10 and again.content_id == full.content_id
    with pytest.raises(WbcError, match="already a complete store"):
        prepare_store(src, tmp_path / "s.h5", PrepareConfig(size=40, workers=0))
    np.testing.assert_array_equal(open_store(r.out).images(range(10)), open_store(full.out).images(range(10)))


def test_resumed_store_keeps_the_codec_it_was_started_with(tmp_path, monkeypatch):
    """A partial lzf store (made before zstd became the default) resumes as lzf: every chunk of
    one store decodes with one filter, and no computed row is thrown away."""
    import wbc.prepare_batch as prep_batch

    src = write_image_folder(tmp_path / "src", ("A", "B"), 5)
    cfg = PrepareConfig(size=48, workers=0, commit_every=4)
    real = prep_batch.prepare_chunk

    def dying(*args):
        if 6 in [i for i, _ in args[-1]]:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(prep_batch, "prepare_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare_store(src, tmp_path / "s.h5", replace(cfg, compression="lzf"))
    monkeypatch.setattr(prep_batch, "prepare_chunk", real)
    r = prepare_store(src, tmp_path / "s.h5", cfg)  # the default codec (zstd) asked
    full = prepare_store(src, tmp_path / "full.h5", cfg)
    s = open_store(r.out)
    assert r.resumed_from == 4 and s.compression == "lzf" and open_store(full.out).compression == "zstd"
    assert r.content_id == full.content_id  # the codec is not content
    np.testing.assert_array_equal(s.images(range(10)), open_store(full.out).images(range(10)))


def test_worker_pool_matches_in_process(tmp_path, monkeypatch):
    # fork keeps the test fast (a spawned worker re-imports torch: ~5 s); tasks and results are
    # pickled the same way. Safe here: conftest pins torch to 1 thread, so no OpenMP pool to fork.
    monkeypatch.setattr(prep, "START_METHOD", "fork")
    src = write_image_folder(tmp_path / "src", ("A", "B"), 3)
    a = prepare_store(src, tmp_path / "a.h5", CFG)
    b = prepare_store(src, tmp_path / "b.h5", PrepareConfig(size=48, workers=2, commit_every=2))
    assert a.content_id == b.content_id
    np.testing.assert_array_equal(open_store(a.out).images(range(6)), open_store(b.out).images(range(6)))


def test_cli_prepare_split_info(tmp_path, capsys):
    src = write_image_folder(tmp_path / "src", ("A", "B"), 6)
    out = tmp_path / "s.h5"

    def run(*args):
        try:
            main(list(args))
        except SystemExit as e:
            return e.code
        return 0

    assert run("prepare", str(src), "--out", str(out), "--size", "32", "--workers", "0") == 0
    assert run("split", str(out), "--test", "0.34", "--folds", "2", "--seed", "1") == 0
    assert run("info", str(out), "--json") == 0
    d = json.loads(capsys.readouterr().out)
    assert d["counts"]["test"] == [2, 2] and d["counts"]["fold0"] == [2, 2]
    assert d["split"]["seed"] == 1 and d["n_skipped"] == 0
    assert run("info", str(out)) == 0
    text = capsys.readouterr().out
    assert "fold1" in text and "content id" in text and "stain failed" in text
    # user mistakes exit 2 with one line
    assert run("prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "x.h5")) == 2
    assert run("split", str(out), "--folds", "6", "--overwrite") == 2  # 5 per class < 6 folds
    assert run("info", str(tmp_path / "x.h5")) == 2
    assert "class" in capsys.readouterr().err


def test_every_command_has_help():
    from typer.testing import CliRunner

    from wbc.cli.app import app

    for cmd in ("prepare", "split", "info"):
        res = CliRunner().invoke(app, [cmd, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output
