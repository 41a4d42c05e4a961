"""Stage 2 as a library: HeadConfig, fit, the validation vote, the epoch and tau rules, the README
snippet, and `wbc crt` through the installed script."""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from tests.test_heads import long_tailed, write_cache
from wbc.cache import open_cache
from wbc.errors import WbcError
from wbc.heads import TAU_GRID, Head, tau_normalise
from wbc.losses import LOSSES, LossSpec
from wbc.stage2 import HeadConfig, fit
from wbc.stage2.trainer import _EarlyStopping
from wbc.stage2.validate import post_hoc, val_confusion

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"epochs": 6, "batch_size": 64, "lr": 1e-2, "patience": 3}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = long_tailed(counts=(120, 50, 20, 9), k=3, d=12, seed=7)
    return open_cache(write_cache(tmp_path_factory.mktemp("s2") / "c.zarr", d, chunk_rows=16))


# -- HeadConfig ------------------------------------------------------------------------------
def test_config_takes_a_loss_name_and_refuses_unknown_ones_listing_the_registry():
    assert HeadConfig(loss="balanced_softmax").loss == LossSpec("balanced_softmax")
    assert HeadConfig(tau="auto").tau == "auto" and HeadConfig(tau="0.5").tau == 0.5
    with pytest.raises(WbcError) as e:
        HeadConfig(loss="balanced_sofmax")
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in LOSSES.names())


@pytest.mark.parametrize("kw,msg", [({"epochs": 0}, "--epochs"), ({"lr": 0.0}, "--lr"), ({"lr": -1e-3}, "--lr"),
                                    ({"batch_size": 0}, "--batch-size"), ({"patience": 0}, "--patience"),
                                    ({"weight_decay": -1.0}, "--weight-decay"), ({"sampler": "x"}, "unknown sampler"),
                                    ({"tau": "x"}, "--tau"), ({"tau": -0.5}, "--tau"), ({"memory_gb": 0}, "--memory-gb"),
                                    ({"loss": 3}, "loss name"), ({"lr": float("nan")}, "--lr"),
                                    ({"logit_adjust": float("inf")}, "--logit-adjust"), ({"tau": "inf"}, "--tau")])
def test_config_refuses_bad_values(kw, msg):
    with pytest.raises(WbcError, match=msg):
        HeadConfig(**kw)


@pytest.mark.parametrize("kw,msg", [({"beta": 1.0}, "--beta"), ({"beta": -0.1}, "--beta"), ({"gamma": -1.0}, "--gamma"),
                                    ({"lam": 1.5}, "--lam"), ({"lam": -0.1}, "--lam"), ({"gamma": float("nan")}, "--gamma"),
                                    ({"gamma": float("inf")}, "finite"), ({"la_tau": float("nan")}, "finite")])
def test_loss_spec_refuses_bad_values_when_made(kw, msg):
    with pytest.raises(WbcError, match=msg):
        HeadConfig(loss=LossSpec(**kw))


def test_fit_refuses_a_stage1_config(cache):
    from wbc.engine.stage1.config import Stage1Config

    for bad in (Stage1Config(), [Stage1Config()], "balanced_softmax", []):
        with pytest.raises(WbcError, match="HeadConfig"):
            fit(cache, 0, bad)


