"""Stage-1 training engine and `wbc train` (tiny timm model, tiny synthetic store, CPU)."""

import json
import multiprocessing as mp
import os
import socket
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from tests.fixtures import make_tiny_store
from wbc.backbones import create_backbone, load_checkpoint
from wbc.cli import main
from wbc.config import load_config
from wbc.device import resolve_device
from wbc.engine.stage1 import train as tb
from wbc.engine.stage1.train import Stage1Config, train
from wbc.errors import WbcError

FAST = Stage1Config(backbone="test_resnet", pretrained="none", epochs=3, batch_size=8, crop=32,
                   lr=3e-3, workers=0, augment="none", seed=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("store") / "s.h5", n_per_class=10, size=40)


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_short_run_lowers_loss_and_writes_outputs(store, tmp_path):
    (run,) = train(store, tmp_path / "r", FAST, fold=1)
    assert run == tmp_path / "r" / "fold1"
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["loss"] < rows[0]["loss"]
    for key in ("loss", "lr", "val_mf1", "val_bacc", "val_mp", "val_mspec", "images_per_s"):
        assert np.isfinite(rows[-1][key])
    cfg = load_config(Stage1Config, run / "config.yaml")
    assert cfg.fold == 1 and cfg.resize == 53 and cfg.weight_decay == FAST.weight_decay
    ran = yaml.safe_load((run / "config.yaml").read_text())["ran"]  # what ran, beside what was asked
    dev = resolve_device(FAST.device)
    assert ran["device"] == str(dev) and ran["processes"] == 1 and ran["micro_batch"] == FAST.batch_size
    if dev.type != "cuda":  # AMP asked (the default), but only CUDA runs it: a CPU runs fp32
        assert cfg.amp and not ran["amp"] and ran["dtype"] == "float32"
    model, meta = load_checkpoint(run / "best.pt")
    assert model.get_classifier().out_features == 3
    assert meta["class_names"] == ["A", "B", "C"] and meta["fold"] == 1 and meta["complete"]
    assert meta["data_config"]["input_size"] == [3, 32, 32] and meta["store_content_id"]
    assert meta["epoch"] == max(rows, key=lambda r: r["val_mf1"])["epoch"]
    assert torch.load(run / "last.pt", weights_only=True)["train_state"]["stopper"]["best_epoch"] == meta["epoch"]
    with pytest.raises(WbcError, match="--resume"):  # never clobbered silently
        train(store, tmp_path / "r", FAST, fold=1)


def test_resume_matches_uninterrupted_run(store, tmp_path):
    cfg = Stage1Config(**{**FAST.__dict__, "augment": "randaugment", "accum_steps": 2})
    (full,) = train(store, tmp_path / "full", cfg, fold=0)

    def interrupt(epoch, model):
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(store, tmp_path / "cut", cfg, fold=0, on_epoch_end=interrupt)
    with pytest.raises(WbcError, match="--resume"):
        train(store, tmp_path / "cut", cfg, fold=0)
    with pytest.raises(WbcError, match="lr"):  # other settings would be neither run
        train(store, tmp_path / "cut", Stage1Config(**{**cfg.__dict__, "lr": 1.0}), fold=0, resume=True)
    (cut,) = train(store, tmp_path / "cut", cfg, fold=0, resume=True)
    a, b = _weights(full / "last.pt"), _weights(cut / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["val_mf1"] for r in _rows(full)] == [r["val_mf1"] for r in _rows(cut)]
    train(store, tmp_path / "cut", cfg, fold=0, resume=True)  # complete: nothing to do
    assert len(_rows(cut)) == 3


