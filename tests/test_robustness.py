"""`wbc robustness`: degraded test features extracted once into the members' caches, then scored."""

import csv
import json

import numpy as np
import pytest

import wbc.embed as embed_mod
from tests.test_external import build_env, exit_code
from wbc.backbones import load_checkpoint
from wbc.cache import cache_info, open_cache
from wbc.degrade import degrade_batch
from wbc.embed import embed_views
from wbc.engine.evaluate.robustness import (
    RobustnessConfig,
    group_name,
    robustness,
    stratified_subset,
)
from wbc.ensemble import Member, member_output, save_ensemble, view_probs
from wbc.errors import WbcError
from wbc.metrics import classification_metrics

CFG = RobustnessConfig(degradations=("gaussian_noise", "stain_jitter"), severities=(2,), workers=0,
                       device="cpu")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("robustness"))


@pytest.fixture()
def forwards(monkeypatch):
    """Counts the backbone forward passes of extraction."""
    calls = []
    real = embed_mod.forward_views

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(embed_mod, "forward_views", counted)
    return calls


def test_degraded_features_are_extracted_once_then_read_back(env, tmp_path, forwards):
    first = robustness(env.ensemble, env.store_path, tmp_path / "r1", CFG)
    assert len(first.extracted) == 4 and not first.reused  # 2 members x 2 degradations x 1 severity
    assert len(forwards) > 0
    forwards.clear()
    second = robustness(env.ensemble, env.store_path, tmp_path / "r2", CFG)
    assert forwards == [] and not second.extracted and len(second.reused) == 4
    assert second.records == first.records
    # A new Stage-2 head on the same caches reuses the degraded features too.
    (c0, k0, _), (c1, k1, h1) = env.members
    new_head = env.dir / "head-new.pt"
    from tests.test_external import random_head

    random_head(new_head, k0, seed=42)
    ens2 = save_ensemble([f"{c0}:{new_head}", f"{c1}:{h1}"], env.store_path, "d4", tmp_path / "e2.yaml",
                         caches=[k0, k1])
    third = robustness(ens2, env.store_path, tmp_path / "r3", CFG)
    assert forwards == [] and len(third.reused) == 4
    info = cache_info(k0)
    assert {"degraded.gaussian_noise.2", "degraded.stain_jitter.2"} <= set(info["variants"])


def test_degraded_features_equal_a_direct_forward_on_degraded_images(env, tmp_path):
    robustness(env.ensemble, env.store_path, tmp_path / "r", CFG)
    ckpt, cache, _ = env.members[0]
    g = open_cache(cache, group="degraded.stain_jitter.2")
    rows = g.index.astype(np.int64)
    assert np.array_equal(rows, np.sort(np.flatnonzero(env.store.folds == -1)))
    he = np.asarray(env.store.provenance["stain_matrix"])
    images = degrade_batch("stain_jitter", env.store.images(rows), 2, rows, stain_matrix=he)
    model, meta = load_checkpoint(ckpt)
    feats, _ = embed_views(model, images, meta["data_config"], g.views)
    got = g.read("features").astype(np.float32)
    err = np.linalg.norm(got - feats) / np.linalg.norm(feats)  # fp16 storage only
    main = open_cache(cache)
    assert np.array_equal(main.index, np.arange(len(env.store)))  # cache row = store row
    change = np.linalg.norm(main.read("features", rows).astype(np.float32) - feats) / np.linalg.norm(feats)
    assert err < 2e-3 and change > 10 * err


