"""Issue 15: scale augmentation, LP-FT, WiSE-FT interpolation and the frozen-pretrained member."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from tests.fixtures import cli_exit_code, make_tiny_store
from wbc.augment import RandomScale, parse_augment, scale_crop
from wbc.backbones import load_checkpoint
from wbc.data import train_transform
from wbc.engine.stage1.interpolate import classifier_keys, interpolate
from wbc.engine.stage1.loops import StepSetup
from wbc.engine.stage1.lp_ft import linear_probe
from wbc.engine.stage1.train import Stage1Config, train
from wbc.errors import WbcError
from wbc.store import open_store

BG = (231, 219, 238)
TINY = Stage1Config(backbone="test_resnet", pretrained="none", epochs=1, batch_size=8, crop=32, workers=0)


def disk(size=64, r=10, cy=None, cx=None):
    """A dark disk (the cell) of radius r on a uniform background, (3, S, S) uint8."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BG
    yy, xx = np.mgrid[:size, :size]
    cy = (size - 1) / 2 if cy is None else cy
    cx = (size - 1) / 2 if cx is None else cx
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = (90, 40, 120)
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()


def cell_stats(x):
    """(centroid y, centroid x, equivalent radius) of the dark pixels, independent of wbc."""
    dark = x.numpy().astype(int).sum(0) < 450
    ys, xs = np.nonzero(dark)
    return ys.mean(), xs.mean(), np.sqrt(dark.sum() / np.pi)


# ---- scale augmentation --------------------------------------------------------------------------


def test_scale_factor_one_is_identity():
    x = disk()
    assert torch.equal(scale_crop(x, 1.0), x)
    torch.manual_seed(0)
    always_one = RandomScale(max_scale=1.0)  # log-uniform on [1, 1]
    assert all(torch.equal(always_one(x), x) for _ in range(5))


@pytest.mark.parametrize("factor", [0.625, 0.8, 1.25, 1.6])
def test_scale_keeps_cell_centred_and_background(factor):
    x = disk(size=64, r=12)
    y = scale_crop(x, factor)
    assert y.shape == x.shape and y.dtype == torch.uint8
    cy, cx, r = cell_stats(y)
    assert abs(cy - 31.5) < 1.0 and abs(cx - 31.5) < 1.0  # still centred
    assert abs(r - 12 * factor) < 1.0  # rescaled by the factor
    # Background colour kept: zooming out pads with the border's colour, zooming in crops the centre.
    for corner in (y[:, :3, :3], y[:, -3:, -3:], y[:, :3, -3:], y[:, -3:, :3]):
        assert (corner.reshape(3, -1).T == torch.tensor(BG, dtype=torch.uint8)).all()


def test_random_scale_draws_log_uniform_within_range():
    torch.manual_seed(0)
    t = RandomScale(1.6)
    f = np.array([t.factor() for _ in range(4000)])
    assert f.min() >= 1 / 1.6 - 1e-9 and f.max() <= 1.6 + 1e-9
    assert abs(np.mean(np.log(f))) < 0.03  # symmetric in log scale: shrink as often as enlarge
    assert abs(np.mean(f < 1) - 0.5) < 0.03


def test_augment_comma_list_composes_in_order():
    assert parse_augment("scale, degradations") == ["scale", "degradations"]
    t = train_transform("scale,randaugment")
    assert [type(p).__name__ for p in t.transforms] == ["RandomScale", "Compose"]
    x = disk()
    torch.manual_seed(1)
    assert train_transform("scale,none")(x).shape == x.shape
    for bad in ("scale,blur", "scale,,none", "", "randaugment,degradations", "scale,scale"):
        with pytest.raises(WbcError, match="--augment"):
            train_transform(bad)


# ---- LP-FT ---------------------------------------------------------------------------------------


def _tiny_ds(tmp_path):
    from wbc.backbones import data_config
    from wbc.data import StoreDataset

    store = open_store(make_tiny_store(tmp_path / "s.h5", n_per_class=8, size=40))
    model = timm.create_model("test_resnet", pretrained=False, num_classes=store.num_classes)
    dcfg = data_config(model, 32)
    ds = StoreDataset(store, np.arange(len(store.labels)), dcfg, transform=train_transform("randaugment"))
    return model, ds, dcfg


