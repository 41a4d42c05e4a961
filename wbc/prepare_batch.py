"""`prepare`'s batched backend: each task decodes, normalises, resizes and compresses a chunk of
images; rows come back in source order, as `prepare._prepare_task` gives them.

On the CPU the normaliser is `wbc.stain_np.NumpyMacenko`, image by image, and the tasks run in
forked worker processes (`prepare._pool_kind`): no torch to import (a process start costs ~0.5 s
instead of ~3.5 s), nothing re-imported after the fork, and each process compresses under its
own HDF5 lock (h5py serialises every call behind one lock per process, so threads could not
compress two images at once: 1.75x the plain loop with threads, ~2x with processes). On a GPU it
is `wbc.stain_batch.BatchMacenko` on batches of equal size, in threads of this process.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Iterable, Iterator
from functools import partial
from itertools import islice

import h5py
import numpy as np

from wbc.sources import ImageDecodeError, decode_image, resize_square
from wbc.stain import StainError
from wbc.stain_np import NumpyMacenko
from wbc.store import EncodedImage, check_compression, compression_kwargs

Row = tuple[int, EncodedImage | None, bool, str, str]  # (index, chunk or None if skipped, stain_ok, sha256, note)


def batch_size_for(device: str) -> int:
    """Items per task: a few on the CPU (the threads share the work finely, a batch buys nothing
    in numpy), many on a GPU (kernel launches amortised)."""
    return 4 if str(device) == "cpu" else 64


class _Encoder(threading.local):
    """A store chunk per image through one in-memory HDF5 dataset per thread: the same bytes as
    `encode_image`, without creating a file for each image."""

    def encode(self, image: np.ndarray, compression: str | None) -> EncodedImage:
        compression = check_compression(compression)
        key = (image.shape, compression)
        if getattr(self, "key", None) != key:
            self.f = h5py.File(io.BytesIO(), "w")
            self.ds = self.f.create_dataset("x", shape=(1, *image.shape), dtype=np.uint8,
                                            chunks=(1, *image.shape), **compression_kwargs(compression))
            self.key = key
        self.ds[0] = image
        mask, data = self.ds.id.read_direct_chunk((0,) * (image.ndim + 1))
        return EncodedImage(bytes(data), int(mask), int(image.shape[0]), compression)


_ENCODER = _Encoder()


def _decode(i: int, payload: bytes | str) -> tuple[Row | None, np.ndarray | None, str, str]:
    """-> (a finished row if the item is skipped, else None; rgb; sha; note)."""
    if isinstance(payload, str):
        return (i, None, False, "", payload), None, "", ""
    sha = hashlib.sha256(payload).hexdigest()
    try:
        rgb, note = decode_image(payload)
    except ImageDecodeError as e:
        return (i, None, False, sha, str(e)), None, sha, ""
    return None, rgb, sha, note


def _row(i: int, rgb: np.ndarray, ok: bool, sha: str, note: str, size: int, compression: str | None) -> Row:
    return i, _ENCODER.encode(resize_square(np.ascontiguousarray(rgb), size), compression), ok, sha, note


def prepare_chunk(normalizer, size: int, compression: str | None, chunk: list[tuple[int, bytes | str]]) -> list[Row]:
    """Rows for one chunk of (index, source bytes or a listing problem); normalizer: NumpyMacenko,
    BatchMacenko or None (no stain normalisation)."""
    if normalizer is not None and not isinstance(normalizer, NumpyMacenko):
        return _prepare_chunk_torch(normalizer, size, compression, chunk)
    rows = []
    for i, payload in chunk:
        row, rgb, sha, note = _decode(i, payload)
        if row is None:
            ok = True
            if normalizer is not None and note.startswith("grayscale"):
                ok, note = False, f"{note}: no stain to normalise"
            elif normalizer is not None:
                try:
                    rgb = normalizer.normalize(rgb)
                except StainError as e:
                    ok, note = False, str(e)
            row = _row(i, rgb, ok, sha, note, size, compression)
        rows.append(row)
    return rows


def _prepare_chunk_torch(normalizer, size: int, compression: str | None,
                         chunk: list[tuple[int, bytes | str]]) -> list[Row]:
    """`prepare_chunk` with BatchMacenko: decode all, normalise those with stain in batches of
    equal size on the normaliser's device, then resize and encode each."""
    from wbc.stain_batch import pad_batch

    rows: dict[int, Row] = {}
    todo: list[tuple[int, np.ndarray, str, str]] = []  # (index, rgb, sha, note) to normalise
    done: list[tuple[int, np.ndarray, bool, str, str]] = []  # (index, rgb, ok, sha, note) to store
    for i, payload in chunk:
        row, rgb, sha, note = _decode(i, payload)
        if row is not None:
            rows[i] = row
        elif note.startswith("grayscale"):
            done.append((i, rgb, False, sha, f"{note}: no stain to normalise"))
        else:
            todo.append((i, rgb, sha, note))
    # One batch per image size: no padding, so one large image never inflates the others' work.
    by_shape: dict[tuple, list] = {}
    for t in todo:
        by_shape.setdefault(t[1].shape, []).append(t)
    for group in by_shape.values():
        x, _ = pad_batch([t[1] for t in group])
        r = normalizer.normalize(x)
        out = r.images.cpu().numpy()
        for k, (i, rgb, sha, note) in enumerate(group):
            ok = bool(r.ok[k])
            done.append((i, out[k] if ok else rgb, ok, sha, note if ok else r.reasons[k]))
    for i, rgb, ok, sha, note in done:
        rows[i] = _row(i, rgb, ok, sha, note, size, compression)
    return [rows[i] for i, _ in chunk]


def batched_rows(pool, tasks: Iterable[tuple[int, bytes | str]], normalizer, size: int,
                 compression: str | None, batch: int) -> Iterator[Row]:
    """Rows in task order; `pool` is a ThreadPoolExecutor (None = this thread)."""
    from wbc.prepare import _imap  # the ordered, bounded map prepare's process pool uses

    it = iter(tasks)
    chunks = iter(lambda: list(islice(it, batch)), [])
    fn = partial(prepare_chunk, normalizer, size, compression)
    window = max(2, 2 * (pool._max_workers if pool is not None else 1))
    for rows in _imap(pool, fn, chunks, window=window):
        yield from rows

