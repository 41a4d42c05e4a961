"""Ensembles and Table 1 from synthetic caches: the maths against direct numpy references."""

from pathlib import Path

import numpy as np
import pytest

from tests.fixtures import cli_exit_code
from wbc.cache import create_cache, mark_complete, write_rows
from wbc.engine.evaluate.table1 import ModelSpec, evaluate_table, table_rows
from wbc.ensemble import Member, ensemble_probs, fit_temperature, member_output, softmax, view_probs
from wbc.errors import WbcError
from wbc.heads import Head
from wbc.metrics import classification_metrics
from wbc.report.rows import markdown_table, ranks
from wbc.report.table1 import write_report

CLASSES = ["A", "B", "C"]
N, K, D, C = 30, 4, 6, 3


def make_cache(path: Path, seed: int, sha: str = "ckpt", store_id: str = "store") -> Path:
    """A complete cache: rows 0-11 test (fold -1), the rest folds 0/1; features and logits random."""
    rng = np.random.default_rng(seed)
    labels = np.arange(N) % C
    fold = np.where(np.arange(N) < 12, -1, np.arange(N) % 2)
    attrs = {"backbone": "test", "checkpoint_sha256": sha, "store_content_id": store_id,
             "views": [f"v{k}" for k in range(K)], "class_names": CLASSES}
    g = create_cache(path, N, K, D, C, attrs, chunk_rows=8, labels=labels, fold=fold)
    feats = rng.normal(size=(N, K, D)).astype(np.float16)
    # Stage-1 logits lean towards the true class so metrics are not degenerate.
    logits = rng.normal(size=(N, K, C)).astype(np.float32) + 1.5 * np.eye(C)[labels][:, None, :]
    for a in range(0, N, 8):
        write_rows(g, a, feats[a:a + 8], logits[a:a + 8])
    mark_complete(g)
    return path


def make_head(path: Path, seed: int, sha: str = "ckpt") -> Path:
    rng = np.random.default_rng(seed)
    Head(rng.normal(size=(C, D)).astype(np.float32), rng.normal(size=C).astype(np.float32),
         CLASSES, cache={"checkpoint_sha256": sha}).save(path)
    return path


@pytest.fixture()
def caches(tmp_path):
    out = {}
    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        cs = tuple(make_cache(tmp_path / f"{name}{k}.zarr", 10 * seed + k) for k in range(2))
        hs = tuple(make_head(tmp_path / f"{name}{k}.pt", 10 * seed + k) for k in range(2))
        out[name] = ModelSpec(name, cs, hs)
    return out


def test_view_probs_is_mean_of_per_view_softmax():
    z = np.random.default_rng(0).normal(size=(5, 4, 3))
    ref = np.mean([softmax(z[:, k]) for k in range(4)], axis=0)
    np.testing.assert_allclose(view_probs(z), ref)


def test_member_output_matches_direct_computation(caches):
    spec = caches["a"]
    sup = member_output(Member(spec.caches[0]), (-1,))
    dec = member_output(Member(spec.caches[0], spec.heads[0]), (-1,))
    from wbc.cache import open_cache
    from wbc.heads import load_head

    cache = open_cache(spec.caches[0])
    rows = np.flatnonzero(cache.fold == -1)
    np.testing.assert_allclose(sup.logits, cache.read("stage1_logits", rows))
    h = load_head(spec.heads[0])
    ref = cache.read("features", rows).astype(np.float32) @ h.weight.T + h.bias
    np.testing.assert_allclose(dec.logits, ref, rtol=1e-5, atol=1e-5)


def test_ensemble_of_one_is_the_member(caches):
    out = member_output(Member(caches["a"].caches[0], caches["a"].heads[0]), (-1,))
    np.testing.assert_allclose(ensemble_probs([out]), view_probs(out.logits))


