"""HDF5 image store: round trip, O(1) reads from worker processes, incomplete stores refused."""

import pickle

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tests.fixtures import make_images, make_tiny_store
from wbc.errors import WbcError
from wbc.store import (
    ImageStore,
    StoreWriter,
    compression_of,
    compute_content_id,
    open_store,
    write_split,
)


def _write(path, images, labels, paths, plan="p", finalize=True):
    n = len(images)
    w = StoreWriter(path, size=images.shape[1], plan_id=plan)
    w.append(images, labels, paths, [i % 2 == 0 for i in range(n)], ["g"] * n, ["train"] * n,
             [f"h{i}" for i in range(n)])
    w.commit(n)
    if finalize:
        w.finalize(["A", "B"], {"template": "t.png", "stain_matrix": np.eye(3, 2)}, {"size": 32})
    w.close()


def test_round_trip(tmp_path):
    images, labels, paths = make_images(["A", "B"], 3, 32, seed=1)
    p = tmp_path / "s.h5"
    _write(p, images, labels, paths)
    s = open_store(p)
    assert len(s) == 6 and s.size == 32 and s.class_names == ["A", "B"]
    np.testing.assert_array_equal(s.images(range(6)), images)
    np.testing.assert_array_equal(s.image(4), images[4])
    assert s.image(4).dtype == np.uint8 and s.image(4).shape == (32, 32, 3)
    np.testing.assert_array_equal(s.labels, labels)
    assert s.paths == paths and s.groups == ["g"] * 6 and s.source_splits == ["train"] * 6
    assert s.stain_ok.tolist() == [True, False] * 3
    assert s.provenance["stain_matrix"] == np.eye(3, 2).tolist()
    assert s.content_id == compute_content_id([f"h{i}" for i in range(6)], labels, {"size": 32})
    with h5py.File(p) as f:
        assert f["images"].chunks == (1, 32, 32, 3) and compression_of(f["images"]) == "zstd"
    assert s.compression == "zstd"
    with pytest.raises(WbcError, match="no split"):
        _ = s.folds
    s.close()  # HDF5 refuses to reopen for writing a file this process holds open
    write_split(p, np.array([-1, 0, 1, -1, 0, 1]), {"folds": 2})
    s = open_store(p)
    assert s.folds.tolist() == [-1, 0, 1, -1, 0, 1] and s.split_info == {"folds": 2}
    assert s.num_folds == 2 and s.indices("test").tolist() == [0, 3]


def test_content_id_depends_on_labels_and_settings():
    a = compute_content_id(["x", "y"], [0, 1], {"size": 368})
    assert a != compute_content_id(["x", "y"], [1, 1], {"size": 368})
    assert a != compute_content_id(["x", "y"], [0, 1], {"size": 224})
    assert a == compute_content_id(["x", "y"], [0, 1], {"size": 368})


def test_missing_and_incomplete_store_refused(tmp_path):
    with pytest.raises(WbcError, match="not found"):
        open_store(tmp_path / "nope.h5")
    images, labels, paths = make_images(["A", "B"], 2, 16, seed=0)
    p = tmp_path / "part.h5"
    _write(p, images, labels, paths, finalize=False)
    with pytest.raises(WbcError, match="incomplete"):
        open_store(p)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(WbcError, match="not a readable HDF5"):
        open_store(tmp_path / "junk.h5")


def test_writer_resume_and_plan_mismatch(tmp_path):
    images, labels, paths = make_images(["A", "B"], 2, 16, seed=0)
    p = tmp_path / "r.h5"
    _write(p, images[:2], labels[:2], paths[:2], plan="p1", finalize=False)
    with pytest.raises(WbcError, match="different source or settings"):
        StoreWriter(p, size=16, plan_id="p2")
    w = StoreWriter(p, size=16, plan_id="p1")
    assert w.cursor == 2 and w.done_paths() == paths[:2]
    w.append(images[2:], labels[2:], paths[2:], [True] * 2, [""] * 2, [""] * 2, ["a", "b"])
    w.add_skipped([("bad.png", "corrupt")])
    w.commit(5)
    w.finalize(["A", "B"], {}, {})
    w.close()
    s = open_store(p)
    np.testing.assert_array_equal(s.images(range(4)), images)
    assert s.skipped == [("bad.png", "corrupt")]
    with pytest.raises(WbcError, match="already a complete store"):
        StoreWriter(p, size=16, plan_id="p1")


class _DS(Dataset):
    def __init__(self, store):
        self.store = store

    def __len__(self):
        return len(self.store)

    def __getitem__(self, i):
        return torch.from_numpy(self.store.image(i)), int(self.store.labels[i])


