"""The numpy Macenko (`wbc.stain_np`, prepare's CPU path) against torchstain + clamp, the torch
batched normaliser and an independent float64 numpy reference; its order statistic; prepare's
per-thread chunk encoder; and `wbc prepare` on the CPU without importing torch."""

import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

from tests.fixtures import write_image_folder
from tests.test_stain_batch import _agree, stain_cases
from tests.test_stain_clamp import numpy_macenko
from wbc.stain import (
    StainError,
    StainNormalizer,
    StainParams,
    estimate_stain,
    try_normalize_with_info,
)
from wbc.stain_batch import BatchMacenko
from wbc.stain_np import NumpyMacenko, estimate, kth_smallest
from wbc.store import StoreWriter, encode_image


@pytest.fixture(scope="module")
def setup():
    return stain_cases()


def test_matches_torchstain_batched_and_float64_reference(setup):
    _, norm, images = setup
    nm = NumpyMacenko(norm.stain_matrix, norm.max_conc, norm.params)
    bm = BatchMacenko(norm.stain_matrix, norm.max_conc, norm.params)
    for im in images:
        got, info = nm.normalize_with_info(im)
        assert got.shape == im.shape and got.dtype == np.uint8
        ref, ref_info = norm.normalize_with_info(im)
        assert _agree(got, ref) >= 0.999
        assert _agree(got, numpy_macenko(im, norm.stain_matrix, norm.max_conc)[0]) >= 0.999
        assert _agree(got, bm.normalize(torch.from_numpy(im.copy())[None]).images[0].numpy()) >= 0.999
        assert info["stained_pixels"] == ref_info["stained_pixels"]
        assert info["clamped_fraction"] == pytest.approx(ref_info["clamped_fraction"], abs=1e-3)
        assert info["clamped_fraction_stained"] == pytest.approx(ref_info["clamped_fraction_stained"], abs=2e-3)
        np.testing.assert_allclose(info["stain_matrix"], ref_info["stain_matrix"], atol=1e-3)
        np.testing.assert_allclose(info["max_conc"], ref_info["max_conc"], rtol=1e-3)
    assert nm.normalize_with_info(images[2])[1]["clamped_fraction_stained"] > 0  # the debris


def test_unclamped_matches_plain_torchstain(setup):
    _, norm, images = setup
    plain = StainNormalizer(norm.stain_matrix, norm.max_conc, StainParams(clamp=False))
    nm = NumpyMacenko(norm.stain_matrix, norm.max_conc, StainParams(clamp=False))
    for im in images:
        assert _agree(nm.normalize(im), plain.normalize(im)) >= 0.999


def test_template_estimate_matches_torchstain(setup):
    template, norm, _ = setup
    he, max_c = estimate(template)
    assert he.dtype == np.float64 and he.shape == (3, 2) and max_c.shape == (2,)
    np.testing.assert_allclose(he, norm.stain_matrix, atol=1e-3)
    np.testing.assert_allclose(max_c, norm.max_conc, rtol=1e-3)


def test_flags_what_torchstain_flags(setup):
    _, norm, images = setup
    nm = NumpyMacenko(norm.stain_matrix, norm.max_conc, norm.params)
    rng = np.random.default_rng(2)
    bad = [np.full((60, 60, 3), 236, np.uint8),  # blank
           np.full((60, 60, 3), 128, np.uint8),  # uniform grey
           np.clip(60 + rng.normal(0, 2, (60, 60, 3)), 0, 255).astype(np.uint8),  # near-uniform dark
           np.repeat(rng.integers(0, 200, (60, 60, 1), dtype=np.uint8), 3, axis=2),  # grey noise
           images[0][:8, :8]]  # tiny
    for im in bad:
        _, ok, reason, _ = try_normalize_with_info(norm, im)
        with pytest.raises(StainError) as e:
            nm.normalize(im)
        assert not ok and reason.split(" (")[0] == str(e.value).split(" (")[0]
    with pytest.raises(StainError):
        estimate(bad[0])
    with pytest.raises(ValueError, match="uint8"):
        nm.normalize(images[0].astype(np.float32))