# -- fit -------------------------------------------------------------------------------------
def test_fit_writes_nothing_and_mixed_configs_equal_their_own_passes(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in cache.path.parent.rglob("*"))
    a, b = HeadConfig(loss="ce", **QUICK), HeadConfig(loss="balanced_softmax", **{**QUICK, "epochs": 4})
    c = HeadConfig(loss=LossSpec(gamma=1.0), tau="auto", **QUICK)
    heads = fit(cache, 0, [a, b, c])
    assert list(tmp_path.iterdir()) == [] and sorted(p.name for p in cache.path.parent.rglob("*")) == before
    alone = fit(cache, 0, [a, c]) + fit(cache.path, 0, b)  # a and c share a pass; b trains alone
    for h, ref in zip(heads, [alone[0], alone[2], alone[1]]):
        np.testing.assert_array_equal(h.weight, ref.weight)
        assert h.tau == ref.tau and h.training["best_epoch"] == ref.training["best_epoch"]
    assert [h.training["ran"]["heads_in_pass"] for h in heads] == [2, 1, 2]
    assert [h.label for h in heads] == ["ce", "balanced_softmax", "cb_focal_hybrid beta=0.9999 gamma=1 lam=0.5"]
    h = heads[0]
    assert h.fold == 0 and h.config["val_fold"] == 0 and h.cache["cache_id"] == cache.cache_id
    assert h.config["loss"]["name"] == "ce" and h.config["train"]["epochs"] == 6
    assert h.training["ran"]["device"] == "cpu" and len(h.training["history"]) <= 6
    back = Head.load(h.save(tmp_path / "h.pt"))
    assert back.training == h.training and back.config == h.config


def test_recorded_validation_metrics_are_the_saved_heads_view_averaged_vote(cache):
    (head,) = fit(cache, 0, HeadConfig(tau="auto", logit_adjust=0.5, **QUICK))
    x, y = cache.split(0).data("val")
    w = tau_normalise(head.weight, head.tau).numpy()
    z = x.astype(np.float64) @ w.T + head.bias + head.logit_adjust  # (N, K, C)
    p = np.exp(z - z.max(-1, keepdims=True))
    pred = (p / p.sum(-1, keepdims=True)).mean(1).argmax(1)  # numpy: mean over views of each view's softmax
    assert head.training["metrics"]["mf1"] == pytest.approx(f1_score(y, pred, average="macro", labels=np.unique(y)))


class _Rows:
    """A stand-in row source serving fixed validation features (b, K, D)."""

    def __init__(self, x):
        self.x = torch.as_tensor(x, dtype=torch.float32)

    def val_chunks(self):
        yield slice(0, len(self.x)), self.x


def test_validation_votes_by_mean_of_view_softmaxes_not_mean_logits():
    # Identity head (logits = features). Image 0 (class 1): one view is sure of class 0 by a large
    # logit margin, two views favour class 1: mean logits say 0, mean softmax says 1 (0.66).
    x = np.array([[[20.0, 0.0], [0.0, 5.0], [0.0, 5.0]],
                  [[5.0, 0.0], [5.0, 0.0], [5.0, 0.0]]])
    y = np.array([1, 0])
    assert x[0].mean(0).argmax() == 0
    eye = torch.eye(2)
    cm = val_confusion(_Rows(x), eye, torch.zeros(2), 2, 2, torch.from_numpy(y))
    np.testing.assert_array_equal(cm[0], [[1, 0], [0, 1]])
    (ph,) = post_hoc([SimpleNamespace(weight=np.eye(2, dtype=np.float32), bias=np.zeros(2, np.float32))],
                     _Rows(x), y, np.array([10, 10]))
    assert ph.metrics["mf1"] == 1.0
    head = Head(np.eye(2, dtype=np.float32), np.zeros(2, np.float32), ["a", "b"])
    np.testing.assert_array_equal(head.predict_proba(x).argmax(1), y)