def test_pickle_and_dataloader_workers(tmp_path):
    p = make_tiny_store(tmp_path / "t.h5", n_per_class=4, size=32, folds=2, n_test_per_class=1)
    s = ImageStore(p)
    s.image(0)  # opens a handle in this process; pickling must drop it
    s2 = pickle.loads(pickle.dumps(s))
    assert s2._h5 is None
    np.testing.assert_array_equal(s2.image(3), s.image(3))
    # fork: workers inherit the parent's open handle and must reopen their own (pid check)
    dl = DataLoader(_DS(s), batch_size=4, num_workers=2, multiprocessing_context="fork")
    got = torch.cat([x for x, _ in dl]).numpy()
    np.testing.assert_array_equal(got, s.images(range(len(s))))


def test_tiny_store_fixture(tmp_path):
    p = make_tiny_store(tmp_path / "t.h5", classes=("A", "B", "C"), n_per_class=8, size=64,
                        folds=3, seed=0, n_test_per_class=2)
    s = open_store(p)
    assert len(s) == 24 and s.class_names == ["A", "B", "C"] and s.size == 64
    f = s.folds
    for k in range(3):
        assert (f[s.labels == k] == -1).sum() == 2
        assert sorted(set(f[s.labels == k]) - {-1}) == [0, 1, 2]
    # classes look different (mean colour differs), so a tiny model has something to learn
    means = [s.images(np.flatnonzero(s.labels == k)).mean(axis=(0, 1, 2)) for k in range(3)]
    assert min(np.abs(means[i] - means[j]).max() for i in range(3) for j in range(i)) > 3
    # same seed -> same store content
    p2 = make_tiny_store(tmp_path / "t2.h5")
    assert open_store(p2).content_id == s.content_id


def test_rows_after_last_commit_are_dropped_on_resume(tmp_path):
    images, labels, paths = make_images(["A", "B"], 2, 16, seed=0)
    p = tmp_path / "r.h5"
    w = StoreWriter(p, size=16, plan_id="p")
    w.append(images[:2], labels[:2], paths[:2], [True] * 2, [""] * 2, [""] * 2, ["a", "b"])
    w.commit(2)
    w.append(images[2:], labels[2:], paths[2:], [True] * 2, [""] * 2, [""] * 2, ["c", "d"])
    w.close()  # interrupted between append and commit
    w = StoreWriter(p, size=16, plan_id="p")
    assert w.cursor == 2 and w.n_rows == 2 and w.done_paths() == paths[:2]
    w.close()


def test_encoded_images_round_trip(tmp_path):
    from wbc.store import encode_image

    images, labels, paths = make_images(["A", "B"], 2, 24, seed=2)
    w = StoreWriter(tmp_path / "e.h5", size=24, plan_id="p")
    enc = [encode_image(im) for im in images]
    assert len(enc[0].data) < images[0].nbytes  # compressed off the writer
    w.append(enc, labels, paths, [True] * 4, [""] * 4, [""] * 4, list("abcd"))
    with pytest.raises(ValueError, match="store wants"):
        w.append([encode_image(images[0], "lzf")], [0], ["x"], [True], [""], [""], ["e"])
    w.commit(4)
    w.finalize(["A", "B"], {}, {})
    w.close()
    np.testing.assert_array_equal(open_store(tmp_path / "e.h5").images(range(4)), images)


@pytest.mark.parametrize("codec", ["zstd", "lzf", "gzip", "none"])
def test_every_codec_round_trips_and_zstd_chunks_are_plain_zstd_frames(tmp_path, codec):
    import numcodecs

    from wbc.store import encode_image

    images, labels, paths = make_images(["A", "B"], 2, 24, seed=3)
    with StoreWriter(tmp_path / "c.h5", size=24, plan_id="p", compression=codec) as w:
        assert w.compression == codec
        w.append([encode_image(im, codec) for im in images], labels, paths, [True] * 4, [""] * 4,
                 [""] * 4, list("abcd"))
        w.commit(4)
        w.finalize(["A", "B"], {}, {})
    s = open_store(tmp_path / "c.h5")
    assert s.compression == codec
    np.testing.assert_array_equal(s.images(range(4)), images)
    if codec == "zstd":  # an independent decoder (numcodecs' libzstd) reads the stored chunk
        with h5py.File(tmp_path / "c.h5", "r") as f:
            mask, raw = f["images"].id.read_direct_chunk((1, 0, 0, 0))
        assert mask == 0
        np.testing.assert_array_equal(np.frombuffer(numcodecs.Zstd().decode(raw), np.uint8).reshape(24, 24, 3),
                                      images[1])


def test_unknown_codec_refused(tmp_path):
    from wbc.prepare import PrepareConfig

    with pytest.raises(WbcError, match="unknown --compression 'lz5'"):
        PrepareConfig(compression="lz5")
    with pytest.raises(WbcError, match="unknown --compression"):
        StoreWriter(tmp_path / "x.h5", size=8, plan_id="p", compression="lz5")
    assert not (tmp_path / "x.h5").exists()
