"""`prepare`'s batched path: threads decode, Macenko runs on a batch (`wbc.stain_batch`), threads
resize and compress; rows come back in source order, as `prepare._prepare_task` gives them.

Threads, not processes: decoding (PIL), resizing, hashing and torch's kernels all release the
GIL, and a thread starts in microseconds where a spawned worker re-imports torch (~2-5 s). Each
chunk of `batch` items is one task: decode all, normalise those with stain in batches of equal
size on the normaliser's device, then resize and encode each.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from functools import partial
from itertools import islice

import numpy as np
import torch

from wbc.sources import ImageDecodeError, decode_image, resize_square
from wbc.stain_batch import BatchMacenko, pad_batch
from wbc.store import EncodedImage, encode_image

Row = tuple[int, EncodedImage | None, bool, str, str]  # (index, chunk or None if skipped, stain_ok, sha256, note)


def batch_size_for(device: str | torch.device) -> int:
    """Images per normalisation batch: small on the CPU (measured: 2-4 fastest; larger batches
    fall out of cache), large on a GPU (kernel launches amortised)."""
    return 4 if torch.device(device).type == "cpu" else 64


def prepare_chunk(normalizer: BatchMacenko | None, size: int, compression: str | None,
                  chunk: list[tuple[int, bytes | str]]) -> list[Row]:
    """Rows for one chunk of (index, source bytes or a listing problem)."""
    rows: dict[int, Row] = {}
    todo: list[tuple[int, np.ndarray, str, str]] = []  # (index, rgb, sha, note) to normalise
    done: list[tuple[int, np.ndarray, bool, str, str]] = []  # (index, rgb, ok, sha, note) to store
    for i, payload in chunk:
        if isinstance(payload, str):
            rows[i] = (i, None, False, "", payload)
            continue
        sha = hashlib.sha256(payload).hexdigest()
        try:
            rgb, note = decode_image(payload)
        except ImageDecodeError as e:
            rows[i] = (i, None, False, sha, str(e))
            continue
        if normalizer is None:
            done.append((i, rgb, True, sha, note))
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
        rows[i] = (i, encode_image(resize_square(np.ascontiguousarray(rgb), size), compression), ok, sha, note)
    return [rows[i] for i, _ in chunk]


def batched_rows(pool, tasks: Iterable[tuple[int, bytes | str]], normalizer: BatchMacenko | None,
                 size: int, compression: str | None, batch: int) -> Iterator[Row]:
    """Rows in task order; `pool` is a ThreadPoolExecutor (None = this thread)."""
    from wbc.prepare import _imap  # the ordered, bounded map prepare's process pool uses

    it = iter(tasks)
    chunks = iter(lambda: list(islice(it, batch)), [])
    fn = partial(prepare_chunk, normalizer, size, compression)
    window = max(2, 2 * (pool._max_workers if pool is not None else 1))
    for rows in _imap(pool, fn, chunks, window=window):
        yield from rows
