"""The concentration clamp, `normalize_with_info`, legacy stores and the failure guards.

The reference is an independent numpy Macenko (float64) written from torchstain's algorithm:
OD, OD >= beta mask, covariance eigenvectors, nearest-rank angle percentiles, lstsq on the
image's own stain matrix, 99th-percentile scaling, the clamp, reconstruction and truncation.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchstain
from PIL import Image

from tests.fixtures import HE_DEFAULT, stained_image, write_image_folder
from wbc.errors import WbcError
from wbc.prepare import PrepareConfig, prepare_store
from wbc.stain import (
    StainError,
    StainNormalizer,
    StainParams,
    estimate_stain,
    normalise_like,
    try_normalize,
    try_normalize_with_info,
)
from wbc.store import open_store

HE_OTHER = np.stack([np.array([0.45, 0.80, 0.40]), np.array([0.15, 0.90, 0.40])], axis=1)
HE_OTHER = HE_OTHER / np.linalg.norm(HE_OTHER, axis=0)


def _nearest_rank(x: np.ndarray, q: float) -> float:
    """torchstain's percentile: the k-th smallest, k = 1 + round(q/100 * (n - 1))."""
    return float(np.sort(x)[round(0.01 * q * (len(x) - 1))])


def numpy_macenko(image, he_ref, max_ref, io=240, alpha=1, beta=0.15, clamp=True):
    """-> (out (H, W, 3) uint8, fraction of pixels with a negative H or E concentration)."""
    od = -np.log((image.reshape(-1, 3).astype(np.float64) + 1) / io)
    odhat = od[(od >= beta).all(axis=1)]
    _, vecs = np.linalg.eigh(np.cov(odhat.T))
    vecs = vecs[:, 1:3]
    that = odhat @ vecs
    phi = np.arctan2(that[:, 1], that[:, 0])
    v_min = vecs @ np.array([np.cos(_nearest_rank(phi, alpha)), np.sin(_nearest_rank(phi, alpha))])
    v_max = vecs @ np.array([np.cos(_nearest_rank(phi, 100 - alpha)), np.sin(_nearest_rank(phi, 100 - alpha))])
    he = np.stack([v_min, v_max], 1) if v_min[0] > v_max[0] else np.stack([v_max, v_min], 1)
    c = np.linalg.lstsq(he, od.T, rcond=None)[0]
    max_c = np.array([_nearest_rank(c[0], 99), _nearest_rank(c[1], 99)])
    negative = float((c < 0).any(axis=0).mean())
    if clamp:
        c = np.maximum(c, 0)
    c = c * (np.asarray(max_ref) / max_c)[:, None]
    out = np.minimum(io * np.exp(-np.asarray(he_ref) @ c), 255)
    return out.T.reshape(image.shape).astype(np.uint8), negative


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    template = stained_image(rng, 96, HE_DEFAULT, nucleus=0.2, hema=1.5, eosin=1.0)
    source = stained_image(rng, 80, HE_OTHER, nucleus=0.22, hema=0.9, eosin=1.4)
    # off the H-E plane: yellow-green debris, which unmixes to a negative concentration
    source[5:15, 5:25] = (120, 220, 60)
    return template, source


def _agree(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.abs(a.astype(int) - b.astype(int)) <= 1).all(axis=-1).mean())


def test_clamped_normalize_matches_numpy_reference(images):
    template, source = images
    norm = StainNormalizer.fit(template)
    assert norm.params.clamp  # on by default
    out, info = norm.normalize_with_info(source)
    want, negative = numpy_macenko(source, norm.stain_matrix, norm.max_conc, clamp=True)
    assert 0.05 < negative < 0.5  # the debris really unmixes negative
    assert info["clamped_fraction"] == pytest.approx(negative, abs=2e-3)
    # ~2% of stained pixels lie beyond the 1st/99th angle percentiles, hence negative by construction
    assert 0.01 < info["clamped_fraction_stained"] < info["clamped_fraction"]
    assert _agree(out, want) >= 0.999
    np.testing.assert_array_equal(out, norm.normalize(source))
    assert info["stained_pixels"] > 256 and info["stain_matrix"].shape == (3, 2)
    # the clamp matters exactly where concentrations were negative, and it removes the cyan/green cast
    unclamped, _ = numpy_macenko(source, norm.stain_matrix, norm.max_conc, clamp=False)
    assert _agree(unclamped, want) < 0.97
    # unclamped, the debris turns sky blue (negative eosin adds light); clamped it is a stain colour
    assert (unclamped[5:15, 5:25, 2].astype(int) - want[5:15, 5:25, 2] > 50).all()


def test_unclamped_is_torchstain_bit_for_bit(images):
    template, source = images
    norm = StainNormalizer.fit(template, StainParams(clamp=False))
    ts = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    ts.fit(torch.from_numpy(template).permute(2, 0, 1))
    want, _, _ = ts.normalize(torch.from_numpy(source).permute(2, 0, 1), stains=False)
    got, info = norm.normalize_with_info(source)
    np.testing.assert_array_equal(got, want.numpy().astype(np.uint8))
    assert info["clamped_fraction"] > 0.05  # reported even when the clamp is off
    ref, _ = numpy_macenko(source, norm.stain_matrix, norm.max_conc, clamp=False)
    assert _agree(got, ref) >= 0.999


