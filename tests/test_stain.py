"""Macenko normalisation must actually happen: shape, dtype, change, and re-estimated stains."""

import numpy as np
import pytest
import torch
import torchstain

from tests.fixtures import HE_DEFAULT, stained_image
from wbc.stain import (
    StainError,
    StainNormalizer,
    estimate_stain,
    medoid,
    normalise_like,
    stain_distance,
    try_normalize,
)

# A "scanner B" with bluer hematoxylin and pinker eosin than the template's.
HE_OTHER = np.stack([np.array([0.45, 0.80, 0.40]), np.array([0.15, 0.90, 0.40])], axis=1)
HE_OTHER = HE_OTHER / np.linalg.norm(HE_OTHER, axis=0)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    template = stained_image(rng, 96, HE_DEFAULT, nucleus=0.2, hema=1.5, eosin=1.0)
    source = stained_image(rng, 80, HE_OTHER, nucleus=0.22, hema=0.9, eosin=1.4)
    return template, source


def test_estimate_recovers_known_stain_vectors(images):
    template, source = images
    he, max_c = estimate_stain(template)
    assert he.shape == (3, 2) and max_c.shape == (2,)
    assert stain_distance(he, HE_DEFAULT) < 6
    assert stain_distance(estimate_stain(source)[0], HE_OTHER) < 6


def test_normalize_changes_image_onto_template(images):
    template, source = images
    norm = StainNormalizer.fit(template)
    out = norm.normalize(source)
    # HWC uint8 of the input's size (torchstain returns HWC int32; no CHW permute)
    assert out.shape == source.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - source.astype(int)).mean() > 5
    he_out, _ = estimate_stain(out)
    he_tpl, _ = estimate_stain(template)
    assert stain_distance(he_out, he_tpl) < 6
    assert stain_distance(he_out, HE_OTHER) > 3 * stain_distance(he_out, he_tpl)


def test_matches_numpy_reference(images):
    """Same result as torchstain's numpy backend (it interpolates percentiles, hence a tolerance)."""
    template, source = images
    ref = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    ref.fit(template)
    expected, _, _ = ref.normalize(source, stains=False)
    got = StainNormalizer.fit(template).normalize(source)
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 1.5


def test_raw_torchstain_output_is_hwc_int32(images):
    """The trap this module guards against: treating the output as CHW is wrong."""
    template, source = images
    n = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    n.fit(torch.from_numpy(template).permute(2, 0, 1))
    out, _, _ = n.normalize(torch.from_numpy(source).permute(2, 0, 1), stains=False)
    assert out.dtype == torch.int32 and tuple(out.shape) == source.shape


@pytest.mark.parametrize(
    "bad",
    [
        np.full((64, 64, 3), 235, np.uint8),  # blank background
        np.zeros((64, 64, 3), np.uint8),  # black
        np.full((4, 4, 3), 90, np.uint8),  # tiny
        np.dstack([np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)] * 3),  # gray
    ],
    ids=["blank", "black", "tiny", "grayscale"],
)
def test_failures_are_reported_not_raised(images, bad):
    norm = StainNormalizer.fit(images[0])
    out, ok, reason = try_normalize(norm, bad)
    if ok:  # grayscale noise can be "normalised"; it must then still be a valid image
        assert out.shape == bad.shape and out.dtype == np.uint8
    else:
        assert out is bad and reason
    with pytest.raises(StainError):
        estimate_stain(np.full((64, 64, 3), 235, np.uint8))


def test_few_stained_pixels_fail_clearly(images):
    img = np.full((64, 64, 3), 235, np.uint8)
    img[:5, :5] = images[0][40:45, 40:45]  # 25 stained pixels
    with pytest.raises(StainError, match="too little stain"):
        StainNormalizer.fit(images[0]).normalize(img)


def test_medoid_and_provenance_round_trip(images):
    template, source = images
    mats = np.abs(np.random.default_rng(3).normal(size=(7, 3, 2))) + 0.1
    totals = [sum(stain_distance(a, b) for b in mats) for a in mats]  # brute-force reference
    i, mean_d = medoid(mats)
    assert i == int(np.argmin(totals)) and mean_d == pytest.approx(min(totals) / 6)
    assert medoid([HE_DEFAULT, HE_OTHER, (HE_DEFAULT + HE_OTHER) / 2])[0] == 2
    norm = StainNormalizer.fit(template)
    prov = {"stain": "macenko", **norm.to_dict()}
    out, ok = normalise_like(prov, source)
    assert ok
    np.testing.assert_array_equal(out, norm.normalize(source))
    same, ok = normalise_like({"stain": "none"}, source)
    assert ok and same is source


def test_stained_pixel_count_matches_optical_density_definition(images):
    img = np.concatenate([images[0].reshape(-1, 3), np.arange(256, dtype=np.uint8).repeat(3).reshape(-1, 3)])
    od = -np.log((img.astype(np.float32) + 1) / 240)
    from wbc.stain import stained_pixels

    assert stained_pixels(img[:, None]) == int((od >= 0.15).all(axis=1).sum())
