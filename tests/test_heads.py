"""Stage-2 heads: file format, view-averaged probabilities, tau-norm, logit adjustment, `wbc crt`."""

import json

import numpy as np
import pytest
import torch
import yaml
from sklearn.linear_model import LogisticRegression

from wbc.cache import create_cache, mark_complete, write_rows
from wbc.cli import main
from wbc.errors import WbcError
from wbc.heads import Head, load_head, prior_adjustment, tau_logits, tau_normalise

CKPT, STORE = "c" * 64, "d" * 64


# -- synthetic long-tailed caches (shared with test_ablate) ----------------------------------
def long_tailed(counts=(400, 150, 60, 25, 12), k=4, d=32, folds=3, sep=3.0, seed=0) -> dict:
    """Gaussian classes (means at distance `sep`), K noisy views per image; 20% test per class."""
    rng = np.random.default_rng(seed)
    c = len(counts)
    means = rng.normal(size=(c, d))
    means *= sep / np.linalg.norm(means, axis=1, keepdims=True)
    y = np.repeat(np.arange(c), counts)
    image = means[y] + rng.normal(size=(len(y), d))
    feats = (image[:, None, :] + 0.3 * rng.normal(size=(len(y), k, d))).astype(np.float16)
    fold = np.empty(len(y), np.int8)
    for j in range(c):
        idx = rng.permutation(np.flatnonzero(y == j))
        n_test = max(1, len(idx) // 5)
        fold[idx[:n_test]] = -1
        fold[idx[n_test:]] = np.arange(len(idx) - n_test) % folds
    return {"features": feats, "labels": y, "fold": fold, "class_names": [f"c{j}" for j in range(c)]}


def stage1_logits(data: dict, val_fold: int) -> np.ndarray:
    """A Stage-1 stand-in: plain (instance-weighted) logistic regression on the other CV folds."""
    x, y, fold = data["features"].astype(np.float32), data["labels"], data["fold"]
    train = (fold >= 0) & (fold != val_fold)
    lr = LogisticRegression(max_iter=500).fit(x[train].mean(1), y[train])
    return (x @ lr.coef_.T + lr.intercept_).astype(np.float32)


def write_cache(path, data: dict, logits=None, chunk_rows=32, complete=True, **override):
    """A cache per docs/ARCHITECTURE.md section 3, written with wbc.cache's writer API."""
    d = {**data, **override}
    n, k, dim = d["features"].shape
    c = len(d["class_names"])
    logits = np.zeros((n, k, c), np.float32) if logits is None else logits
    attrs = {"backbone": "synthetic", "checkpoint_sha256": CKPT, "store_content_id": STORE,
             "views": [f"v{i}" for i in range(k)], "class_names": d["class_names"]}
    g = create_cache(path, n, k, dim, c, attrs, chunk_rows=chunk_rows, labels=d["labels"],
                     fold=d["fold"], overwrite=True)
    for start in range(0, n, chunk_rows):
        write_rows(g, start, d["features"][start:start + chunk_rows], logits[start:start + chunk_rows])
        if not complete:
            break
    if complete:
        mark_complete(g)
    return path


def run_cli(*args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


FAST = ["--epochs", "30", "--batch-size", "64", "--lr", "1e-2", "--threads", "1"]


# -- head file and maths ---------------------------------------------------------------------
def _head(seed=0, c=4, d=6, **kw) -> Head:
    rng = np.random.default_rng(seed)
    return Head(rng.normal(size=(c, d)).astype(np.float32), rng.normal(size=c).astype(np.float32),
                [f"k{i}" for i in range(c)], **kw)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_probs_are_view_averaged_softmax_and_round_trip(tmp_path):
    head = _head(tau=0.7, logit_adjust=np.array([0.1, -0.2, 0.3, 0.0], np.float32),
                 cache={"cache_id": "x"}, config={"a": 1}, fold=2)
    feats = np.random.default_rng(1).normal(size=(9, 3, 6)).astype(np.float16)
    w = head.weight / np.linalg.norm(head.weight, axis=1, keepdims=True) ** 0.7
    z = feats.astype(np.float32) @ w.T + head.bias + head.logit_adjust
    expected = _softmax(z.astype(np.float64)).mean(1)  # softmax per view, then the mean over views
    np.testing.assert_allclose(head.predict_proba(feats), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(head.predict_proba(feats).sum(1), 1, rtol=1e-6)
    back = load_head(head.save(tmp_path / "f" / "head.pt"))
    assert (back.tau, back.fold, back.class_names, back.cache, back.config) == (0.7, 2, head.class_names,
                                                                                 {"cache_id": "x"}, {"a": 1})
    np.testing.assert_array_equal(back.weight, head.weight)
    np.testing.assert_allclose(back.predict_proba(feats), head.predict_proba(feats))
    d = torch.load(tmp_path / "f" / "head.pt", weights_only=True)
    assert d["format"] == "wbc.stage2/1" and d["weight"].shape == (4, 6) and d["bias"].shape == (4,)


def test_tau_normalisation_and_its_column_scale_shortcut():
    head = _head()
    np.testing.assert_allclose(tau_normalise(head.weight, 1.0).norm(dim=1), 1, rtol=1e-6)
    torch.testing.assert_close(tau_normalise(head.weight, 0.0), torch.from_numpy(head.weight))
    x = torch.randn(5, 3, 6)
    raw = x @ torch.from_numpy(head.weight).t()
    for tau in (0.0, 0.5, 1.3):
        explicit = x @ tau_normalise(head.weight, tau).t() + torch.from_numpy(head.bias)
        torch.testing.assert_close(tau_logits(raw, head.weight, head.bias, tau), explicit)


def test_prior_adjustment_is_minus_tau_log_prior():
    counts = np.array([80, 15, 5])
    np.testing.assert_allclose(prior_adjustment(counts, 2.0), -2 * np.log(counts / 100), rtol=1e-6)


def test_load_head_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(WbcError, match="head not found"):
        load_head(tmp_path / "nope.pt")
    torch.save({"format": "wbc.stage1/1"}, tmp_path / "s1.pt")
    with pytest.raises(WbcError, match="not a Stage-2 head"):
        load_head(tmp_path / "s1.pt")
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(WbcError, match="not a readable head"):
        load_head(tmp_path / "junk.pt")


# -- wbc crt ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fold_caches(tmp_path_factory):
    """One cache per fold, each with its own Stage-1 stand-in (like one backbone per fold)."""
    root = tmp_path_factory.mktemp("caches")
    data = long_tailed()
    for k in range(3):
        write_cache(root / f"fold{k}.zarr", data, stage1_logits(data, k))
    return root, data


def test_crt_raises_balanced_accuracy_over_stage1(fold_caches, tmp_path):
    root, data = fold_caches
    out = tmp_path / "heads"
    assert run_cli("crt", root / "fold{fold}.zarr", "--out", out, "--fold", "all", *FAST) == 0
    finals = [json.loads((out / f"fold{k}" / "metrics.jsonl").read_text().splitlines()[-1]) for k in range(3)]
    crt_bacc = np.mean([f["metrics"]["bacc"] for f in finals])
    s1_bacc = np.mean([f["stage1"]["bacc"] for f in finals])
    # measured 0.854 vs 0.788. The paper's recipe re-balances twice (class-balanced sampling AND
    # effective-number weights): with tails of <= 5 training rows it can fall below Stage 1 (seen
    # on other seeds with counts (300, 100, 40, 15, 8)), while cRT with plain CE beat Stage 1 in all.
    assert crt_bacc > s1_bacc + 0.03, (crt_bacc, s1_bacc)
    for k in range(3):
        head = load_head(out / f"fold{k}" / "head.pt")
        assert head.fold == k and head.cache["checkpoint_sha256"] == CKPT and head.config["val_fold"] == k
        assert head.predict_proba(data["features"][:7]).shape == (7, 5)
        epochs = [json.loads(x) for x in (out / f"fold{k}" / "metrics.jsonl").read_text().splitlines()[:-1]]
        assert [e["epoch"] for e in epochs] == list(range(1, len(epochs) + 1))
        assert finals[k]["best_epoch"] == max(epochs, key=lambda e: e["mf1"])["epoch"]
        config = yaml.safe_load((out / f"fold{k}" / "config.yaml").read_text())
        assert config["val_fold"] == k and config["loss"]["name"] == "cb_focal_hybrid"  # what was asked
        assert config["ran"]["device"] == "cpu" and config["ran"]["threads"] == 1  # and what ran
        assert config["ran"]["streamed"] is False and config["ran"]["dtype"] == "float32"


def test_crt_resumes_finished_folds_and_refuses_other_settings(fold_caches, tmp_path, caplog):
    root, _ = fold_caches
    out = tmp_path / "h"
    args = ["crt", root / "fold0.zarr", "--fold", "0", "--out", out, "--epochs", "3", "--threads", "1"]
    assert run_cli(*args) == 0
    stamp = (out / "fold0" / "head.pt").stat().st_mtime_ns
    assert run_cli(*args) == 0
    assert (out / "fold0" / "head.pt").stat().st_mtime_ns == stamp  # kept, not retrained
    assert run_cli(*args, "--gamma", "1") == 2
    assert run_cli(*args, "--gamma", "1", "--overwrite") == 0


def test_tau_auto_and_logit_adjustment_are_recorded(fold_caches, tmp_path):
    root, _ = fold_caches
    out = tmp_path / "t"
    assert run_cli("crt", root / "fold1.zarr", "--fold", "1", "--out", out, "--tau", "auto",
                   "--logit-adjust", "0.5", *FAST) == 0
    head = load_head(out / "fold1" / "head.pt")
    assert head.tau in [round(0.1 * i, 1) for i in range(21)]
    np.testing.assert_allclose(head.logit_adjust, prior_adjustment(np.bincount(
        long_tailed()["labels"][np.isin(long_tailed()["fold"], [0, 2])]), 0.5), rtol=1e-6)


@pytest.mark.parametrize("extra,msg", [(["--beta", "1"], "--beta"), (["--gamma", "-1"], "--gamma"),
                                       (["--lam", "2"], "--lam"), (["--fold", "7"], "out of range"),
                                       (["--tau", "x"], "--tau"), (["--loss", "nope"], "unknown loss")])
def test_crt_bad_options_exit_2(fold_caches, tmp_path, extra, msg, capsys):
    root, _ = fold_caches
    assert run_cli("crt", root / "fold0.zarr", "--fold", "0", "--out", tmp_path, "--epochs", "1", *extra) == 2
    assert msg in capsys.readouterr().err.replace("\n", " ")


def test_crt_bad_caches_exit_2(tmp_path, capsys):
    data = long_tailed(counts=(60, 20, 10), d=8)
    one_fold = write_cache(tmp_path / "one.zarr", data, fold=np.where(data["fold"] >= 0, 0, -1).astype(np.int8))
    no_tail = data["fold"].copy()
    no_tail[(data["labels"] == 2) & (no_tail > 0)] = 0  # class c2 only in fold 0 and the test set
    absent = write_cache(tmp_path / "absent.zarr", data, fold=no_tail)
    partial = write_cache(tmp_path / "partial.zarr", data, complete=False)
    for path, fold, msg in [(one_fold, "0", "no training fold"), (absent, "0", "no training row"),
                            (partial, "0", "incomplete"), (tmp_path / "missing.zarr", "0", "not found")]:
        assert run_cli("crt", path, "--fold", fold, "--out", tmp_path / "o", "--epochs", "1") == 2
        assert msg in capsys.readouterr().err.replace("\n", " ")


def test_crt_refuses_a_fold_the_backbone_trained_on(tmp_path, capsys):
    from wbc.cache import open_for_writing

    data = long_tailed(counts=(60, 20, 10), d=8)
    path = write_cache(tmp_path / "c.zarr", data)
    open_for_writing(path).attrs["checkpoint_fold"] = 1
    assert run_cli("crt", path, "--fold", "0", "--out", tmp_path / "o", "--epochs", "1") == 2
    assert "fold-1 Stage-1 backbone" in capsys.readouterr().err.replace("\n", " ")
    assert run_cli("crt", path, "--fold", "1", "--out", tmp_path / "o", "--epochs", "1", "--threads", "1") == 0


def test_metrics_from_confusion_equal_wbc_metrics():
    from wbc.metrics import confusion
    from wbc.stage2.validate import headline, headline_from_confusion

    rng = np.random.default_rng(0)
    y = rng.choice([0, 1, 3, 4], size=200)  # class 2 absent from the truth
    pred = np.where(rng.random(200) < 0.6, y, rng.integers(0, 5, 200))
    got = headline_from_confusion(confusion(y, pred, 5))
    assert got == pytest.approx(headline(y, pred, 5))
