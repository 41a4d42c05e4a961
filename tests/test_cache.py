"""Feature cache layout, writer and provenance-checked reader, on synthetic arrays."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from wbc.cache import (
    cache_info,
    create_cache,
    default_chunk_rows,
    done_blocks,
    mark_complete,
    open_cache,
    open_for_writing,
    write_rows,
)
from wbc.errors import WbcError

N, K, D, C, R = 10, 3, 5, 4, 4
CKPT, STORE = "a" * 64, "b" * 64


def _attrs(**kw):
    return {"backbone": "test_resnet", "checkpoint_sha256": CKPT, "store_content_id": STORE,
            "views": ["identity", "hflip", "vflip"], "class_names": list("ABCD"), **kw}


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N, K, D)).astype(np.float16), rng.normal(size=(N, K, C)).astype(np.float32)


def _full(path, group=None, **kw):
    feats, logits = _data()
    g = create_cache(path, N, K, D, C, _attrs(**kw), chunk_rows=R, group=group,
                     labels=np.arange(N) % C, index=np.arange(N) + 100, fold=np.array([-1] * 2 + [0, 1] * 4))
    for start in range(0, N, R):
        write_rows(g, start, feats[start:start + R], logits[start:start + R])
    mark_complete(g, timings={"total_s": 1.0})
    return feats, logits


def test_default_chunk_rows_targets_4mib_power_of_two():
    assert default_chunk_rows(8, 1280) == 128  # 20 KiB rows
    assert default_chunk_rows(8, 2048) == 128  # 32 KiB rows -> exactly 4 MiB
    assert default_chunk_rows(1, 64) == 1024  # capped
    assert default_chunk_rows(8, 1 << 20) == 8  # floor


def test_round_trip_and_layout(tmp_path):
    p = tmp_path / "c.zarr"
    feats, logits = _full(p)
    c = open_cache(p, checkpoint=CKPT, store=STORE)
    assert len(c) == N and c.dim == D and c.views == ["identity", "hflip", "vflip"]
    assert c.features.dtype == np.float16 and c.stage1_logits.dtype == np.float32
    assert c.features.chunks == (R, K, D) and c.stage1_logits.chunks == (R, K, C)
    np.testing.assert_array_equal(c.features[:], feats)
    np.testing.assert_array_equal(c.read("stage1_logits"), logits)
    np.testing.assert_array_equal(c.index, np.arange(N) + 100)
    assert c.labels.dtype == np.int16 and c.fold.dtype == np.int8 and c.index.dtype == np.int32
    assert c.rows("test").tolist() == [0, 1] and c.rows(0).tolist() == [2, 4, 6, 8]
    assert c.attrs["timings"] == {"total_s": 1.0} and c.attrs["complete"] is True
    assert CKPT in c.cache_id and STORE in c.cache_id
    # one file per row block: a block is one read
    chunk_files = [f for f in (p / "features").rglob("*") if f.is_file() and f.name != "zarr.json"]
    assert len(chunk_files) == 3


def test_read_subset_reads_blocks(tmp_path):
    p = tmp_path / "c.zarr"
    feats, _ = _full(p)
    c = open_cache(p)
    rows = np.array([9, 0, 5, 4, 5])
    np.testing.assert_array_equal(c.read("features", rows), feats[rows])


def test_write_rows_must_cover_whole_blocks(tmp_path):
    g = create_cache(tmp_path / "c.zarr", N, K, D, C, _attrs(), chunk_rows=R)
    feats, logits = _data()
    with pytest.raises(ValueError, match="whole blocks"):
        write_rows(g, 2, feats[2:6], logits[2:6])
    with pytest.raises(ValueError, match="whole blocks"):
        write_rows(g, 0, feats[:3], logits[:3])
    write_rows(g, 8, feats[8:], logits[8:])  # the short last block is whole
    assert done_blocks(g).tolist() == [False, False, True]


def test_incomplete_cache_is_refused(tmp_path):
    p = tmp_path / "c.zarr"
    g = create_cache(p, N, K, D, C, _attrs(), chunk_rows=R)
    feats, logits = _data()
    write_rows(g, 0, feats[:R], logits[:R])
    with pytest.raises(WbcError, match=r"incomplete \(1 of 3 row blocks"):
        open_cache(p)
    with pytest.raises(WbcError, match=r"row blocks \[1, 2\]"):
        mark_complete(g)
    assert not open_for_writing(p).attrs["complete"]
    info = cache_info(p)
    assert info["complete"] is False and info["blocks_done"] == 1 and info["blocks"] == 3


def test_stale_cache_is_refused_naming_both_ids(tmp_path):
    p = tmp_path / "c.zarr"
    _full(p)
    with pytest.raises(WbcError, match=r"checkpoint aaaaaaaaaaaa but checkpoint cccccccccccc"):
        open_cache(p, checkpoint="c" * 64)
    ck = tmp_path / "best.pt"
    ck.write_bytes(b"weights")
    with pytest.raises(WbcError, match=r"aaaaaaaaaaaa but .*best.pt is [0-9a-f]{12}"):
        open_cache(p, checkpoint=ck)
    other = SimpleNamespace(content_id="d" * 64, path=Path("other.h5"))
    with pytest.raises(WbcError, match=r"image store bbbbbbbbbbbb but other.h5 is dddddddddddd"):
        open_cache(p, store=other)
    assert len(open_cache(p, store=SimpleNamespace(content_id=STORE, path="x.h5"))) == N


def test_existing_cache_needs_overwrite(tmp_path):
    p = tmp_path / "c.zarr"
    _full(p)
    with pytest.raises(WbcError, match="--overwrite"):
        create_cache(p, N, K, D, C, _attrs(), chunk_rows=R)
    create_cache(p, N, K, D, C, _attrs(), chunk_rows=R, overwrite=True)
    with pytest.raises(WbcError, match="incomplete"):
        open_cache(p)


def test_named_variant_groups(tmp_path):
    p = tmp_path / "c.zarr"
    _full(p)
    feats, _ = _full(p, group="blur-s3", image_transform="blur:3")
    v = open_cache(p, group="blur-s3", checkpoint=CKPT)
    np.testing.assert_array_equal(v.features[:], feats)
    assert v.attrs["image_transform"] == "blur:3" and v.cache_id != open_cache(p).cache_id
    assert cache_info(p)["variants"] == ["blur-s3"]
    assert cache_info(p, group="blur-s3")["image_transform"] == "blur:3"
    with pytest.raises(WbcError, match="not a feature cache"):
        open_cache(p, group="noise-s1")
    with pytest.raises(WbcError, match="bad cache group name"):
        open_cache(p, group="../x")


def test_missing_or_foreign_path(tmp_path):
    with pytest.raises(WbcError, match="not found"):
        open_cache(tmp_path / "nope.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(WbcError, match="not a feature cache"):
        open_cache(tmp_path / "empty.zarr")


def test_read_sets_and_in_memory_copy_equal_plain_indexing(tmp_path):
    p = tmp_path / "c.zarr"
    feats, logits = _full(p)
    c = open_cache(p)
    a, b = np.array([9, 0, 5, 5]), np.array([3, 8])
    got_a, got_b = c.read_sets("features", [a, b])
    np.testing.assert_array_equal(got_a, feats[a])
    np.testing.assert_array_equal(got_b, feats[b])
    np.testing.assert_array_equal(c.block("stage1_logits", 2), logits[8:10])  # the last, short block
    m = c.in_memory("cv")
    cv = np.flatnonzero(c.fold >= 0)
    assert len(m) == len(cv) and m.cache_id == c.cache_id and m.provenance == c.provenance
    np.testing.assert_array_equal(m.index, c.index[cv])
    np.testing.assert_array_equal(m.read("features", [1, 7]), feats[cv[[1, 7]]])
    np.testing.assert_array_equal(m.read("stage1_logits"), logits[cv])
    assert c.provenance["checkpoint_sha256"] == CKPT and c.provenance["path"] == str(p)


def test_split_rows_of_a_fold_and_its_refusals(tmp_path):
    p = tmp_path / "c.zarr"
    feats, _ = _full(p)  # folds: rows 0-1 test, then 0, 1 alternating
    open_for_writing(p)["labels"][:] = [0, 1, 0, 0, 1, 1, 2, 2, 3, 3]  # every class in both folds
    c = open_cache(p)
    s = c.split(1)
    np.testing.assert_array_equal(s.train, [2, 4, 6, 8])
    np.testing.assert_array_equal(s.val, [3, 5, 7, 9])
    np.testing.assert_array_equal(s.test, [0, 1])
    np.testing.assert_array_equal(s.counts, np.bincount(c.labels[[2, 4, 6, 8]], minlength=C))
    x, y = s.data("test")
    np.testing.assert_array_equal(x, feats[:2])
    np.testing.assert_array_equal(y, c.labels[:2])
    with pytest.raises(WbcError, match="not in the cache"):
        c.split(3)
    open_for_writing(p)["labels"][:] = np.arange(N) % C  # classes 1 and 3 now sit only in fold 1
    with pytest.raises(WbcError, match="no training row"):
        open_cache(p).split(0)
    open_for_writing(p).attrs["checkpoint_fold"] = 0
    with pytest.raises(WbcError, match="fold-0 Stage-1 backbone"):
        open_cache(p).split(1)
