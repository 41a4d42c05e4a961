"""Degradations: identity at severity 0, distortion growing with severity, what each one changes."""

import itertools
import random

import numpy as np
import pytest
import torchstain
from PIL import Image
from scipy import ndimage
from skimage import data

from wbc import degrade as dg
from wbc.errors import WbcError

DEGRADED = [n for n in dg.names() if n != "none"]


def synthetic_he(seed: int, size: int = 192) -> np.ndarray:
    """Cells made by mixing the H and E stain vectors in OD space: (size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    basis = dg.stain_basis()
    yy, xx = np.mgrid[:size, :size]
    ch = np.zeros((size, size))
    ce = np.zeros((size, size))
    for _ in range(6):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(size / 10, size / 5)
        dist = np.hypot(yy - cy, xx - cx)
        ce += 0.8 * (dist < r)
        ch += 1.2 * (dist < 0.55 * r) * (1 + 0.3 * np.sin(xx / 3 + yy / 5))
    tex = 0.5 * ndimage.gaussian_filter(rng.standard_normal((2, size, size)), (0, 1.5, 1.5))
    ch = np.clip(ch * (1 + tex[0]), 0, None)
    ce = np.clip(ce * (1 + tex[1]), 0, None)
    od = ch[..., None] * basis[0] + ce[..., None] * basis[1] + 0.03
    return np.clip(np.rint(256 * np.exp(-od) - 1), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images():
    natural = [data.astronaut()[::2, ::2], data.coffee()[::2, ::2], data.chelsea()]
    return [synthetic_he(s) for s in range(3)] + [np.ascontiguousarray(im) for im in natural]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("name", dg.names())
def test_severity_zero_is_identity(name, images):
    for seed, im in enumerate(images):
        out = dg.degrade(name, im, 0, seed)
        assert out.dtype == np.uint8 and np.array_equal(out, im)
        assert out is not im  # a copy: callers may write into it


@pytest.mark.parametrize("name", DEGRADED)
def test_psnr_falls_strictly_with_severity(name, images):
    mean_psnr = [
        np.mean([psnr(im, dg.degrade(name, im, sev, seed)) for im in images for seed in (0, 1)])
        for sev in range(1, 5)
    ]
    assert all(np.isfinite(mean_psnr)), mean_psnr  # severity 1 already changes the image
    assert all(a > b for a, b in itertools.pairwise(mean_psnr)), mean_psnr


@pytest.mark.parametrize("name", DEGRADED)
def test_deterministic_per_seed_and_different_across_seeds(name, images):
    im = images[0]
    first = dg.degrade(name, im, 3, seed=7)
    assert first.shape == im.shape and first.dtype == np.uint8
    assert np.array_equal(first, dg.degrade(name, im, 3, seed=7))
    others = [dg.degrade(name, im, 3, seed=s) for s in (8, 9, 10)]
    assert any(not np.array_equal(first, o) for o in others)


def test_batch_matches_per_image(images):
    batch = np.stack([im[:96, :96] for im in images])
    seeds = np.arange(len(batch)) + 100
    out = dg.degrade_batch("stain_jitter", batch, 2, seeds)
    for i in range(len(batch)):
        assert np.array_equal(out[i], dg.degrade("stain_jitter", batch[i], 2, int(seeds[i])))
    with pytest.raises(ValueError):
        dg.degrade_batch("jpeg", batch, 2, seeds[:-1])


def test_unknown_name_and_bad_severity(images):
    with pytest.raises(WbcError, match="unknown degradation 'fog'.*gaussian_noise.*stain_jitter"):
        dg.degrade("fog", images[0], 1, 0)
    for bad in (5, -1, 1.5):
        with pytest.raises(WbcError, match="severity"):
            dg.degrade("jpeg", images[0], bad, 0)
    with pytest.raises(WbcError, match="unknown degradation"):
        dg.RandomDegradation(choices=["fog"])


def macenko_fit(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torchstain's numpy Macenko estimate: HE (3, 2) stain OD vectors, maxC (2,) 99th pct."""
    norm = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    norm.fit(image)
    return norm.HERef, norm.maxCRef


def max_angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    cos = np.sum(a * b, 0) / np.linalg.norm(a, axis=0) / np.linalg.norm(b, axis=0)
    return float(np.degrees(np.arccos(np.clip(cos, -1, 1))).max())