def test_sampler_visits_every_sample_once_per_epoch(store, tmp_path, monkeypatch):
    seen = []
    real = tb.StoreDataset.__getitem__

    def spy(self, j):
        if self.transform is not None:  # the training set
            seen.append(int(self.indices[j]))
        return real(self, j)

    monkeypatch.setattr(tb.StoreDataset, "__getitem__", spy)
    train(store, tmp_path / "r", Stage1Config(**{**FAST.__dict__, "epochs": 2, "batch_size": 5}), fold=0)
    with h5py.File(store) as f:
        fold = f["fold"][:]
    train_rows = sorted(np.flatnonzero((fold >= 0) & (fold != 0)).tolist())
    n = len(train_rows)
    assert len(seen) == 2 * n
    assert sorted(seen[:n]) == train_rows and sorted(seen[n:]) == train_rows
    assert seen[:n] != seen[n:]  # reshuffled each epoch


def test_bad_inputs(store, tmp_path):
    with pytest.raises(WbcError, match="not found"):
        train(tmp_path / "missing.h5", tmp_path / "r", FAST)
    partial = tmp_path / "partial.h5"
    partial.write_bytes(Path(store).read_bytes())
    with h5py.File(partial, "r+") as f:
        f.attrs["complete"] = False  # as an interrupted `wbc prepare` leaves it
    with pytest.raises(WbcError, match="incomplete"):
        train(partial, tmp_path / "r", FAST)
    with pytest.raises(WbcError, match="out of range"):
        train(store, tmp_path / "r", FAST, fold=7)
    with pytest.raises(WbcError, match="unknown backbone"):
        train(store, tmp_path / "r", Stage1Config(backbone="r51"))
    with pytest.raises(WbcError, match="multiple"):
        train(store, tmp_path / "r", Stage1Config(**{**FAST.__dict__, "batch_size": 7, "accum_steps": 2}))
    with pytest.raises(WbcError, match="unknown augmentation"):
        train(store, tmp_path / "r", Stage1Config(**{**FAST.__dict__, "augment": "mixup"}))


def test_training_folds_missing_a_class_warns(store, tmp_path, caplog):
    copy = tmp_path / "s.h5"
    copy.write_bytes(Path(store).read_bytes())
    with h5py.File(copy, "r+") as f:
        fold = f["fold"][:]
        fold[(f["labels"][:] == 2) & (fold >= 0)] = 0  # every CV image of class C in fold 0
        f["fold"][...] = fold
    train(copy, tmp_path / "r", Stage1Config(**{**FAST.__dict__, "epochs": 1}), fold=0)
    assert any("have no C" in r.getMessage() for r in caplog.records)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(store, tmp_path):
    def poison(epoch, model):
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))

    with pytest.raises(WbcError, match="epoch 2, step 1.*keeps epoch 1"):
        train(store, tmp_path / "r", FAST, fold=0, on_epoch_end=poison)
    last = torch.load(tmp_path / "r" / "fold0" / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values()
                                      if v.is_floating_point())


def test_out_of_memory_suggests_accumulation(store, tmp_path, monkeypatch):
    real = tb.create_backbone

    def oom_model(*a, **k):
        model = real(*a, **k)

        def boom(*_a, **_k):
            raise torch.OutOfMemoryError("CUDA out of memory")

        model.forward = boom
        return model

    monkeypatch.setattr(tb, "create_backbone", oom_model)
    with pytest.raises(WbcError, match="--accum-steps 2"):
        train(store, tmp_path / "r", FAST, fold=0)


def test_disk_full_keeps_previous_checkpoint(store, tmp_path, monkeypatch):
    real, calls = torch.save, []

    def full_disk(obj, f, *a, **k):
        calls.append(str(getattr(f, "name", f)))  # atomic_write hands torch.save an open file
        if len([c for c in calls if "last.pt" in c]) == 2:  # the second epoch's last.pt
            f.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(WbcError, match="No space left.*intact"):
        train(store, tmp_path / "r", FAST, fold=0)
    run = tmp_path / "r" / "fold0"
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.jsonl"]
    monkeypatch.setattr(torch, "save", real)
    (run,) = train(store, tmp_path / "r", FAST, fold=0, resume=True)  # and it resumes
    assert [r["epoch"] for r in _rows(run)] == [1, 2, 3]