def test_batched_backend_on_cpu_is_numpy(setup):
    _, norm, images = setup
    nb = StainNormalizer(norm.stain_matrix, norm.max_conc, norm.params, backend="batched", device="cpu")
    nm = NumpyMacenko(norm.stain_matrix, norm.max_conc, norm.params)
    np.testing.assert_array_equal(nb.normalize(images[1]), nm.normalize(images[1]))  # what predict sees = the store


def test_kth_smallest_is_exact():
    rng = np.random.default_rng(3)
    cases = [rng.normal(size=n).astype(np.float32) for n in (1, 2, 17, 100, 5000, 130_000)]
    cases.append(rng.integers(0, 5, 20_000).astype(np.float32))  # ties
    tricky = rng.normal(size=40_000).astype(np.float32)
    tricky[::16] = 100.0  # the strided sample sees only the largest values: the fallback decides
    cases.append(tricky)
    for row in cases:
        for q in (0, 1, 50, 90, 99, 100):
            k = min(row.size - 1, round(0.01 * q * (row.size - 1)))
            assert kth_smallest(row, k) == np.partition(row, k)[k], (row.size, q)


def test_thread_encoder_writes_the_chunks_encode_image_writes(tmp_path):
    from wbc.prepare_batch import _ENCODER

    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), np.full((24, 24, 3), 200, np.uint8)]
    images.append(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))  # another size: a new dataset
    for im in images:
        for comp in ("zstd", "lzf", None):
            a, b = _ENCODER.encode(im, comp), encode_image(im, comp)
            assert (a.data, a.filter_mask, a.size, a.compression) == (b.data, b.filter_mask, b.size, b.compression)
    with StoreWriter(tmp_path / "s.h5", size=24, plan_id="p", compression="lzf") as w:  # written raw, read by h5py's filter
        w.append([_ENCODER.encode(im, "lzf") for im in images[:2]], [0, 1], ["a", "b"], [True] * 2,
                 [""] * 2, [""] * 2, ["x", "y"])
        w.commit(2)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        np.testing.assert_array_equal(f["images"][:], np.stack(images[:2]))
    assert _ENCODER.encode(images[0], "lzf").filter_mask == 1  # incompressible noise: stored raw


def test_prepare_on_cpu_never_imports_torch(tmp_path):
    src = write_image_folder(tmp_path / "src", ("A", "B"), 3, size=64)
    code = textwrap.dedent(f"""
        import sys
        import wbc.prepare as p
        from wbc.cli import main
        p._gpu_possible = lambda: False  # --device auto on a machine without a GPU
        main(["prepare", {str(src)!r}, "--out", {str(tmp_path / "s.h5")!r}, "--size", "32"])
        main(["prepare", {str(src)!r}, "--out", {str(tmp_path / "t.h5")!r}, "--size", "32",
              "--device", "cpu", "--template", {str(next((src / "A").iterdir()))!r}, "--workers", "0"])
        print("torch imported:", "torch" in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert r.returncode == 0, r.stderr
    assert "torch imported: False" in r.stdout
    from wbc.store import open_store

    s = open_store(tmp_path / "s.h5")
    assert len(s) == 6 and s.stain_ok.all() and s.provenance["settings"]["stain_backend"] == "batched"
    # the store holds what predict's preprocessing gives for the same file (same numpy path)
    from wbc.stain import preprocess_like_store

    np.testing.assert_array_equal(s.images([0])[0], preprocess_like_store(src / s.paths[0], s.provenance))


def test_prepare_device_without_torch(monkeypatch):
    import wbc.prepare as p

    monkeypatch.setattr(p, "_gpu_possible", lambda: False)
    assert p.prepare_device("auto") == "cpu" and p.prepare_device("cpu") == "cpu"
    monkeypatch.setattr(p, "_gpu_possible", lambda: True)  # then torch decides (here: no CUDA)
    assert p.prepare_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_estimate_matches_estimate_stain_on_a_second_image(setup):
    _, _, images = setup
    he, max_c = estimate(images[3])
    he_ref, max_ref = estimate_stain(images[3])
    np.testing.assert_allclose(he, he_ref, atol=1e-3)
    np.testing.assert_allclose(max_c, max_ref, rtol=1e-3)
