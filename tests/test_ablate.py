"""The batched grid trainer equals training each head alone; streaming; `wbc ablate` tables."""

import csv
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_heads import long_tailed, run_cli, write_cache
from wbc.cache import open_cache
from wbc.cache_split import StreamedRows
from wbc.engine.stage2.ablate import grid_specs, head_path
from wbc.losses import LOSSES, LossSpec
from wbc.report.ablate import AblateRow, write_tables
from wbc.stage2 import HeadConfig
from wbc.stage2.trainer import fit_heads

CFG = HeadConfig(epochs=12, batch_size=32, lr=1e-2, patience=3, seed=3)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """A cache in 16-row blocks; `.data` holds the arrays it was written from."""
    d = long_tailed(counts=(120, 50, 20, 9), k=3, d=12, seed=4)
    cache = open_cache(write_cache(tmp_path_factory.mktemp("grid") / "c.zarr", d, chunk_rows=16))
    cache.data = d
    return cache


def _fit(table, specs, stream=False, cfg=CFG):
    split = table.split(0)
    source = split.source(memory_bytes=3 * 16 * 3 * 12 * 2, stream=stream)
    return fit_heads(source, split.y_train, split.y_val, specs, cfg, 4, 12)


@pytest.mark.parametrize("stream", [False, True])
def test_grid_heads_equal_heads_trained_alone(table, stream):
    specs = grid_specs(["cb_focal_hybrid"], [0.9, 0.999], [0.0, 2.0], [0.0, 1.0]) + [
        LossSpec("ce"), LossSpec("logit_adjusted"), LossSpec("balanced_softmax")]
    grid = _fit(table, specs, stream)
    stops = {len(f.history) for f in grid}
    assert len(stops) > 1, "heads should stop at different epochs to exercise per-head early stopping"
    for spec, g in zip(specs, grid):
        (alone,) = _fit(table, [spec], stream)
        assert g.best_epoch == alone.best_epoch and len(g.history) == len(alone.history), spec.label()
        np.testing.assert_allclose(g.weight, alone.weight, rtol=1e-4, atol=1e-5, err_msg=spec.label())
        np.testing.assert_allclose(g.bias, alone.bias, rtol=1e-4, atol=1e-5, err_msg=spec.label())
        assert [h["mf1"] for h in g.history] == pytest.approx([h["mf1"] for h in alone.history])


def test_streamed_epoch_serves_exactly_the_draws_with_bounded_window(table):
    split = table.split(0)
    train, val, features = split.train, split.val, table.data["features"]
    block_bytes = 16 * 3 * 12 * 2
    src = StreamedRows(split, memory_bytes=2 * block_bytes + 1)
    assert src.window_blocks == 2 and src.resident_bytes <= 2 * block_bytes + 1
    rng = np.random.default_rng(0)
    rows = rng.integers(len(train), size=3 * len(train))
    views = rng.integers(3, size=len(rows))
    seen, sizes = [], []
    for x, pos in src.batches(rows, views, 32, np.random.default_rng(1)):
        expected = features[train[rows[pos]], views[pos]].astype(np.float32)
        np.testing.assert_array_equal(x.numpy(), expected)
        seen.append(pos)
        sizes.append(len(pos))
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(len(rows)))
    assert all(s == 32 for s in sizes[:-1])  # full batches except the epoch's last
    got = np.concatenate([x.numpy() for _, x in src.val_chunks()])
    order = np.concatenate([sel for sel, _ in src.val_chunks()])
    np.testing.assert_array_equal(got[np.argsort(order)], features[val].astype(np.float32))