def test_linear_probe_changes_no_backbone_weight(tmp_path):
    torch.manual_seed(0)
    model, ds, dcfg = _tiny_ds(tmp_path)
    model.train()  # as train_fold leaves it: the probe must still not move BatchNorm statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = classifier_keys(model)
    out = linear_probe(model, ds, StepSetup(torch.device("cpu"), dcfg["mean"], dcfg["std"], None, False, 1),
                       batch=8, steps=200)
    after = model.state_dict()
    body = [k for k in before if k not in head]
    assert any("running_mean" in k for k in body)  # BatchNorm buffers are part of the check
    assert all(torch.equal(before[k], after[k]) for k in body)
    assert all(not torch.equal(before[k], after[k]) for k in head)
    assert out["probe_loss"] < np.log(3) * 0.8  # the head learned something on frozen features
    assert ds.transform is not None  # the dataset keeps its augmentation for the fine-tuning phase


def test_linear_probe_chooses_l2_on_validation(tmp_path):
    """With validation images the probe keeps the L2 strength with the best validation Macro-F1: a
    crushing L2 (weights ~0, every cell called one class) loses to a light one; alone it is kept."""
    import copy

    torch.manual_seed(0)
    model, ds, dcfg = _tiny_ds(tmp_path)
    setup = StepSetup(torch.device("cpu"), dcfg["mean"], dcfg["std"], None, False, 1)
    val = copy.copy(ds)
    val.transform = None
    out = linear_probe(model, ds, setup, batch=8, steps=200, val_ds=val, l2_grid=(1e-4, 1e3))
    assert out["probe_l2"] == 1e-4 and out["probe_val_mf1"] > 0.5
    light = model.get_classifier().weight.norm().item()
    out = linear_probe(model, ds, setup, batch=8, steps=200, val_ds=val, l2_grid=(1e3,))
    assert out["probe_l2"] == 1e3 and "probe_val_mf1" not in out  # one strength: nothing to choose
    assert model.get_classifier().weight.norm().item() < 0.2 * light


def test_lp_ft_and_frozen_recipes_train(tmp_path):
    store = make_tiny_store(tmp_path / "s.h5", n_per_class=6, size=40)
    (run,) = train(store, tmp_path / "lpft", Stage1Config(**{**TINY.__dict__, "recipe": "lp-ft"}), fold=0)
    _, meta = load_checkpoint(run / "best.pt")
    assert meta["config"]["recipe"] == "lp-ft" and meta["epoch"] == 1
    with pytest.raises(WbcError, match="--recipe"):
        train(store, tmp_path / "x", Stage1Config(**{**TINY.__dict__, "recipe": "wise"}), fold=0)


def test_frozen_pretrained_member_keeps_pretrained_backbone(tmp_path):
    store = make_tiny_store(tmp_path / "s.h5", n_per_class=6, size=40)
    pre = _pretrained_file(tmp_path, 3)
    cfg = Stage1Config(**{**TINY.__dict__, "pretrained": str(pre), "recipe": "frozen-pretrained"})
    (run,) = train(store, tmp_path / "frozen", cfg, fold=0)
    model, meta = load_checkpoint(run / "best.pt")
    assert meta["epoch"] == 0 and meta["complete"] and meta["config"]["recipe"] == "frozen-pretrained"
    ref = torch.load(pre, weights_only=True)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in sd if k not in classifier_keys(model))
    # --resume finds it complete and does nothing
    assert train(store, tmp_path / "frozen", cfg, fold=0, resume=True) == [run]


# ---- WiSE-FT interpolation -----------------------------------------------------------------------


def _pretrained_file(tmp_path, n_cls):
    torch.manual_seed(123)
    path = tmp_path / "pre.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False, num_classes=n_cls).state_dict(), path)
    return path


def _finetuned(tmp_path):
    store = make_tiny_store(tmp_path / "s.h5", n_per_class=6, size=40)
    pre = _pretrained_file(tmp_path, 3)
    (run,) = train(store, tmp_path / "ft", Stage1Config(**{**TINY.__dict__, "pretrained": str(pre)}), fold=0)
    return store, pre, run / "best.pt"