def test_tau_auto_is_the_best_validation_mf1_the_smallest_on_ties():
    rng = np.random.default_rng(3)
    c, d = 4, 6
    w = rng.normal(size=(c, d)) * np.array([[4.0], [1.0], [0.3], [0.1]])  # very unequal row norms
    b = rng.normal(size=c) * 0.1
    x = rng.normal(size=(60, 2, d))
    y = rng.integers(0, c, 60)
    ref = []
    for t in TAU_GRID:
        wt = w / np.linalg.norm(w, axis=1, keepdims=True) ** t
        z = x @ wt.T + b
        p = np.exp(z - z.max(-1, keepdims=True))
        ref.append(f1_score(y, (p / p.sum(-1, keepdims=True)).mean(1).argmax(1), average="macro", labels=np.unique(y)))
    assert len(set(np.round(ref, 9))) > 3, "MF1 should depend on tau here"
    fit_ = SimpleNamespace(weight=w.astype(np.float32), bias=b.astype(np.float32))
    (ph,) = post_hoc([fit_], _Rows(x), y, np.bincount(y, minlength=c), tau="auto")
    assert ph.tau == TAU_GRID[int(np.argmax(np.round(ref, 9)))]  # np.argmax: the first of equal maxima
    assert ph.metrics["mf1"] == pytest.approx(max(ref))
    # Rows of equal norm, no bias, one view: tau scales every logit alike, so all taus tie -> 0.
    unit = SimpleNamespace(weight=(w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32) * 2,
                           bias=np.zeros(c, np.float32))
    (tie,) = post_hoc([unit], _Rows(x[:, :1]), y, np.bincount(y, minlength=c), tau="auto")
    assert tie.tau == 0.0


def test_early_stopping_keeps_the_first_best_epoch_and_stops_after_patience():
    scores = [0.5, 0.6, 0.6, 0.55, 0.7, 0.7, 0.6, 0.65, 0.9]
    stop = _EarlyStopping(torch.zeros(2, 3), torch.zeros(2), 1, patience=3)
    stopped_at = None
    for epoch, s in enumerate(scores, 1):
        if stop.update(0, epoch, s, torch.full((2, 3), float(epoch)), torch.full((2,), float(epoch))):
            stopped_at = epoch
            break
    # reference: best = first epoch holding the running maximum; stop `patience` epochs after it
    best = 1 + int(np.argmax(scores[:stopped_at]))
    assert (stop.epoch[0], stopped_at, stop.best[0]) == (best, best + 3, 0.7) == (5, 8, 0.7)
    assert torch.equal(stop.w[0], torch.full((2, 3), 5.0))  # the weights of that epoch


def test_fit_history_follows_the_epoch_rule(cache):
    heads = fit(cache, 0, [HeadConfig(loss=n, **{**QUICK, "epochs": 30, "patience": 2}) for n in ("ce", "focal")])
    for h in heads:
        mf1 = [e["mf1"] for e in h.training["history"]]
        best = 1 + int(np.argmax(mf1))
        assert h.training["best_epoch"] == best and h.training["val_mf1_at_best"] == max(mf1)
        assert len(mf1) == min(30, best + 2)


# -- README and the installed script ---------------------------------------------------------
def test_readme_python_api_snippet_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    cache_rel = re.search(r'open_cache\("([^"]+)"\)', code).group(1)
    write_cache(tmp_path / cache_rel, long_tailed(counts=(80, 30, 12), k=2, d=8, seed=1))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - running the README snippet is the test
    saved = Head.load(re.search(r'\.save\("([^"]+)"\)', code).group(1))
    assert saved.label == "balanced_softmax" and saved.fold == 0


def _wbc(*args, cwd=None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "wbc"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "WBC_NO_PROGRESS": "1", "COLUMNS": "200"}
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300, check=False)


def test_installed_wbc_crt_lists_losses_trains_and_refuses_bad_input(cache, tmp_path):
    help_text = _wbc("crt", "--help").stdout
    assert all(n in help_text for n in LOSSES.names())
    out = tmp_path / "h"
    r = _wbc("crt", cache.path, "--fold", "0", "--out", out, "--epochs", "2", "--threads", "1", "--loss", "ce")
    assert r.returncode == 0, r.stderr
    head = Head.load(out / "fold0" / "head.pt")
    assert head.label == "ce" and head.config["train"]["epochs"] == 2
    r = _wbc("crt", cache.path, "--fold", "0", "--out", out, "--loss", "nope")
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    assert "unknown loss 'nope'" in r.stderr.replace("\n", " ")
