"""HTML reports: opened in headless Chromium, confusion order and counts against the metrics, the
figure inside its canvas, Grad-CAM on a toy model, gallery order, the predictions page, `wbc report`."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.browser import page_status, screenshot
from tests.fixtures import make_tiny_store, tiny_checkpoint
from wbc import figures
from wbc.cache import open_cache
from wbc.engine.evaluate.table1 import ModelSpec, table_rows
from wbc.engine.extract.run import ExtractConfig, extract
from wbc.gallery import select_cells
from wbc.heads import Head
from wbc.metrics import classification_metrics, confusion
from wbc.saliency import grad_cam

CLASSES = ["SNE", "BA", "PMY", "LY"]  # deliberately not in lineage order
WBC = Path(sys.executable).parent / "wbc"


def wbc(*args, cwd=None) -> subprocess.CompletedProcess:
    """The installed console script in a subprocess (the environment passes PYTHONPATH through)."""
    env = {**os.environ, "WBC_NO_PROGRESS": "1"}
    return subprocess.run([str(WBC), *map(str, args)], check=False, capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("html")
    store_path = make_tiny_store(d / "store.h5", classes=CLASSES, n_per_class=8, size=64, folds=2)
    from wbc.store import open_store

    ckpt = tiny_checkpoint(d / "runs" / "test" / "fold0" / "best.pt", open_store(store_path), crop=48, resize=64)
    _jsonl(ckpt.parent / "metrics.jsonl", [{"epoch": e, "loss": 2.0 / e, "val_mf1": 0.2 * e} for e in (1, 2, 3)])
    extract(ckpt, store_path, d / "c0.zarr", ExtractConfig(workers=0, batch_size=8))
    attrs = open_cache(d / "c0.zarr").attrs
    for s in (0, 1):
        rng = np.random.default_rng(s)
        head = Head(rng.normal(size=(4, attrs["dim"])).astype(np.float32), rng.normal(size=4).astype(np.float32),
                    CLASSES, cache={"checkpoint_sha256": attrs["checkpoint_sha256"]})
        head.save(d / f"crt{s}" / "fold0" / "head.pt")
        _jsonl(d / f"crt{s}" / "fold0" / "metrics.jsonl", [{"epoch": e, "loss": 1.0 / e, "mf1": 0.3} for e in (1, 2)]
               + [{"final": True}])
    abl = d / "ablate"
    abl.mkdir()
    lines = ["loss,beta,gamma,lam,label,best,mf1_mean,mf1_std"]
    for i, (b, g, lam) in enumerate([(b, g, lam) for b in (0.99, 0.9999) for g in (1, 2) for lam in (0.5, 1)]):
        lines.append(f"cb_focal_hybrid,{b},{g},{lam},x,{int(i == 5)},{0.5 + 0.01 * i},0")
    (abl / "ablate.csv").write_text("\n".join(lines) + "\n")
    # Two models share one cache: their Supervised rows would be identical, so one is left out.
    r = wbc("evaluate", "--model", "a:c0.zarr:crt0/fold{fold}/head.pt", "--model", "b:c0.zarr:crt1/fold{fold}/head.pt",
            "--folds", "0", "--out", "rep", "--title", "Tiny held-out test", "--ablation", "ablate",
            "--device", "cpu", cwd=d)
    assert r.returncode == 0, r.stderr + r.stdout
    return SimpleNamespace(dir=d, out=d / "rep", stdout=r.stdout + r.stderr)


def test_evaluate_writes_a_self_contained_report(run, tmp_path):
    html = run.out / "report.html"
    assert "open in a browser" in run.stdout and html.is_file()
    text = html.read_text()
    assert "Tiny held-out test" in text and "n per class: PMY 2, SNE 2, LY 2, BA 2" in text
    assert f"image store {run.dir / 'store.h5'}" in (run.out / "report.md").read_text()
    assert "http://" not in text and "https://" not in text  # nothing fetched from the network
    assert text.count("<img ") >= 2 * 8 + 5  # 8 gallery cells + Grad-CAM each, 5 figures (curves, ablation...)
    assert "Loss ablation" in text and "beta=0.9999 gamma=1 lambda=1" in text
    assert re.search(r"right: Grad-CAM for the predicted class \([ab] fold 0( with its cRT head)?\)", text)
    doc = json.loads((run.out / "report.json").read_text())
    assert [r["name"] for r in doc["rows"]] == ["Supervised a", "Decoupled a", "Decoupled b", "Ensemble a+b"]
    assert page_status(html) == f"ok images={text.count('<img ')}"
    png = screenshot(html, tmp_path / "shot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_confusion_order_and_counts_equal_the_metrics(run):
    doc = json.loads((run.out / "report.json").read_text())
    with np.load(run.out / "report.npz", allow_pickle=False) as z:
        probs, labels = z["probs"], z["labels"]
    for i, row in enumerate(doc["rows"]):
        cm = sum(confusion(labels, p.argmax(1), len(CLASSES)) for p in probs[i])
        np.testing.assert_array_equal(cm, row["confusion"])
        assert classification_metrics(labels, probs[i][0].argmax(1), 4)["mf1"] == pytest.approx(row["mf1"]["mean"])
    cm = np.arange(16).reshape(4, 4)
    fig = figures.confusion_figure(cm, CLASSES, "t", "n = 120")
    ax = fig.axes[0]
    order = [CLASSES.index(c) for c in ("PMY", "SNE", "LY", "BA")]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["PMY", "SNE", "LY", "BA"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["PMY", "SNE", "LY", "BA"]
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    for i, a in enumerate(order):
        for j, b in enumerate(order):
            assert cells.get((i, j), "0") == str(cm[a, b])


def test_confusion_figure_lies_inside_its_canvas():
    names = ["PMY", "MY", "MMY", "BNE", "SNE", "LY", "MO", "EO", "BA", "a long class name"]
    cm = np.random.default_rng(0).integers(0, 500, (10, 10))
    fig = figures.confusion_figure(cm, names, "A long report title: held-out test", "Ensemble all: n = 900, Macro-F1 78.4")
    assert figures.tight_bbox_inside(fig)
    assert len(fig.axes) == 4  # two matrices, two colour bars
    assert "Macro-F1 78.4" in fig._suptitle.get_text()


def test_lineage_order_keeps_unknown_classes_last():
    names = ["BA", "X", "SNE", "PMY", "EO", "Y", "MY"]
    assert [names[i] for i in figures.lineage_order(names)] == ["PMY", "MY", "SNE", "EO", "BA", "X", "Y"]


class QuadrantModel(torch.nn.Module):
    """A toy 'backbone' whose logit depends only on one quadrant of the image."""

    num_features = 3

    def __init__(self, quadrant: tuple[int, int]):
        super().__init__()
        self.q = quadrant
        self.classifier = torch.nn.Linear(3, 2)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]))
            self.classifier.bias.zero_()

    def forward_features(self, x):
        f = torch.nn.functional.avg_pool2d(x, 4)  # (B, 3, 8, 8): the map keeps the layout
        mask = torch.zeros_like(f)
        h, (qy, qx) = f.shape[-1] // 2, self.q
        mask[..., qy * h:(qy + 1) * h, qx * h:(qx + 1) * h] = 1
        return f * mask  # the model sees one quadrant only

    def forward_head(self, f, pre_logits=False):
        emb = f.mean((2, 3))  # global average pooling, as timm's CNN heads
        return emb if pre_logits else self.classifier(emb)

    def get_classifier(self):
        return self.classifier


@pytest.mark.parametrize("quadrant", [(0, 0), (1, 1), (0, 1)])
def test_grad_cam_peaks_in_the_quadrant_the_logit_reads(quadrant):
    x = torch.rand(2, 3, 32, 32) + 0.1
    cam = grad_cam(QuadrantModel(quadrant), x, np.array([0, 0]))
    assert cam.shape == (2, 32, 32) and cam.max() == pytest.approx(1.0)
    qy, qx = quadrant
    for m in cam:
        y, xx = np.unravel_index(m.argmax(), m.shape)
        assert (y // 16, xx // 16) == quadrant
        inside = m[qy * 16:(qy + 1) * 16, qx * 16:(qx + 1) * 16].sum()
        assert inside / m.sum() > 0.85
    # Class 1's weights are negative: no positive evidence anywhere, an all-zero map.
    assert grad_cam(QuadrantModel(quadrant), x, np.array([1, 1])).max() == 0


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet", "test_convnext"])
def test_forward_only_cam_equals_autograd_grad_cam(name):
    """Global-average pooling then a linear map: Grad-CAM's weights are W_c / (h w), so the
    forward-only CAM is the same map. ConvNeXt norms the pooled embedding: autograd is kept."""
    import timm

    from wbc.saliency import _linear_readout

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5).eval()
    x = torch.randn(6, 3, 64, 64)
    target = np.array([0, 1, 2, 3, 4, 0])
    head = (torch.randn(5, model.num_features), torch.randn(5))
    with torch.no_grad():
        nchw = model.forward_features(x)
    gap_linear = name != "test_convnext"
    assert (_linear_readout(model, nchw, False, None) is not None) == gap_linear
    for h in (None, head):
        fast, ref = grad_cam(model, x, target, h), grad_cam(model, x, target, h, allow_cam=False)
        assert fast.shape == (6, 64, 64) and ref.max() == pytest.approx(1.0)
        np.testing.assert_allclose(fast, ref, atol=2e-5)


def test_gallery_shows_misclassified_first_then_least_confident():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55], [0.7, 0.3], [0.1, 0.9]])
    labels = np.array([0, 0, 0, 0, 1, 1])
    groups = select_cells(probs, labels, np.arange(6) + 100, ["A", "B"], per_class=3)
    assert [c.pos for c in groups[0]] == [2, 3, 1]  # wrong (0.8 then 0.55), then least confident right
    assert [c.row for c in groups[1]] == [104, 105]
    assert groups[0][0].pred == 1 and groups[0][0].p_pred == pytest.approx(0.8)


def test_identical_rows_are_left_out(tmp_path):
    a = ModelSpec("a", (tmp_path / "c.zarr",), (tmp_path / "h1.pt",))
    b = ModelSpec("b", (tmp_path / "c.zarr",), (tmp_path / "h2.pt",))
    c = ModelSpec("c", (tmp_path / "c.zarr",), (tmp_path / "h1.pt",))
    names = [r[0] for r in table_rows([a, b, c])]
    assert names == ["Supervised a", "Decoupled a", "Decoupled b", "Ensemble a+b", "Ensemble all (a+b+c)"]


def _predictions(path: Path, review: bool) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = ["image,predicted,prob_SNE,prob_PMY" + (",confidence,ood_score,review" if review else "")]
    for i, (p, flag) in enumerate([(0.9, 0), (0.55, 0), (0.7, 1), (0.2, 0)]):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path.parent / f"c{i}.png")
        pred = "SNE" if p >= 0.5 else "PMY"
        extra = f",{max(p, 1 - p):.2f},0.1,{'true' if flag else 'false'}" if review else ""
        lines.append(f"c{i}.png,{pred},{p},{1 - p:.2f}{extra}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("review", [False, True])
def test_predictions_page_counts_and_order(tmp_path, review):
    from wbc.predict_report import render_predictions

    html = render_predictions(_predictions(tmp_path / "P.csv", review), labels={str(tmp_path / "c1.png"): "PMY"})
    text = html.read_text()
    assert html == tmp_path / "P.html"
    assert "<td>SNE</td><td>3</td><td>75.0</td>" in text and "<td>PMY</td><td>1</td><td>25.0</td>" in text
    assert "width:225px" in text  # the count bar: 75% of 300 px
    sne = text[text.index("SNE: 3 cells"):]
    want = ["c2.png", "c1.png", "c0.png"] if review else ["c1.png", "c2.png", "c0.png"]  # flagged first
    assert [sne.index(f'alt="{w}"') for w in want] == sorted(sne.index(f'alt="{w}"') for w in want)
    assert "label <b>PMY</b>" in text and "1 cells have a known class" in text
    assert page_status(html) == "ok images=4"


def test_wbc_report_rerenders_and_refuses_bad_input(run, tmp_path):
    out = tmp_path / "again.html"
    r = wbc("report", run.out, "--out", out, "--gallery", "2", "--no-saliency", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "store row" in out.read_text() and "Grad-CAM of cell" not in out.read_text()
    assert "saliency maps left out (--no-saliency)" in out.read_text()
    r = wbc("report", run.dir / "runs" / "test")
    assert r.returncode == 0 and (run.dir / "runs" / "test" / "run.html").is_file()
    r = wbc("report", tmp_path / "nothing-here")
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    assert "not an evaluate report folder" in " ".join((r.stdout + r.stderr).split())  # rich wraps lines
    r = wbc("evaluate", "--model", "a:c0.zarr", "--folds", "0", "--out", tmp_path / "x", "--ablation", tmp_path,
            cwd=run.dir)
    assert r.returncode == 2 and "no ablate.csv there" in " ".join((r.stdout + r.stderr).split())
    assert not (tmp_path / "x").exists()  # refused before anything is computed or written


def test_external_report_names_its_set_and_shows_a_member_once(tmp_path):
    from tests.test_external import build_env, write_external
    from wbc.ensemble import save_ensemble

    env = build_env(tmp_path / "e", members=1)
    (ckpt, _, head), = env.members
    ens = save_ensemble([f"{ckpt}:{head}"] * 2, env.store_path, "d4", tmp_path / "twice.yaml")
    manifest = write_external(tmp_path / "jtsc", ["X"] * 4 + ["C"] * 2, broken=False)
    r = wbc("evaluate", "--ensemble", ens, "--external", manifest, "--label-map", "A=X,B=X", "--out",
            tmp_path / "rep", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [row["name"] for row in doc["rows"]] == ["test-fold0"]  # not twice, and no equal 'ensemble' row
    assert doc["title"] == "External set jtsc/manifest.csv (6 images)"
    html = tmp_path / "rep" / "report.html"
    assert "External set jtsc/manifest.csv" in html.read_text() and page_status(html).startswith("ok images=")


def test_reliability_bins_are_the_metrics_ece():
    from wbc.metrics import expected_calibration_error

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4) * 0.5, 500)
    labels = rng.integers(0, 4, 500)
    acc, conf, count = figures.reliability_curve(probs, labels)
    ok = count > 0
    ece = float((count[ok] / count.sum() * np.abs(acc[ok] - conf[ok])).sum())
    assert ece == pytest.approx(expected_calibration_error(probs, labels))
    chart = figures.reliability_chart({"m": (probs, labels)}, "t")
    assert f">m (ECE {100 * ece:.1f})</text>" in chart
    ok_points = chart.count("<circle ")
    assert ok_points == int(ok.sum())  # one marker per non-empty bin


def test_wbc_report_of_a_predictions_csv_shows_the_source_labels(tmp_path):
    csv_path = _predictions(tmp_path / "P.csv", review=False)
    (tmp_path / "src.csv").write_text("image,label\n" + "".join(f"c{i}.png,PMY\n" for i in range(4)))
    r = wbc("report", csv_path, "--source", tmp_path / "src.csv", "--out", tmp_path / "x.html")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "x.html").read_text()
    assert text.count("label <b>PMY</b>") == 4 and "4 cells have a known class (label): 1 predicted" in text


def test_recorded_relative_paths_are_found_above_the_cache(tmp_path, monkeypatch):
    from wbc.report_html import locate

    (tmp_path / "lab" / "cache" / "images").mkdir(parents=True)
    (tmp_path / "lab" / "cache" / "images" / "s.h5").write_bytes(b"x")
    cache = tmp_path / "lab" / "cache" / "features" / "c.zarr"
    monkeypatch.chdir(tmp_path)  # extraction ran in lab/, the report is made elsewhere
    assert locate("cache/images/s.h5", cache) == (tmp_path / "lab" / "cache" / "images" / "s.h5").resolve()
    assert locate("cache/images/missing.h5", cache) is None and locate(None, cache) is None


def test_ablation_heat_map_fills_cells_that_are_the_same_loss(tmp_path):
    """`wbc ablate` trains CB-CE once (gamma 0 or lam 0); its heat map still fills those cells."""
    from wbc.report_html import ablation_html

    lines = ["loss,beta,gamma,lam,label,best,mf1_mean,mf1_std",
             "cb_focal_hybrid,0.99,0.0,0.0,x,0,0.40,0", "cb_focal_hybrid,0.99,2.0,0.5,x,1,0.60,0",
             "cb_focal_hybrid,0.99,2.0,1.0,x,0,0.50,0"]
    (tmp_path / "ablate.csv").write_text("\n".join(lines) + "\n")
    captured = []
    real = figures.ablation_chart
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(figures, "ablation_chart", lambda rows, title: captured.extend(rows) or real(rows, title))
        assert "<img" in ablation_html(str(tmp_path))
    same = {(r["gamma"], r["lam"]): r["mf1"] for r in captured if r.get("same")}
    assert same == {(0.0, 0.5): 0.40, (0.0, 1.0): 0.40, (2.0, 0.0): 0.40}
    assert sum(r["best"] for r in captured) == 1