def test_report_files_and_clean_point(env, tmp_path):
    res = robustness(env.ensemble, env.store_path, tmp_path / "r", CFG)
    assert res.rows == ["test-fold0", "test-fold1", "Ensemble (2 members)"]
    for k in ("md", "json", "csv", "png"):
        assert res.paths[k].exists() and res.paths[k].stat().st_size > 0
    with open(res.paths["csv"]) as f:
        assert len(list(csv.DictReader(f))) == 3 * 2 * 2  # rows x degradations x severities {0, 2}
    # Severity 0 = the clean test rows from the main cache, for every degradation line.
    _, cache, head = env.members[0]
    out = member_output(Member(cache, head), (-1,))
    order = np.argsort(out.index)
    ref = classification_metrics(out.labels[order], view_probs(out.logits[order]).argmax(1), 3)
    clean = [r for r in res.records if r["row"] == "test-fold0" and r["severity"] == 0]
    assert len(clean) == 2 and all(r["mf1"] == pytest.approx(ref["mf1"]) for r in clean)
    md = res.paths["md"].read_text()
    assert "## Ensemble (2 members) (MF1 / BAcc)" in md and "| stain_jitter |" in md
    doc = json.loads(res.paths["json"].read_text())
    assert doc["severities"] == [0, 2] and len(doc["summary"]) == 3


def test_subset_and_views_get_their_own_groups(env, tmp_path):
    cfg = RobustnessConfig(degradations=("jpeg",), severities=(4,), max_images=3, views="identity,rot90",
                           workers=0, device="cpu")
    res = robustness(env.ensemble, env.store_path, tmp_path / "r", cfg)
    (name,) = {t.split(": ")[1] for t in res.extracted}
    assert name.startswith(group_name("jpeg", 4) + ".") and len(name) == len("degraded.jpeg.4.") + 8
    g = open_cache(env.members[0][1], group=name)
    assert len(g) == 3 and g.views == ["identity", "rot90"]
    assert all(r["n"] == 3 for r in res.records)


def test_stratified_subset():
    rows = np.arange(100, 200)
    labels = np.array([0] * 70 + [1] * 25 + [2] * 5)
    pick = stratified_subset(rows, labels, 20, seed=0)
    counts = np.bincount(labels[pick - 100], minlength=3)
    assert len(pick) == 20 and list(counts) == [14, 5, 1] and np.all(np.diff(pick) > 0)
    assert np.array_equal(pick, stratified_subset(rows, labels, 20, seed=0))
    assert not np.array_equal(pick, stratified_subset(rows, labels, 20, seed=1))
    small = stratified_subset(rows, np.array([0] * 98 + [1, 2]), 3, seed=0)
    assert sorted(np.array([0] * 98 + [1, 2])[small - 100]) == [0, 1, 2]  # every class kept
    assert np.array_equal(stratified_subset(rows, labels, 0, 0), rows)


def test_bad_input(env, tmp_path, capsys):
    with pytest.raises(WbcError, match="unknown degradation 'fog'; choose from none, gaussian_noise"):
        robustness(env.ensemble, env.store_path, tmp_path / "r", RobustnessConfig(degradations=("fog",)))
    with pytest.raises(WbcError, match="severities must be"):
        robustness(env.ensemble, env.store_path, tmp_path / "r", RobustnessConfig(severities=(5,)))
    plain = save_ensemble([str(env.members[0][0])], env.store_path, "d4", tmp_path / "p.yaml")
    with pytest.raises(WbcError, match="has no feature cache"):
        robustness(plain, env.store_path, tmp_path / "r", CFG)
    with pytest.raises(WbcError, match="unknown view 'bogus'"):
        robustness(env.ensemble, env.store_path, tmp_path / "r", RobustnessConfig(views="identity,bogus"))
    code = exit_code(["robustness", str(env.store_path), "--ensemble", str(env.ensemble),
                      "--degradation", "fog", "--out", str(tmp_path / "r")])
    assert code == 2 and "gaussian_noise" in capsys.readouterr().err


def test_cli(env, tmp_path):
    out = tmp_path / "cli"
    assert exit_code(["robustness", str(env.store_path), "--ensemble", str(env.ensemble),
                      "--degradation", "gaussian_blur", "--severities", "1,3", "--views", "identity",
                      "--workers", "0", "--device", "cpu", "--out", str(out)]) == 0
    assert (out / "robustness.png").exists() and (out / "robustness.md").exists()
