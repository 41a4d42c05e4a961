"""`wbc adapt` end to end on the tiny synthetic setup of tests/test_external.py: AdaBN touches only
BatchNorm buffers and never the source file, labels are never read, OOD scores rank foreign
images higher, bad input is one line and exit 2, and predict / evaluate --external take the
adapted file (through the installed `wbc` script)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures import stained_image
from tests.test_external import build_env, cell
from wbc.adapt import AdaptConfig, adapt
from wbc.adapt.bn import bn_layers, reestimate, view_batches
from wbc.adapt.bundle import load_adapted
from wbc.backbones import load_checkpoint
from wbc.config import file_sha256
from wbc.ensemble import load_ensemble
from wbc.errors import WbcError

WBC = str(Path(sys.executable).with_name("wbc"))
OTHER_HE = np.stack([np.array([0.3, 0.9, 0.3]) / np.linalg.norm([0.3, 0.9, 0.3]),
                     np.array([0.8, 0.2, 0.55]) / np.linalg.norm([0.8, 0.2, 0.55])], axis=1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("adapt"), members=1)


def target_set(root: Path, n: int = 20, size: int = 100, label: str = "LY", he=None) -> Path:
    """A CSV of target cells drawn larger in their frame than the training ones; labels given."""
    rng = np.random.default_rng(3)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        im = stained_image(rng, size=size, lobes=1 + i % 3, nucleus=0.3) if he is None else \
            stained_image(rng, size=size, he=he, nucleus=0.25)
        Image.fromarray(im).save(root / "img" / f"{i}.png")
        rows.append((f"img/{i}.png", label))
    with open(root / "target.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "label"), *rows])
    return root / "target.csv"


def run_wbc(*args, cwd=None):
    return subprocess.run([WBC, *map(str, args)], capture_output=True, text=True, cwd=cwd, check=False,
                          env={**os.environ, "WBC_NO_PROGRESS": "1", "COLUMNS": "400"})


def test_adabn_changes_only_bn_buffers_and_leaves_the_source_alone(env, tmp_path):
    target = target_set(tmp_path / "t")
    ckpt = env.members[0][0]
    before = file_sha256(ckpt)
    res = adapt(target, env.ensemble, tmp_path / "a" / "adapted.yaml", AdaptConfig(zoom="off", priors=False))
    assert file_sha256(ckpt) == before  # the source checkpoint is only read
    member = res.doc["members"][0]
    new_path = tmp_path / "a" / member["checkpoint"]
    assert new_path != ckpt and new_path.is_file()
    src = torch.load(ckpt, weights_only=False)["model"]
    new = torch.load(new_path, weights_only=False)
    assert new["adabn"]["source_sha256"] == before and new["adabn"]["n_images"] == 20
    model, _ = load_checkpoint(ckpt)
    buffers = {f"{n}.{b}" for n, m in model.named_modules() if m in bn_layers(model)
               for b in ("running_mean", "running_var", "num_batches_tracked")}
    changed = {k for k in src if not torch.equal(src[k], new["model"][k])}
    assert changed and changed <= buffers
    assert {f"{n}.running_mean" for n, m in model.named_modules() if m in bn_layers(model)} <= changed


def test_reestimating_on_source_training_images_barely_moves_predictions(env):
    """A model whose BN statistics come from the training images (as training leaves them),
    re-estimated on the same images in another order and batching, classifies the test images
    nearly as before. (A tiny random network amplifies any change, so this is a strict check.)"""
    model, meta = load_checkpoint(env.members[0][0])
    store, dc = env.store, meta["data_config"]
    folds = np.asarray(store.folds)
    train = np.flatnonzero(folds >= 0)
    test = np.flatnonzero(folds == -1)
    imgs = store.images(train)
    views = ["identity", "rot90", "hflip", "vflip"]
    reestimate(model, view_batches(imgs, dc, views, 4, torch.device("cpu")))
    x = next(iter(view_batches(store.images(test), dc, ["identity"], len(test), torch.device("cpu"))))
    with torch.no_grad():
        p0 = torch.softmax(model(x), 1)
        reestimate(model, view_batches(imgs[::-1].copy(), dc, views, 6, torch.device("cpu")))
        p1 = torch.softmax(model(x), 1)
    assert (p0.argmax(1) == p1.argmax(1)).float().mean() >= 0.8
    assert (p0 - p1).abs().mean() < 0.05


def test_labels_in_the_target_csv_are_never_read(env, tmp_path):
    a = target_set(tmp_path / "a", label="LY")
    b = tmp_path / "a" / "other.csv"
    rows = list(csv.reader(a.read_text().splitlines()))
    with open(b, "w", newline="") as f:  # same images, other (and nonsense) labels, extra column
        csv.writer(f).writerows([["label", "image", "note"], *[["???", r[0], "x"] for r in rows[1:]]])
    docs = []
    for src, name in ((a, "one"), (b, "two")):
        res = adapt(src, env.ensemble, tmp_path / name / "adapted.yaml", AdaptConfig(zoom="off"))
        docs.append(res)
    z = [np.load(tmp_path / n / r.doc["members"][0]["arrays"]) for n, r in zip(("one", "two"), docs)]
    for k in z[0].files:
        np.testing.assert_array_equal(z[0][k], z[1][k])
    assert docs[0].doc["target"]["id"] == docs[1].doc["target"]["id"]
    np.testing.assert_array_equal(docs[0].probs, docs[1].probs)


def test_adapted_file_round_trips_and_refuses_changed_files(env, tmp_path):
    target = target_set(tmp_path / "t")
    out = tmp_path / "ad" / "adapted.yaml"
    res = adapt(target, env.ensemble, out, AdaptConfig(zoom="1.5", align="coral", priors=True, prototypes="off"))
    ens, ad = load_adapted(out)
    assert ad.zoom == 1.5 and ad.priors is not None and ad.members[0].alignment.method == "coral"
    assert ad.review.coverage == 0.95
    steps = res.doc["steps"]
    assert steps["bn"]["enabled"] and steps["align"]["method"] == "coral"
    assert abs(sum(steps["priors"]["target"]) - 1) < 1e-3
    assert ens.members[0].checkpoint == (out.parent / res.doc["members"][0]["checkpoint"]).resolve() or \
        ens.members[0].checkpoint.name.endswith(".adabn.pt")
    arrays = out.parent / res.doc["members"][0]["arrays"]
    arrays.write_bytes(arrays.read_bytes() + b"x")
    from wbc.errors import WbcError

    with pytest.raises(WbcError, match="changed"):
        load_adapted(out)


def test_ood_score_is_higher_for_another_stain_and_shuffled_pixels(env, tmp_path):
    from wbc.adapt.apply import plain_adaptation, score_images

    ens = load_ensemble(env.ensemble)
    ad = plain_adaptation(ens)
    rng = np.random.default_rng(5)
    dirs = {k: tmp_path / k for k in ("same", "stain", "shuffled")}
    for d in dirs.values():
        d.mkdir()
    for i in range(12):
        im = cell(rng, i % 3)
        Image.fromarray(im).save(dirs["same"] / f"{i}.png")
        Image.fromarray(stained_image(rng, size=72, he=OTHER_HE, lobes=1 + i % 3)).save(dirs["stain"] / f"{i}.png")
        flat = im.reshape(-1, 3).copy()
        rng.shuffle(flat)
        Image.fromarray(flat.reshape(im.shape)).save(dirs["shuffled"] / f"{i}.png")
    ood = {k: score_images(ens, ad, sorted(d.glob("*.png")), 1.0, device="cpu").ood for k, d in dirs.items()}
    assert np.median(ood["stain"]) > np.median(ood["same"])
    assert np.median(ood["shuffled"]) > np.median(ood["same"])


@pytest.mark.parametrize("case", ["empty", "unreadable", "one", "bad-prototypes"])
def test_bad_target_is_one_line_and_exit_2(env, tmp_path, case):
    t = tmp_path / "t"
    t.mkdir()
    extra = []
    if case == "unreadable":
        for i in range(3):
            (t / f"{i}.png").write_bytes(b"not an image")
    if case == "one":
        Image.fromarray(cell(np.random.default_rng(0), 0)).save(t / "0.png")
    if case == "bad-prototypes":
        t = target_set(tmp_path / "t2")
        extra = ["--prototypes", "sometimes"]
    r = run_wbc("adapt", t, "--ensemble", env.ensemble, "--out", tmp_path / "a.yaml", *extra)
    assert r.returncode == 2, r.stderr
    err = (r.stdout + r.stderr).strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "a.yaml").exists()


def test_cli_adapt_then_predict_and_external(env, tmp_path):
    target = target_set(tmp_path / "t")
    out = tmp_path / "ad" / "adapted.yaml"
    r = run_wbc("adapt", target, "--ensemble", env.ensemble, "--out", out, "--zoom", "auto", "--device", "cpu")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "zoom:" in r.stdout + r.stderr and out.is_file()
    r = run_wbc("predict", tmp_path / "t" / "img", "--ensemble", out, "--out", tmp_path / "p.csv", "--device", "cpu")
    assert r.returncode == 0, r.stderr + r.stdout
    rows = list(csv.DictReader((tmp_path / "p.csv").read_text().splitlines()))
    assert len(rows) == 20 and {"confidence", "ood_score", "review"} <= set(rows[0])
    assert all(r["review"] in ("True", "False") and float(r["ood_score"]) >= 0 for r in rows)
    r = run_wbc("evaluate", "--ensemble", out, "--external", target, "--label-map", "A=LY",
                "--out", tmp_path / "rep", "--device", "cpu")
    assert r.returncode == 0, r.stderr + r.stdout
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "risk-coverage" in md and "Review flags" in md
    r = run_wbc("predict", tmp_path / "t" / "img", "--ensemble", env.ensemble, "--zoom", "auto",
                "--out", tmp_path / "q.csv", "--device", "cpu")
    assert r.returncode == 0, r.stderr + r.stdout


def test_adaptation_with_every_step_off_changes_nothing(env, tmp_path):
    """An ADAPTED.yaml with zoom, AdaBN, alignment and priors off predicts exactly as its ensemble."""
    from wbc.engine.evaluate.predict import predict

    target = target_set(tmp_path / "t")
    out = tmp_path / "off.yaml"
    adapt(target, env.ensemble, out, AdaptConfig(zoom="off", bn=False, align="none", priors=False, prototypes="off"))
    a = predict(tmp_path / "t" / "img", out, tmp_path / "a.csv", device="cpu")
    b = predict(tmp_path / "t" / "img", env.ensemble, tmp_path / "b.csv", device="cpu")
    np.testing.assert_array_equal(a.probs, b.probs)
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


@pytest.mark.parametrize("protos", ["off", "only", "blend"])
def test_predict_with_the_adapted_file_gives_what_adapt_computed(env, tmp_path, protos):
    """The probabilities adapt reports on its target equal predict's with the ADAPTED.yaml (all steps)."""
    from wbc.engine.evaluate.predict import predict

    target = target_set(tmp_path / "t")
    out = tmp_path / "ad.yaml"
    res = adapt(target, env.ensemble, out, AdaptConfig(zoom="0.8", align="coral", priors=True, prototypes=protos))
    assert res.doc["steps"]["shift"]["shifted"]  # a foreign stain: the guard lets every step run
    assert res.doc["steps"]["prototypes"]["enabled"] == (protos != "off")
    assert res.doc["steps"]["prototypes"]["mode"] == protos
    pred = predict(target, out, tmp_path / "p.csv", device="cpu")
    np.testing.assert_allclose(pred.probs, res.probs, atol=1e-5)