def test_provenance_records_clamp_and_old_stores_stay_unclamped(images):
    template, source = images
    norm = StainNormalizer.fit(template)
    prov = {"stain": "macenko", **norm.to_dict()}
    assert prov["stain_params"]["clamp"] is True
    assert StainNormalizer.from_provenance(prov).params == norm.params
    old = {**prov, "stain_params": {"io": 240, "alpha": 1, "beta": 0.15, "min_stained_pixels": 256}}
    legacy = StainNormalizer.from_provenance(old)
    assert not legacy.params.clamp and legacy.params.min_od_std == 0 and legacy.params.min_he_angle_deg == 0
    out, ok = normalise_like(old, source)
    assert ok
    np.testing.assert_array_equal(out, StainNormalizer.fit(template, StainParams(clamp=False)).normalize(source))
    assert not np.array_equal(out, normalise_like(prov, source)[0])


def test_try_normalize_with_info(images):
    template, source = images
    norm = StainNormalizer.fit(template)
    out, ok, reason, info = try_normalize_with_info(norm, source)
    assert ok and reason == "" and info["clamped_fraction"] > 0
    blank = np.full((64, 64, 3), 236, np.uint8)
    out, ok, reason, info = try_normalize_with_info(norm, blank)
    assert out is blank and not ok and reason.startswith("too little stain") and info == {}


def _near_uniform(rng):
    return np.clip(128 + rng.normal(0, 2, (64, 64, 3)), 0, 255).astype(np.uint8)


BAD = {
    "blank": (lambda rng: np.full((64, 64, 3), 236, np.uint8), "too little stain"),
    "uniform grey": (lambda rng: np.full((64, 64, 3), 128, np.uint8), "near-uniform image"),
    "uniform dark": (lambda rng: np.full((64, 64, 3), 20, np.uint8), "near-uniform image"),
    "black": (lambda rng: np.zeros((64, 64, 3), np.uint8), "near-uniform image"),
    "near-uniform": (_near_uniform, "near-uniform image"),
    "grey noise": (lambda rng: np.repeat(rng.integers(0, 200, (64, 64, 1), dtype=np.uint8), 3, axis=2),
                   "Macenko gave a degenerate stain matrix"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_guards_flag_images_without_usable_stain(images, name):
    make, why = BAD[name]
    bad = make(np.random.default_rng(1))
    out, ok, reason = try_normalize(StainNormalizer.fit(images[0]), bad)
    assert not ok and out is bad and reason.startswith(why), reason
    with pytest.raises(StainError, match=why):
        estimate_stain(bad)


def test_real_looking_images_pass_the_guards(images):
    rng = np.random.default_rng(4)
    norm = StainNormalizer.fit(images[0])
    # Faint or small-nucleus cells are still cells. (HE_OTHER's eosin has OD 0.15 in red: below
    # ~1.3 its pixels fall under beta, only nuclei remain and H, E come out parallel: flagged.)
    for k in range(6):
        img = stained_image(rng, 96, HE_OTHER, nucleus=0.12 + 0.03 * k, hema=0.6 + 0.2 * k, eosin=1.3 + 0.1 * k)
        _, ok, reason = try_normalize(norm, img)
        assert ok, reason


def test_prepare_flags_uniform_images_and_refuses_degenerate_template(tmp_path):
    src = write_image_folder(tmp_path / "src", ("A", "B"), 3)
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(src / "B/grey.png")
    Image.fromarray(np.full((64, 64, 3), 20, np.uint8)).save(src / "B/dark.png")
    r = prepare_store(src, tmp_path / "s.h5", PrepareConfig(size=32, workers=0))
    s = open_store(r.out)
    note = dict(zip(s.paths, s.notes))
    ok = dict(zip(s.paths, s.stain_ok))
    for p in ("B/grey.png", "B/dark.png"):
        assert not ok[p] and note[p].startswith("near-uniform image")
    assert r.stain_failures == {"near-uniform image": 2} and s.provenance["stain_params"]["clamp"] is True
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(tmp_path / "black.png")
    with pytest.raises(WbcError, match="template .*black.png cannot be used: near-uniform image"):
        prepare_store(src, tmp_path / "t.h5", PrepareConfig(template=str(tmp_path / "black.png"), workers=0))


def _wbc(*args: str) -> subprocess.CompletedProcess:
    """The installed `wbc` script (next to this Python), with this environment (PYTHONPATH)."""
    exe = Path(sys.executable).parent / "wbc"
    return subprocess.run([str(exe), *args], check=False, capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)


def test_cli_refuses_uniform_grey_template_in_one_line(tmp_path):
    src = write_image_folder(tmp_path / "src", ("A", "B"), 2)
    Image.fromarray(np.full((40, 40, 3), 150, np.uint8)).save(tmp_path / "grey.png")
    r = _wbc("prepare", str(src), "--out", str(tmp_path / "s.h5"), "--template", str(tmp_path / "grey.png"),
             "--workers", "0", "--size", "32")
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "grey.png cannot be used: near-uniform image" in err
    assert "Traceback" not in r.stderr and not (tmp_path / "s.h5").exists()