def test_table_rows_order_and_ensemble_scores(caches):
    models = [caches["a"], caches["b"], caches["c"]]
    names = [r[0] for r in table_rows(models)]
    assert names == ["Supervised a", "Supervised b", "Supervised c", "Decoupled a", "Decoupled b",
                     "Decoupled c", "Ensemble a+b", "Ensemble a+c", "Ensemble b+c", "Ensemble all (a+b+c)"]
    rows, classes = evaluate_table(models, [0, 1])
    assert classes == CLASSES
    # Reference for "Ensemble a+b" on fold 1: mean of the two members' view-averaged softmax.
    outs = [member_output(Member(m.caches[1], m.heads[1]), (-1,)) for m in models[:2]]
    p = np.mean([view_probs(o.logits) for o in outs], axis=0)
    ref = classification_metrics(outs[0].labels, p.argmax(1), C)
    row = next(r for r in rows if r.name == "Ensemble a+b")
    assert row.folds[1]["mf1"] == pytest.approx(ref["mf1"])
    assert row.folds[1]["bacc"] == pytest.approx(ref["bacc"])
    assert row.stat("mf1")[0] == pytest.approx(np.mean([f["mf1"] for f in row.folds]))
    assert row.confusion.sum() == 2 * 12  # two folds x 12 test rows


def test_members_with_different_classes_or_rows_are_refused(tmp_path, caches):
    other = make_cache(tmp_path / "x.zarr", 5)
    import zarr

    g = zarr.open_group(str(other), mode="r+")
    g["index"][:] = np.arange(N)[::-1]
    bad = ModelSpec("x", (other, other), ())
    with pytest.raises(WbcError, match="different image-store rows"):
        evaluate_table([ModelSpec("a", caches["a"].caches, ()), bad], [0, 1])


def test_stale_head_is_refused(tmp_path):
    cache = make_cache(tmp_path / "c.zarr", 0, sha="new")
    head = make_head(tmp_path / "h.pt", 0, sha="old")
    with pytest.raises(WbcError, match="retrain the head"):
        member_output(Member(cache, head), (-1,))


def test_temperature_recovers_a_known_scale():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 4000)
    true_logits = rng.normal(size=(4000, 1, 3)) + 2.0 * np.eye(3)[labels][:, None]
    # Sample labels from the true model, then present logits that are 3x over-confident.
    p = softmax(true_logits[:, 0])
    y = np.array([rng.choice(3, p=q) for q in p])
    t = fit_temperature(true_logits * 3.0, y)
    assert t == pytest.approx(3.0, rel=0.1)


def test_ranks_and_markdown_marks_best_and_second(caches):
    assert ranks([0.5, 0.9, 0.7, 0.9]) == [2, 0, 1, 0]
    assert ranks([0.1, 0.3, 0.2], lower_better=True) == [0, 2, 1]
    rows, _ = evaluate_table([caches["a"], caches["b"]], [0, 1])
    md = markdown_table(rows).splitlines()[2:]
    mf1 = [r.stat("mf1")[0] for r in rows]
    best, second = int(np.argmax(mf1)), int(np.argsort(mf1)[-2])
    mf1_cells = [line.split("|")[2].strip() for line in md]
    assert mf1_cells[best].startswith("**")
    assert mf1_cells[second].startswith("<u>") or mf1[second] == mf1[best]


def test_write_report_and_cli(tmp_path, caches):
    rows, classes = evaluate_table([caches["a"]], [0, 1], calibrate=True)
    paths = write_report(rows, classes, tmp_path / "rep", "t")
    assert all(p.exists() for p in paths.values())
    a = caches["a"]
    tmpl_c = str(a.caches[0]).replace("a0.zarr", "a{fold}.zarr")
    tmpl_h = str(a.heads[0]).replace("a0.pt", "a{fold}.pt")
    assert exit_code(["evaluate", "--model", f"a:{tmpl_c}:{tmpl_h}", "--folds", "0,1",
                      "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "report.json").exists()
    assert exit_code(["evaluate", "--model", "a:/nope/{fold}.zarr", "--folds", "0,1",
                      "--out", str(tmp_path / "x")]) == 2


exit_code = cli_exit_code