def test_stain_jitter_moves_the_macenko_stain_estimate(images):
    def shifts(sev):
        angles, conc = [], []
        for im in images[:3]:
            he0, max0 = macenko_fit(im)
            for seed in range(3):
                he1, max1 = macenko_fit(dg.degrade("stain_jitter", im, sev, seed))
                angles.append(max_angle_deg(he0, he1))
                conc.append(np.abs(max1 / max0 - 1).max())
        return np.mean(angles), np.mean(conc)

    (angle1, conc1), (angle4, conc4) = shifts(1), shifts(4)
    # Measured: stain vectors turn ~0.17 deg (severity 1) and ~1.1 deg (severity 4), through the
    # concentration shift beta; the 99th-percentile concentrations move ~4% and ~24% (alpha).
    assert angle4 > 0.8 and angle4 > 3 * angle1, (angle1, angle4)
    assert conc4 > 0.15 and conc4 > 3 * conc1, (conc1, conc4)


def test_stain_jitter_uses_the_given_stain_matrix(images):
    im = images[0]
    other = np.array([[0.65, 0.27], [0.70, 0.80], [0.29, 0.53]])
    a = dg.degrade("stain_jitter", im, 4, 0)
    b = dg.degrade("stain_jitter", im, 4, 0, stain_matrix=other)
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        dg.degrade("stain_jitter", im, 4, 0, stain_matrix=np.eye(3))


@pytest.mark.parametrize("severity", [1, 2, 3, 4])
def test_gaussian_noise_keeps_the_mean_colour(severity, images):
    sigma = dg.NOISE_SIGMA[severity - 1]
    tested = 0
    for seed, im in enumerate(images):
        out = dg.degrade("gaussian_noise", im, severity, seed).astype(np.float64)
        # Pixels at least 3 sigma from 0 and 255 are (almost) never clipped, so zero-mean noise
        # leaves their mean colour unchanged up to sampling error: tolerance = 0.25 grey levels
        # (rounding) + 4 standard errors of the mean noise.
        safe = np.all((im >= 3 * sigma) & (im <= 255 - 3 * sigma), axis=2)
        if safe.sum() < 2000:
            continue
        tested += 1
        shift = np.abs(out[safe].mean(0) - im[safe].mean(0))
        assert shift.max() < 0.25 + 4 * sigma / np.sqrt(safe.sum()), shift
        if severity <= 2:  # whole image, clipping included: within 1 grey level
            whole = np.abs(out.reshape(-1, 3).mean(0) - im.reshape(-1, 3).mean(0))
            assert whole.max() < 1.0, whole
    assert tested >= 2


def test_blur_scales_with_image_size():
    im = synthetic_he(0, size=368)
    small = np.asarray(Image.fromarray(im).resize((184, 184), Image.BILINEAR))
    # The same physical blur: degrading then downsizing ~ downsizing then degrading.
    a = np.asarray(
        Image.fromarray(dg.degrade("gaussian_blur", im, 4, 0)).resize((184, 184), Image.BILINEAR)
    )
    b = dg.degrade("gaussian_blur", small, 4, 0)
    assert psnr(a, b) > 35


def test_random_degradation_and_transform(images):
    im = images[0]
    a = dg.random_degradation(im, np.random.default_rng(3))
    assert np.array_equal(a, dg.random_degradation(im, np.random.default_rng(3)))
    assert not np.array_equal(a, im)  # never 'none', never severity 0
    only = dg.random_degradation(im, np.random.default_rng(3), choices=["jpeg"])
    assert psnr(im, only) < 40
    with pytest.raises(WbcError):
        dg.random_degradation(im, np.random.default_rng(3), choices=["none"])

    t = dg.RandomDegradation(p=1.0)
    random.seed(0)
    out1 = t(Image.fromarray(im))
    random.seed(0)
    out2 = t(Image.fromarray(im))
    assert isinstance(out1, Image.Image) and np.array_equal(np.asarray(out1), np.asarray(out2))
    assert np.array_equal(dg.RandomDegradation(p=0.0)(im), im)


def test_describe_is_the_docstring_table():
    table = dg.describe()
    assert table in dg.__doc__
    for name in dg.names():
        assert f"`{name}`" in table
    assert "| 70 | 40 | 20 | 10 |" in table  # JPEG qualities from the constants
