"""Eval preprocessing, train augmentations and the store dataset."""

import numpy as np
import pytest
import torch

from wbc.data import AUGMENTS, crop_images, normalize, preprocess, resize_crop, train_transform
from wbc.errors import WbcError

CFG = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "input_size": [3, 32, 32], "resize": 48}


def _images(n=2, s=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, s, s, 3), dtype=np.uint8)


def test_preprocess_matches_numpy_reference_when_no_resize():
    imgs = _images()
    out = preprocess(imgs, CFG)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    crop = imgs[:, 8:40, 8:40, :].astype(np.float64) / 255.0  # centre 32 of 48
    ref = (crop - np.array(CFG["mean"])) / np.array(CFG["std"])
    np.testing.assert_allclose(out.permute(0, 2, 3, 1).numpy(), ref, atol=1e-5)


def test_resize_then_centre_crop_geometry():
    # A white square in the centre third survives resize + crop in the centre of the crop.
    img = np.zeros((1, 90, 90, 3), np.uint8)
    img[:, 30:60, 30:60] = 255
    x = crop_images(img, {"input_size": [3, 40, 40], "resize": 60})
    assert x.shape == (1, 3, 40, 40) and x.dtype == torch.uint8
    assert x[0, :, 20, 20].min() == 255 and x[0, :, 1, 1].max() == 0


def test_smaller_crop_keeps_ratio_and_accepts_tensors():
    imgs = torch.as_tensor(_images(3, 64))
    cfg = dict(CFG, input_size=[3, 24, 24], resize=36)
    assert preprocess(imgs, cfg).shape == (3, 3, 24, 24)


def test_normalize_is_per_channel():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(x, [0.5, 0.0, 1.0], [0.5, 1.0, 2.0])
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1.0, 1.0, 0.0]))


def test_resize_crop_skips_resize_at_same_size():
    x = torch.as_tensor(_images(1, 40)).permute(0, 3, 1, 2)
    torch.testing.assert_close(resize_crop(x, 40, 40), x)


def test_augment_registry():
    assert {"none", "randaugment"} <= set(AUGMENTS.names())
    x = torch.as_tensor(_images(1, 32)[0]).permute(2, 0, 1).contiguous()
    torch.testing.assert_close(train_transform("none")(x), x)
    torch.manual_seed(0)
    y = train_transform("randaugment")(x)
    assert y.shape == x.shape and y.dtype == torch.uint8
    with pytest.raises(WbcError, match="randaugment"):
        train_transform("mixup")


def test_zoom_image_shrinks_into_background_or_crops():
    from PIL import Image

    from wbc.sources import zoom_image

    rng = np.random.default_rng(0)
    img = np.full((40, 40, 3), (230, 200, 180), np.uint8)  # slide background
    img[10:30, 10:30] = rng.integers(0, 120, (20, 20, 3))  # the cell
    assert zoom_image(img, 1.0) is img
    out = zoom_image(img, 0.5)
    assert out.shape == img.shape
    small = np.asarray(Image.fromarray(img).resize((20, 20), Image.BICUBIC))
    assert np.array_equal(out[10:30, 10:30], small)  # content shrunk about the centre
    assert (out[:10] == (230, 200, 180)).all() and (out[:, 30:] == (230, 200, 180)).all()  # background fill
    big = np.asarray(Image.fromarray(img).resize((80, 80), Image.BICUBIC))
    assert np.array_equal(zoom_image(img, 2.0), big[20:60, 20:60])