def test_prototype_blend_is_the_mean_of_head_and_prototype_probabilities(env, tmp_path):
    """--prototypes blend = (head probabilities + prototype probabilities) / 2, per cell, from the
    same AdaBN statistics and alignment (the runs share the seeded draw); rows still sum to 1."""
    target = target_set(tmp_path / "t", he=OTHER_HE)
    got = {}
    for mode in ("off", "only", "blend"):
        got[mode] = adapt(target, env.ensemble, tmp_path / mode / "a.yaml",
                          AdaptConfig(zoom="off", device="cpu", guard=False, prototypes=mode)).probs
    assert np.abs(got["only"] - got["off"]).max() > 1e-3  # the prototypes did act
    np.testing.assert_allclose(got["blend"], (got["off"] + got["only"]) / 2, atol=1e-5)
    np.testing.assert_allclose(got["blend"].sum(axis=1), 1.0, atol=1e-5)
    with pytest.raises(WbcError, match="--prototypes"):
        AdaptConfig(prototypes="sometimes")
    assert AdaptConfig(prototypes=True).prototypes == "only" and AdaptConfig(prototypes=False).prototypes == "off"


def _mf1s(records: list[dict]) -> dict:
    return {(r["degradation"], r["severity"]): r["mf1"] for r in records}


