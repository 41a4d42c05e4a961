"""Files from users are data: a crafted checkpoint whose pickle calls os.system runs nothing,
through `wbc extract`, `wbc ensemble save`, `wbc train --resume` and `wbc predict`; a damaged
checkpoint (missing keys) is one line."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.fixtures import make_tiny_store, stained_image, tiny_checkpoint
from tests.wbc_script import one_line_error, run_wbc
from wbc.config import file_sha256
from wbc.store import open_store


class _Payload:
    """Unpickling this calls os.system(cmd): what a hostile best.pt would do."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def evil_checkpoint(path: Path, marker: Path, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "wbc.stage1/1", "payload": _Payload(f"touch {marker}"), **extra}, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    store = make_tiny_store(d / "store.h5", n_per_class=5, size=48)
    return d, store


def test_the_crafted_file_does_run_code_when_unpickled_unsafely(tmp_path):
    marker = tmp_path / "ran"
    evil = evil_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(evil, weights_only=False)  # the old behaviour: the command ran
    assert marker.exists()


def _refused(r, marker: Path) -> None:
    one_line_error(r, "refused")
    assert not marker.exists(), "the pickle's command ran"


def test_extract_runs_nothing(world, tmp_path):
    _, store = world
    marker = tmp_path / "ran"
    evil = evil_checkpoint(tmp_path / "best.pt", marker)
    _refused(run_wbc("extract", evil, "--store", store, "--out", tmp_path / "c.zarr"), marker)


def test_ensemble_save_runs_nothing(world, tmp_path):
    _, store = world
    marker = tmp_path / "ran"
    evil = evil_checkpoint(tmp_path / "best.pt", marker)
    _refused(run_wbc("ensemble", "save", "--member", evil, "--store", store, "--out", tmp_path / "e.yaml"),
             marker)


def test_train_resume_runs_nothing(world, tmp_path):
    _, store = world
    marker = tmp_path / "ran"
    evil_checkpoint(tmp_path / "run" / "fold0" / "last.pt", marker, train_state={})
    r = run_wbc("train", store, "--backbone", "test_resnet", "--pretrained", "none", "--fold", "0",
                "--out", tmp_path / "run", "--resume", "--device", "cpu")
    _refused(r, marker)


def test_predict_runs_nothing(world, tmp_path):
    _, store = world
    marker = tmp_path / "ran"
    evil = evil_checkpoint(tmp_path / "best.pt", marker)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(stained_image(np.random.default_rng(0), 48)).save(tmp_path / "imgs" / "a.png")
    s = open_store(store)
    doc = {"format": "wbc.ensemble/1", "class_names": s.class_names, "views": ["identity"],
           "store": {"path": str(store), "content_id": s.content_id, "provenance": s.provenance},
           "members": [{"name": "m", "checkpoint": "best.pt", "checkpoint_sha256": file_sha256(evil),
                        "head": None}]}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(doc))
    r = run_wbc("predict", tmp_path / "imgs", "--ensemble", tmp_path / "e.yaml", "--out", tmp_path / "p.csv",
                "--device", "cpu")
    _refused(r, marker)
    assert not (tmp_path / "p.csv").exists()


def test_checkpoint_missing_a_key_is_one_line(world, tmp_path):
    _, store = world
    ck = tiny_checkpoint(tmp_path / "best.pt", open_store(store), crop=32, resize=48)
    meta = torch.load(ck, weights_only=True)
    del meta["data_config"]
    torch.save(meta, ck)
    one_line_error(run_wbc("extract", ck, "--store", store, "--out", tmp_path / "c.zarr"),
                   "missing data_config")


def test_our_own_checkpoints_load_with_weights_only(world, tmp_path):
    """What `wbc train` writes (last.pt with optimizer, scheduler and stopper state) is plain data."""
    from wbc.engine.stage1.config import Stage1Config
    from wbc.engine.stage1.train import train

    _, store = world
    cfg = Stage1Config(backbone="test_resnet", pretrained="none", epochs=1, batch_size=4, crop=32,
                      workers=0, preload=True, device="cpu", augment="none")
    (run,) = train(store, tmp_path / "r", cfg, fold=0)
    for name in ("best.pt", "last.pt"):
        ck = torch.load(run / name, map_location="cpu", weights_only=True)
        assert ck["complete"] and "data_config" in ck
    assert "train_state" in torch.load(run / "last.pt", weights_only=True)


def test_no_library_module_unpickles_code():
    """Every load of a user's file goes through weights_only=True (wbc.backbones.load_file); a new
    `weights_only=False` (two slipped into wbc.adapt once) or pickle.load fails here."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "wbc"
    bad = [f"{p.relative_to(root.parent)}:{i}" for p in root.rglob("*.py")
           for i, line in enumerate(p.read_text().splitlines(), 1)
           if re.search(r"weights_only\s*=\s*False|pickle\.loads?\(|yaml\.load\(", line)]
    assert not bad, f"files from users loaded as code: {bad}"