def test_cli_fold_all(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", str(store), "--backbone", "test_resnet", "--pretrained", "none", "--fold", "all",
            "--epochs", "1", "--batch-size", "8", "--crop", "32", "--workers", "0", "--out", "runs/t"]
    main(args)
    assert sorted(p.name for p in (tmp_path / "runs/t").iterdir()) == ["fold0", "fold1", "fold2"]
    with pytest.raises(SystemExit) as e:
        main(["train", str(store), "--backbone", "nope_net", "--out", "runs/x"])
    assert e.value.code == 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank, world, port, store, out, cfg):
    # What torchrun sets for each process; forked, so nothing is imported again.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(store, out, cfg, fold=0)


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    """2 CPU processes over gloo train the same model as one process: equal weights and metrics.

    The model normalises with GroupNorm, not BatchNorm: per-rank batch statistics (4 images each
    instead of 8) would legitimately differ. With an even training set (18 images), no
    augmentation, and gradients averaged over equal micro-batches, each DDP step is the
    single-process step up to float rounding; rank 1 writes nothing.
    """
    store = make_tiny_store(tmp_path / "s.h5", n_per_class=11, size=40)
    cfg = Stage1Config(**{**FAST.__dict__, "backbone": "test_efficientnet_gn", "epochs": 2, "device": "cpu"})
    ctx = mp.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_ddp_rank, args=(r, 2, port, store, tmp_path / "ddp", cfg)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    train(store, tmp_path / "one", cfg, fold=0)
    ddp, one = tmp_path / "ddp" / "fold0", tmp_path / "one" / "fold0"
    a, b = _weights(ddp / "last.pt"), _weights(one / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    init = create_backbone("test_efficientnet_gn", 3, "none", crop=32)
    moved = max((b[k] - v).abs().max().item() for k, v in init.state_dict().items() if v.is_floating_point())
    assert moved > 1e-3, "training should have moved the weights, else equal weights prove nothing"
    rows_ddp, rows_one = _rows(ddp), _rows(one)
    assert [r["epoch"] for r in rows_ddp] == [1, 2]  # rank 1 wrote nothing
    for r, s in zip(rows_ddp, rows_one):
        for key in ("loss", "val_loss", "val_mf1", "val_bacc", "best_epoch"):
            assert r[key] == pytest.approx(s[key], rel=1e-4, abs=1e-6), key
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in one.iterdir())
    assert torch.load(ddp / "last.pt", weights_only=True)["config"]["batch_size"] == 8


def test_throughput_probe_runs_both_precisions():
    from wbc.engine.stage1.throughput import amp_speedup

    r = amp_speedup("test_resnet", batch_size=2, image_size=32, steps=1, warmup=1, device="cpu")
    assert r["fp32"]["images_per_s"] > 0 and r["amp"]["images_per_s"] > 0 and r["speedup"] > 0
    assert r["amp"]["amp"] == "fp32"  # autocast is CUDA-only in Stage 1: CPU stays fp32


def test_loader_workers_reproduce_the_same_weights(store, tmp_path):
    """Augmentation in 2 DataLoader workers draws from seeds fixed by (seed, epoch): same run twice, same weights."""
    cfg = Stage1Config(**{**FAST.__dict__, "augment": "randaugment", "workers": 2, "epochs": 1})
    (a,) = train(store, tmp_path / "a", cfg, fold=0)
    (b,) = train(store, tmp_path / "b", cfg, fold=0)
    wa, wb = _weights(a / "last.pt"), _weights(b / "last.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_of_a_checkpoint_older_than_the_recipe_setting():
    """A last.pt written before `recipe` existed resumes as the paper recipe, and only as that."""
    from wbc.engine.stage1.checkpointing import check_resumable
    from wbc.errors import WbcError

    old = {"store_content_id": "s", "config": {"epochs": 3, "lr": 1e-4}}
    check_resumable(old, {"epochs": 3, "lr": 1e-4, "recipe": "paper"}, "s", Path("last.pt"))
    with pytest.raises(WbcError, match="recipe: 'paper' -> 'lp-ft'"):
        check_resumable(old, {"epochs": 3, "lr": 1e-4, "recipe": "lp-ft"}, "s", Path("last.pt"))