def test_robustness_of_an_adapted_file_without_steps_equals_the_plain_ensemble(env, tmp_path):
    """Through the installed script: an ADAPTED.yaml with every step off, scored through the image
    path, gives the cache path's figures for its source ensemble, point for point."""
    import json

    from wbc.engine.evaluate.config import RobustnessConfig
    from wbc.engine.evaluate.robustness import robustness

    target = target_set(tmp_path / "t")
    out = tmp_path / "ad.yaml"
    adapt(target, env.ensemble, out, AdaptConfig(zoom="off", bn=False, align="none", priors=False, prototypes="off", guard=False))
    r = run_wbc("robustness", env.store_path, "--ensemble", out, "--out", tmp_path / "rob",
                "--degradation", "gaussian_blur", "--degradation", "stain_jitter", "--severities", "2,4")
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads((tmp_path / "rob" / "robustness.json").read_text())
    assert got["adapted"] and all(row.endswith("(adapted)") for row in got["rows"])
    cfg = RobustnessConfig(degradations=("gaussian_blur", "stain_jitter"), severities=(2, 4), workers=0, device="cpu")
    plain = robustness(env.ensemble, env.store_path, tmp_path / "plain", cfg)
    assert _mf1s(got["records"]) == pytest.approx(_mf1s(plain.records), abs=1e-9)
    # The figures of a tiny random model are coarse: compare the probabilities themselves.
    from wbc.engine.evaluate import robustness as rb
    from wbc.engine.evaluate.robustness_adapted import adapted_probs

    (p,) = rb.plan_members(load_ensemble(env.ensemble), env.store, None)
    _, rows, _, views, cache_views = rb.choose_rows_and_views([p], cfg, env.store)
    groups = {k: rb.group_name(*k) for k in [("gaussian_blur", 2), ("stain_jitter", 4)]}
    want = rb._probs(p, rows, [cache_views.index(v) for v in views], groups)
    _, per, rows_a, _, _ = adapted_probs(out, env.store, ["gaussian_blur", "stain_jitter"], [2, 4], cfg)
    (got_p,) = per.values()
    assert np.array_equal(rows_a, rows)
    for k, v in want.items():
        np.testing.assert_allclose(got_p[k], v, atol=1e-5)