def _reference_losses(spec: LossSpec, z: np.ndarray, y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-sample loss written from each loss's paper, by name (not through the family's point).
    z: (B, C) float64 logits; y: (B,) -> (B,)."""
    n = counts.astype(np.float64)

    def cb(beta):  # Cui et al. 2019: (1 - beta) / (1 - beta^n), normalised to sum to C
        w = (1 - beta) / (1 - beta ** n) if beta else np.ones_like(n)
        return w * len(n) / w.sum()

    def ce_and_p(shift=0.0):
        s = z + shift
        logp = s - s.max(1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
        lp = logp[np.arange(len(y)), y]
        return -lp, np.exp(lp)

    ce, p = ce_and_p()
    prior = np.log(n / n.sum())
    return {
        "ce": lambda: ce,
        "cb_ce": lambda: cb(spec.beta)[y] * ce,
        "focal": lambda: (1 - p) ** spec.gamma * ce,
        "cb_focal_hybrid": lambda: cb(spec.beta)[y] * ce * ((1 - spec.lam) + spec.lam * (1 - p) ** spec.gamma),
        "logit_adjusted": lambda: ce_and_p(spec.la_tau * prior)[0],  # Menon et al. 2021
        "balanced_softmax": lambda: ce_and_p(np.log(n))[0],  # Ren et al. 2020
    }[spec.name]()


def _cli_default(name: str) -> str:
    import inspect

    from wbc.cli.heads import ablate

    return inspect.signature(ablate).parameters[name].default


@pytest.mark.parametrize("losses", [None, list(LOSSES.names())])
def test_grid_keeps_one_of_each_distinct_loss(losses):
    """`wbc ablate`'s default grid (and one over every loss): no two kept specs are the same loss
    on random logits, and every dropped spec equals a kept one (so no distinct loss was lost)."""
    floats = {k: [float(v) for v in _cli_default(k).split(",")] for k in ("beta", "gamma", "lam")}
    names = losses or [_cli_default("loss")]
    if losses:
        floats["beta"].insert(0, 0.0)  # beta 0: uniform weights, so cb_ce = ce, hybrid lam=1 = focal
    everything = [LossSpec(n, b, g, lam) for n, b, g, lam in itertools.product(
        names, floats["beta"], floats["gamma"], floats["lam"])]
    kept = grid_specs(names, floats["beta"], floats["gamma"], floats["lam"])
    counts = np.array([300, 80, 20, 6, 2])
    rng = np.random.default_rng(0)
    z, y = rng.normal(0, 3, (256, len(counts))), rng.integers(0, len(counts), 256)
    ref = {s: _reference_losses(s, z, y, counts) for s in everything}
    for i, a in enumerate(kept):
        for b in kept[i + 1:]:
            assert not np.allclose(ref[a], ref[b], rtol=1e-6, atol=1e-9), (a.label(), b.label())
    for s in everything:
        same = [k for k in kept if np.allclose(ref[s], ref[k], rtol=1e-9, atol=1e-12)]
        assert len(same) == 1, s.label()
        assert same[0].key() == s.key()
    if not losses:  # 3 betas x (CB-CE + 2 gammas x 2 lams): 15 of the 27 points
        assert len(everything) == 27 and len(kept) == 15


def test_grid_specs_keep_the_first_spelling_of_a_loss():
    assert [s.label() for s in grid_specs(["ce", "cb_ce"], [0.9, 0.99], [0, 2], [0.5])] == [
        "ce", "cb_ce beta=0.9", "cb_ce beta=0.99"]
    specs = grid_specs(["cb_focal_hybrid", "focal", "balanced_softmax", "logit_adjusted"], [0.0], [0, 2], [0, 1])
    assert [s.label() for s in specs] == [
        "cb_focal_hybrid beta=0 gamma=0 lam=0", "cb_focal_hybrid beta=0 gamma=2 lam=1", "balanced_softmax"]


def test_ablate_cli_tables_best_marked_and_resume(tmp_path, capsys):
    d = long_tailed(counts=(120, 50, 20, 9), k=3, d=12, seed=5)
    cache = write_cache(tmp_path / "c.zarr", d, chunk_rows=16)
    out = tmp_path / "ab"
    args = ["ablate", cache, "--out", out, "--beta", "0.9,0.999", "--gamma", "0,2", "--lam", "0,1",
            "--epochs", "8", "--batch-size", "32", "--lr", "1e-2", "--threads", "1"]
    assert run_cli(*args) == 0
    rows = list(csv.DictReader((out / "ablate.csv").open()))
    assert len(rows) == 4 and sum(int(r["best"]) for r in rows) == 1  # 2 betas x (CB-CE, CB-focal gamma 2)
    best = max(rows, key=lambda r: float(r["mf1_mean"]))
    assert best["best"] == "1"
    assert all(len(r["best_epochs"].split()) == 3 for r in rows)  # one per fold
    md = (out / "ablate.md").read_text()
    assert md.count("| * ") == 1 and "±" in md and best["label"] in md
    assert "Loss ablation" in capsys.readouterr().err
    stamps = {p: p.stat().st_mtime_ns for p in (out / "folds").iterdir()}
    assert run_cli(*args) == 0  # every fold is reused
    assert {p: p.stat().st_mtime_ns for p in (out / "folds").iterdir()} == stamps
    asked = (out / "config.yaml").read_bytes()
    assert run_cli(*args[:-2], "--lam", "0.5") == 2  # another grid into the same --out ...
    assert (out / "config.yaml").read_bytes() == asked  # ... is refused before anything is rewritten
    import yaml

    config = yaml.safe_load(asked)
    assert config["train"]["epochs"] == 8 and config["specs"][0] == "cb_focal_hybrid beta=0.9 gamma=0 lam=0"
    assert {f["device"] for f in config["ran"].values()} == {"cpu"} and len(config["ran"]) == 3
    assert run_cli("ablate", cache, "--out", tmp_path / "x", "--beta", "0.9,1.2") == 2


def test_crt_with_the_best_rows_loss_is_ablates_best_head(tmp_path):
    """What `make demo` relies on: cRT trained with ablate.csv's best row equals the head the
    ablation saved for that row (same loss, settings and seed; grid heads = heads alone)."""
    from wbc.heads import Head

    d = long_tailed(counts=(120, 50, 20, 9), k=3, d=12, seed=6)
    cache = write_cache(tmp_path / "c.zarr", d, chunk_rows=16)
    fast = ["--epochs", "8", "--batch-size", "32", "--lr", "1e-2", "--threads", "1", "--fold", "0"]
    assert run_cli("ablate", cache, "--out", tmp_path / "ab", "--beta", "0.9,0.999", "--gamma", "0,1,2",
                   "--lam", "0.5,1", "--save-heads", *fast) == 0
    best = next(r for r in csv.DictReader((tmp_path / "ab" / "ablate.csv").open()) if r["best"] == "1")
    assert run_cli("crt", cache, "--out", tmp_path / "crt", "--loss", best["loss"], "--beta", best["beta"],
                   "--gamma", best["gamma"], "--lam", best["lam"], *fast) == 0
    grid, alone = Head.load(head_path(tmp_path / "ab", best["label"], 0)), Head.load(tmp_path / "crt" / "fold0" / "head.pt")
    assert grid.label == alone.label == best["label"]
    np.testing.assert_allclose(grid.weight, alone.weight, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grid.bias, alone.bias, rtol=1e-4, atol=1e-5)
    assert grid.tau == alone.tau
    other = next(r for r in csv.DictReader((tmp_path / "ab" / "ablate.csv").open()) if r["best"] == "0")
    assert not np.allclose(Head.load(head_path(tmp_path / "ab", other["label"], 0)).weight, alone.weight, atol=1e-3)
    # tools/same_head.py (the demo's check) agrees, and refuses another loss's head
    assert run_cli("crt", cache, "--out", tmp_path / "crt2", "--loss", other["loss"], "--beta", other["beta"],
                   "--gamma", other["gamma"], "--lam", other["lam"], *fast) == 0
    tool = [sys.executable, str(Path(__file__).parents[1] / "tools" / "same_head.py"), str(tmp_path / "ab"), "0"]
    ok = subprocess.run([*tool, str(tmp_path / "crt" / "fold0" / "head.pt")], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and " is the ablation's best head" in ok.stdout
    bad = subprocess.run([*tool, str(tmp_path / "crt2" / "fold0" / "head.pt")], capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and "is NOT" in bad.stdout


def test_ablate_md_bolds_each_columns_best_not_the_mf1_best_row(tmp_path):
    ms = lambda mf1, bacc: {"mf1": (mf1, 0.0), "bacc": (bacc, 0.0), "mp": (0.5, 0.0), "mspec": (0.9, 0.0)}
    rows = [AblateRow("a", LossSpec("ce"), ms(0.7, 0.6), [], best=True), AblateRow("b", LossSpec("ce"), ms(0.6, 0.8), [])]
    md = write_tables(rows, tmp_path, [0])["md"].read_text().splitlines()
    a, b = (next(line for line in md if line.startswith(f"| {p}")) for p in ("* a", "b"))
    assert "**70.00 ± 0.00**" in a and "| 60.00 ± 0.00 |" in a  # a: best MF1, not best BAcc
    assert "**80.00 ± 0.00**" in b and "| 60.00 ± 0.00 |" in b
    assert a.count("**50.00") == b.count("**50.00") == 1  # a tie is bold in both rows


@pytest.mark.parametrize("fused", [True, False])
def test_written_out_adamw_matches_torch_adamw(fused):
    import torch

    from wbc.stage2.batched_loss import StackedLoss
    from wbc.stage2.trainer import _Fused

    g = torch.Generator().manual_seed(0)
    w0, b0 = torch.randn(4, 12, generator=g), torch.randn(4, generator=g)
    cfg = HeadConfig(weight_decay=0.05)
    ours = _Fused(w0, b0, 1, cfg, fused=fused)
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = torch.optim.AdamW([w, b], lr=0.1, weight_decay=0.05)
    loss = StackedLoss.build([LossSpec()], np.array([50, 20, 5, 2]))
    from wbc.stage2.batched_loss import head_losses

    for step in range(5):
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)
        lr = 0.1 / (step + 1)
        ours.step(x, y, loss, lr)
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        head_losses((x @ w.t() + b)[:, None, :], y, loss).sum().backward()
        opt.step()
    torch.testing.assert_close(ours.w[:4], w.detach())  # rows 4..15 are GEMM padding
    torch.testing.assert_close(ours.b[:4], b.detach())
    assert not ours.w[4:].any() and not ours.b[4:].any()


def test_fold_lists_pick_those_folds_and_bad_folds_exit_cleanly(tmp_path):
    from wbc.engine.stage2.crt import FoldCaches

    d = long_tailed(counts=(120, 50, 20, 9), k=3, d=12, seed=6)
    cache = write_cache(tmp_path / "c.zarr", d, chunk_rows=16)
    assert FoldCaches(cache, "all", 1.0).folds == [0, 1, 2]
    assert FoldCaches(cache, "2,0,2", 1.0).folds == [2, 0] and FoldCaches(cache, 1, 1.0).folds == [1]
    out = tmp_path / "ab"
    args = ["ablate", cache, "--out", out, "--beta", "0.9", "--gamma", "0", "--lam", "0",
            "--epochs", "2", "--batch-size", "32", "--threads", "1"]
    assert run_cli(*args, "--fold", "0,2") == 0
    assert sorted(p.name for p in (out / "folds").iterdir()) == ["fold0.json", "fold2.json"]
    for bad in ("5", "0,x", "-1", ""):
        assert run_cli(*args, "--fold", bad, "--overwrite") == 2