def test_interpolation_endpoints_and_midpoint(tmp_path):
    _, pre, ckpt = _finetuned(tmp_path)
    outs = interpolate(ckpt, [0.0, 0.5, 1.0], tmp_path / "wise")
    assert [p.parent.parent.name for p in outs] == ["alpha-0", "alpha-0.5", "alpha-1"]
    ft = torch.load(ckpt, weights_only=False)["model"]
    p = torch.load(pre, weights_only=True)
    model, _ = load_checkpoint(ckpt)
    head = classifier_keys(model)
    w0, w5, w1 = (torch.load(o, weights_only=False)["model"] for o in outs)
    body = [k for k in ft if k not in head]
    assert any("running_var" in k for k in body) and any("num_batches_tracked" in k for k in body)
    for k in ft:  # every tensor, BatchNorm buffers included
        assert torch.equal(w1[k], ft[k]), k
        assert torch.equal(w0[k], ft[k] if k in head else p[k]), k
        if k in head:
            assert torch.equal(w5[k], ft[k])
        elif ft[k].is_floating_point():
            mid = (p[k].double().numpy() + ft[k].double().numpy()) / 2  # numpy reference
            np.testing.assert_allclose(w5[k].double().numpy(), mid, rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(w5[k], ft[k]) for k in body)
    meta = torch.load(outs[1], weights_only=False)
    assert meta["wise"]["alpha"] == 0.5 and meta["wise"]["finetuned"] == str(ckpt)
    with pytest.raises(WbcError, match="exists"):
        interpolate(ckpt, [0.5], tmp_path / "wise")
    with pytest.raises(WbcError, match="between 0"):
        interpolate(ckpt, [1.5], tmp_path / "wise2")


def test_recalibrate_bn_sets_source_statistics_and_nothing_else(tmp_path):
    """--recalibrate-bn: weights as plain interpolation; BatchNorm running means become the training
    images' own (first layer checked against its input's per-channel mean, computed directly)."""
    from wbc.adapt.bn import bn_layers
    from wbc.data import crop_images, normalize
    from wbc.store import open_store

    store, _, ckpt = _finetuned(tmp_path)
    (plain,) = interpolate(ckpt, [0.5], tmp_path / "wise")
    (recal,) = interpolate(ckpt, [0.5], tmp_path / "wise-bn", recalibrate_bn=True)
    a, b = torch.load(plain, weights_only=True), torch.load(recal, weights_only=True)
    stats = [k for k in a["model"] if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"] if k not in stats)
    assert not torch.equal(a["model"][stats[0]], b["model"][stats[0]])
    assert b["wise"]["bn_recalibrated"] and "bn_recalibrated" not in a
    model, meta = load_checkpoint(plain)
    first = bn_layers(model)[0]
    seen = []
    first.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0]))
    st = open_store(store)
    folds = np.asarray(st.folds)
    rows = np.flatnonzero((folds >= 0) & (folds != 0))
    x = normalize(crop_images(st.images(rows), meta["data_config"]), meta["data_config"]["mean"], meta["data_config"]["std"])
    with torch.no_grad():
        model(x)
    want = seen[0].mean(dim=(0, 2, 3))
    name = next(n for n, m in model.named_modules() if m is first)
    torch.testing.assert_close(b["model"][f"{name}.running_mean"], want, rtol=1e-4, atol=1e-5)
    assert b["bn_recalibrated"]["n_images"] == len(rows)


# ---- CLI through the installed script ------------------------------------------------------------


def _wbc(*args, cwd):
    exe = Path(sys.executable).parent / "wbc"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([str(exe), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_cli_interpolate_frozen_and_extract(tmp_path, capsys):
    store, pre, ckpt = _finetuned(tmp_path)
    r = _wbc("interpolate", ckpt, "--alpha", "0.5", "--alpha", "1", "-o", tmp_path / "wise", cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    wise = tmp_path / "wise" / "alpha-0.5" / "fold0"
    assert (wise / "best.pt").is_file() and (wise / "config.yaml").is_file()
    r = _wbc("interpolate", ckpt, "--alpha", "0", "--recalibrate-bn", "-o", tmp_path / "wise-bn", cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    assert torch.load(tmp_path / "wise-bn" / "alpha-0" / "fold0" / "best.pt", weights_only=True)["bn_recalibrated"]["n_images"] > 0
    r = _wbc("interpolate", ckpt, "--alpha", "0", "--recalibrate-bn", "--store", tmp_path / "nope.h5",
             "-o", tmp_path / "wise-bad", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    r = _wbc("train", store, "--backbone", "test_resnet", "--pretrained", pre, "--recipe", "frozen-pretrained",
             "--crop", "32", "--batch-size", "8", "--workers", "0", "-o", tmp_path / "frozen", cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    assert (tmp_path / "frozen" / "fold0" / "best.pt").is_file()
    # both are normal Stage-1 checkpoints: extract takes them unchanged
    for src, name in ((wise, "w"), (tmp_path / "frozen" / "fold0", "f")):
        assert cli_exit_code(["extract", str(src), "--store", str(store), "--views", "identity",
                              "-o", str(tmp_path / f"{name}.zarr")]) == 0
    assert cli_exit_code(["interpolate", str(ckpt), "--alpha", "2", "-o", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr()
    assert "between 0" in err.out + err.err and "Traceback" not in err.out + err.err