def test_robustness_of_an_adapted_file_scores_as_predict_does(env, tmp_path):
    """With AdaBN and alignment on, the clean test point equals `wbc predict ADAPTED.yaml` on the
    same test cells' source files (decoded and normalised afresh), and differs from the plain model."""
    from wbc.adapt.apply import load_for_scoring, score_images
    from wbc.engine.evaluate.config import RobustnessConfig
    from wbc.engine.evaluate.robustness_adapted import adapted_probs

    target = target_set(tmp_path / "t", he=OTHER_HE)
    out = tmp_path / "ad.yaml"
    res = adapt(target, env.ensemble, out, AdaptConfig(zoom="off", priors=False, guard=False))
    assert res.doc["steps"]["bn"]["enabled"] and res.doc["steps"]["align"]["enabled"]
    _, per, rows, _, _ = adapted_probs(out, env.store, ["gaussian_blur"], [3], RobustnessConfig(device="cpu"))
    (probs,) = per.values()
    files = [Path(env.store.paths[i]) for i in rows]
    files = [f if f.is_absolute() else env.images / f for f in files]
    ens_p, adaptation = load_for_scoring(out)
    want = score_images(ens_p, adaptation, files, zoom=1.0, device="cpu").probs
    np.testing.assert_allclose(probs["clean"], want, atol=1e-5)
    plain_ens, plain_ad = load_for_scoring(env.ensemble)
    plain = score_images(plain_ens, plain_ad, files, zoom=1.0, device="cpu").probs
    assert np.abs(plain - want).max() > 1e-3  # AdaBN and alignment did act
    assert probs[("gaussian_blur", 3)].shape == want.shape and not np.allclose(probs[("gaussian_blur", 3)], want)


def test_guard_skips_adabn_and_alignment_on_in_domain_cells(env, tmp_path):
    """The source's own images (the ones its store was prepared from) are not shifted: AdaBN,
    alignment, priors and prototypes are skipped and the probabilities are the plain ensemble's; --no-guard (guard=False) forces them. A foreign stain
    counts as shifted."""
    from wbc.engine.evaluate.predict import predict

    target = env.images
    res = adapt(target, env.ensemble, tmp_path / "g.yaml", AdaptConfig(zoom="off", device="cpu"))
    shift = res.doc["steps"]["shift"]
    assert shift["enabled"] and not shift["shifted"] and shift["share_beyond_val95"] <= shift["threshold"]
    assert not res.doc["steps"]["bn"]["enabled"] and res.doc["steps"]["align"]["method"] == "none"
    assert res.doc["config"]["bn"] and res.doc["config"]["align"] == "meanstd"  # what was asked
    plain = predict(target, env.ensemble, tmp_path / "p.csv", device="cpu")
    np.testing.assert_allclose(res.probs, plain.probs, atol=1e-5)
    asked = adapt(target, env.ensemble, tmp_path / "q.yaml", AdaptConfig(zoom="off", device="cpu", priors=True,
                                                                        prototypes=True))
    assert not asked.doc["steps"]["priors"]["enabled"] and not asked.doc["steps"]["prototypes"]["enabled"]
    assert asked.doc["config"]["priors"] and asked.doc["config"]["prototypes"]
    np.testing.assert_allclose(asked.probs, plain.probs, atol=1e-5)
    forced = adapt(target, env.ensemble, tmp_path / "f.yaml", AdaptConfig(zoom="off", device="cpu", guard=False))
    assert forced.doc["steps"]["bn"]["enabled"] and not forced.doc["steps"]["shift"]["enabled"]
    foreign = target_set(tmp_path / "t", he=OTHER_HE)
    res = adapt(foreign, env.ensemble, tmp_path / "x.yaml", AdaptConfig(zoom="off", device="cpu"))
    assert res.doc["steps"]["shift"]["shifted"] and res.doc["steps"]["bn"]["enabled"]


def test_adabn_with_the_source_mix_uses_the_weighted_draw(env, tmp_path):
    """--mix source: BatchNorm statistics of a weighted draw of the target cells (weights from the
    plain-AdaBN model's own predictions, to the training class mix); --mix none: of every cell once.
    Both recomputed here step by step from the library's pieces."""
    from wbc.adapt.mix import mix_weights, weighted_draw
    from wbc.adapt.pipeline import _prepared, load_target, target_paths
    from wbc.adapt.reference import member_reference
    from wbc.adapt.steps import embed_all, member_logits
    from wbc.ensemble import view_probs

    target = target_set(tmp_path / "t", he=OTHER_HE)
    ens = load_ensemble(env.ensemble)
    spec = ens.members[0]
    images, _, _, _ = load_target(target_paths(target), ens.provenance)
    x = _prepared(images, 1.0, int(ens.provenance["settings"]["size"]))
    per = max(2, min(32, 64 // len(ens.views)))

    def bn_means(path):
        m, _ = load_checkpoint(path)
        return torch.cat([b.running_mean for b in bn_layers(m)])

    def reest(index=None):
        m, meta = load_checkpoint(spec.checkpoint)
        reestimate(m, view_batches(x, meta["data_config"], ens.views, per, torch.device("cpu"), index))
        return m, meta

    for mix in ("none", "source"):
        out = tmp_path / mix / "a.yaml"
        res = adapt(target, env.ensemble, out, AdaptConfig(zoom="off", align="none", priors=False, guard=False,
                                                           mix=mix, device="cpu"))
        got = bn_means(out.parent / res.doc["members"][0]["checkpoint"])
        m, meta = reest()
        if mix == "source":
            feats = embed_all(m, meta, x, ens.views, torch.device("cpu"), 32)
            pred = view_probs(member_logits(spec, m, feats, torch.device("cpu"))).argmax(1)
            m, _ = reest(weighted_draw(mix_weights(pred, member_reference(spec).train_mix), 0))
            assert "mix_of_target" in res.doc["steps"]["bn"]["members"][0]
        want = torch.cat([b.running_mean for b in bn_layers(m)])
        torch.testing.assert_close(got, want)
        assert res.doc["steps"]["align"]["mix"] == mix
