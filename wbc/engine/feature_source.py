"""Where Stage-2 training reads cached embeddings from: memory when they fit, else Zarr row blocks.

Both sources serve the same two things: training batches for an epoch's draws (row, view) as
(B, D) float32, and the validation rows as (b, K, D) float32 chunks (all views, for view-averaged
probabilities). The in-memory source holds the training rows as float16 (the cache's own dtype,
converted per batch) and the validation rows as float32 (converted once: validation runs every
epoch). The streamed source holds at most `memory_bytes` of feature data: a window of whole row
blocks (the cache's chunks) visited in random order; each epoch's draws are served window by
window, shuffled within the window, so batches mix ~window/N of the training set at a time.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wbc.errors import WbcError

log = logging.getLogger(__name__)

VAL_CHUNK_ROWS = 256  # validation images per matmul: (256*K, D); MKL runs skinny GEMMs 1.7x faster in such pieces


@dataclass
class FeatureTable:
    """The cached arrays Stage 2 needs. features: (N, K, D) float16 array-like (zarr or numpy);
    labels (N,) int; fold (N,) int (-1 test, 0..F-1 CV folds, -2 unused); ids: cache provenance."""

    features: Any
    labels: np.ndarray
    fold: np.ndarray
    class_names: list[str]
    ids: dict = field(default_factory=dict)
    stage1_logits: Any = None  # (N, K, C) or None
    rows_per_block: int = 128  # natural read size (the Zarr chunk's rows)

    @property
    def shape(self) -> tuple[int, int, int]:
        n, k, d = self.features.shape
        return int(n), int(k), int(d)

    @property
    def folds(self) -> list[int]:
        return sorted(int(f) for f in np.unique(self.fold) if f >= 0)


def from_cache(cache) -> FeatureTable:
    """A FeatureTable over an open `wbc.cache.FeatureCache` (nothing is read yet)."""
    attrs = cache.attrs
    ids = {k: attrs.get(k) for k in ("backbone", "checkpoint_sha256", "checkpoint_fold", "store_content_id",
                                       "views", "image_transform", "wbc_version")}
    ids.update(path=str(cache.path), cache_id=cache.cache_id)
    return FeatureTable(
        features=cache.features, labels=np.asarray(cache.labels), fold=np.asarray(cache.fold),
        class_names=list(cache.class_names), ids=ids, stage1_logits=cache.stage1_logits,
        rows_per_block=int(attrs.get("rows_per_chunk") or cache.features.chunks[0]),
    )


def split_rows(table: FeatureTable, val_fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Training rows (every CV fold but `val_fold`) and validation rows; refuses unusable caches."""
    n, _, _ = table.shape
    c = len(table.class_names)
    if len(table.labels) != n or len(table.fold) != n:
        raise WbcError(f"cache arrays disagree: features {n} rows, labels {len(table.labels)}, "
                       f"fold {len(table.fold)}; re-extract the cache")
    folds = table.folds
    seen = table.ids.get("checkpoint_fold")
    if isinstance(seen, int) and seen >= 0 and seen != val_fold:
        raise WbcError(f"{table.ids.get('path', 'the cache')} holds features of the fold-{seen} Stage-1 "
                       f"backbone, which trained on fold {val_fold}: validate on fold {seen} (--fold {seen}), "
                       "or pass one cache per fold with '{fold}' in the path")
    if val_fold not in folds:
        raise WbcError(f"validation fold {val_fold} is not in the cache; its CV folds are {folds} "
                       "(run `wbc split` on the store and re-extract if this is empty)")
    train = np.flatnonzero((table.fold >= 0) & (table.fold != val_fold))
    val = np.flatnonzero(table.fold == val_fold)
    if len(train) == 0:
        raise WbcError(f"cache has no training fold besides validation fold {val_fold} "
                       f"(CV folds {folds}); Stage 2 needs at least two CV folds")
    labels = table.labels[np.concatenate([train, val])]
    bad = (labels < 0) | (labels >= c)
    if bad.any():
        raise WbcError(f"{int(bad.sum())} CV rows have labels outside 0..{c - 1} (e.g. "
                       f"{int(labels[bad][0])}); the cache's labels or class_names are wrong")
    counts = np.bincount(table.labels[train], minlength=c)
    if (counts == 0).any():
        names = [table.class_names[j] for j in np.flatnonzero(counts == 0)]
        raise WbcError(f"class(es) {names} have no training row outside fold {val_fold}; cRT needs "
                       "every class in training: re-split with more samples per class or drop them")
    return train, val


def read_row_sets(features, row_sets: list[np.ndarray], block: int) -> list[np.ndarray]:
    """features[rows] for each row set of a zarr or numpy (N, ...) array, in its stored dtype.

    Each row block (the Zarr chunk) holding any requested row is read and decoded once, whatever
    the number of sets, so training and validation rows come from one pass over the cache.
    """
    sets = [np.asarray(r, dtype=np.int64) for r in row_sets]
    outs = [np.empty((len(r), *features.shape[1:]), dtype=features.dtype) for r in sets]
    blocks = np.unique(np.concatenate([r // block for r in sets])) if sets else []
    spans = []
    for r in sets:  # rows of each set grouped by block: order[start[i]:stop[i]] lie in blocks[i]
        order = np.argsort(r, kind="stable")
        rb = r[order] // block
        spans.append((order, np.searchsorted(rb, blocks), np.searchsorted(rb, blocks, side="right")))
    for i, b in enumerate(blocks):
        chunk = np.asarray(features[b * block: (b + 1) * block])
        for r, out, (order, start, stop) in zip(sets, outs, spans):
            sel = order[start[i]:stop[i]]
            if len(sel):
                out[sel] = chunk[r[sel] - b * block]
    return outs


def read_rows(features, rows: np.ndarray, block: int, dtype=None) -> np.ndarray:
    """features[rows] (one set), converted to dtype if given."""
    (out,) = read_row_sets(features, [rows], block)
    return out if dtype is None else to_dtype(out, dtype)


def to_dtype(x: np.ndarray, dtype) -> np.ndarray:
    """x as dtype; torch's conversion (vectorised) is several times faster than numpy's for fp16."""
    if x.dtype == dtype:
        return x
    out = torch.empty(x.shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype)
    out.copy_(torch.from_numpy(x))
    return out.numpy()


class InMemorySource:
    """Training rows resident as (Nt*K, D) float16, validation rows as (Nv, K, D) float32."""

    def __init__(self, table: FeatureTable, train_rows: np.ndarray, val_rows: np.ndarray):
        _, k, d = table.shape
        self.k = k
        train, val = read_row_sets(table.features, [train_rows, val_rows], table.rows_per_block)
        self.train = torch.from_numpy(to_dtype(train, np.float16)).view(-1, d)  # row r, view v at r*K + v
        self.val = torch.from_numpy(to_dtype(val, np.float32))
        self.resident_bytes = self.train.nbytes + self.val.nbytes

    def batches(self, rows: np.ndarray, views: np.ndarray, batch_size: int, rng=None
                ) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """Yield (x (B, D) float32, draw positions (B,)) in the draws' order."""
        flat = torch.from_numpy(rows * self.k + views)
        for s in range(0, len(rows), batch_size):
            x = self.train.index_select(0, flat[s: s + batch_size])
            yield x.float(), np.arange(s, min(s + batch_size, len(rows)))

    def val_chunks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield (slice of validation rows, x (b, K, D) float32)."""
        for a in range(0, len(self.val), VAL_CHUNK_ROWS):
            yield slice(a, a + VAL_CHUNK_ROWS), self.val[a: a + VAL_CHUNK_ROWS]


class StreamedSource:
    """Row blocks read from Zarr on demand; at most `window_blocks` blocks resident at once."""

    def __init__(self, table: FeatureTable, train_rows: np.ndarray, val_rows: np.ndarray,
                 memory_bytes: int):
        _n, k, d = table.shape
        self.table, self.k, self.block = table, k, table.rows_per_block
        self.train_rows, self.val_rows = train_rows, val_rows
        block_bytes = self.block * k * d * 2
        self.window_blocks = max(1, int(memory_bytes // block_bytes))
        self.resident_bytes = self.window_blocks * block_bytes
        log.info("streaming features from Zarr: %d row blocks (%.0f MiB) resident at most",
                 self.window_blocks, self.resident_bytes / 2**20)

    def _read_block(self, b: int) -> np.ndarray:
        return np.asarray(self.table.features[b * self.block: (b + 1) * self.block])

    def _read_window(self, blocks: np.ndarray) -> np.ndarray:
        # Filled block by block so only one decoded block exists besides the window.
        _, k, d = self.table.shape
        data = np.empty((len(blocks) * self.block, k, d), dtype=np.float16)
        for i, b in enumerate(blocks):
            block = self._read_block(int(b))
            data[i * self.block: i * self.block + len(block)] = block
        return data

    def batches(self, rows: np.ndarray, views: np.ndarray, batch_size: int,
                rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """Yield (x (B, D) float32, draw positions (B,)); full batches except the epoch's last."""
        cache_rows = self.train_rows[rows]
        blocks = cache_rows // self.block
        order = rng.permutation(np.unique(blocks))
        rank = np.empty(blocks.max() + 1, dtype=np.int64)
        rank[order] = np.arange(len(order))
        by_block = np.argsort(rank[blocks], kind="stable")  # draws grouped in block-visit order
        starts = np.searchsorted(rank[blocks][by_block], np.arange(0, len(order), self.window_blocks))
        bounds = np.append(starts, len(by_block))
        carry_x, carry_i = [], []
        for w, (a, z) in enumerate(itertools.pairwise(bounds)):
            win = order[w * self.window_blocks: (w + 1) * self.window_blocks]
            data = self._read_window(win)  # (W*R, K, D) float16
            slot = np.empty(rank.shape, dtype=np.int64)
            slot[win] = np.arange(len(win))
            idx = rng.permutation(by_block[a:z])
            pos = slot[blocks[idx]] * self.block + cache_rows[idx] - blocks[idx] * self.block
            x_all = torch.from_numpy(data).view(-1, data.shape[-1])
            flat = torch.from_numpy(pos * self.k + views[idx])
            for s in range(0, len(idx), batch_size):
                x = x_all.index_select(0, flat[s: s + batch_size]).float()
                carry_x.append(x)
                carry_i.append(idx[s: s + batch_size])
                if sum(len(i) for i in carry_i) >= batch_size:
                    yield from self._emit(carry_x, carry_i, batch_size)
            del data, x_all
        if carry_i:
            yield torch.cat(carry_x), np.concatenate(carry_i)

    @staticmethod
    def _emit(carry_x: list, carry_i: list, batch_size: int):
        x, i = torch.cat(carry_x), np.concatenate(carry_i)
        carry_x.clear()
        carry_i.clear()
        yield x[:batch_size], i[:batch_size]
        if len(i) > batch_size:
            carry_x.append(x[batch_size:])
            carry_i.append(i[batch_size:])

    def val_chunks(self) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (positions in the validation rows, x (b, K, D) float32), one row block at a time."""
        blocks = self.val_rows // self.block
        for b in np.unique(blocks):
            sel = np.flatnonzero(blocks == b)
            data = self._read_block(int(b))[self.val_rows[sel] - b * self.block]
            yield sel, torch.from_numpy(data.astype(np.float32))


def preload_cv(table: FeatureTable) -> FeatureTable:
    """The CV rows (fold >= 0) read into memory once, as a table of their own (row i = i-th CV
    row), so several validation folds of one cache decode the Zarr chunks once, not per fold."""
    rows = np.flatnonzero(table.fold >= 0)
    s1 = table.stage1_logits
    return FeatureTable(
        features=read_rows(table.features, rows, table.rows_per_block),
        labels=table.labels[rows], fold=table.fold[rows], class_names=table.class_names,
        ids=table.ids, stage1_logits=None if s1 is None else read_rows(s1, rows, table.rows_per_block, np.float32),
        rows_per_block=table.rows_per_block,
    )


def cv_bytes(table: FeatureTable) -> int:
    _, k, d = table.shape
    return int((table.fold >= 0).sum()) * k * d * 2


def resident_need(table: FeatureTable, train_rows: np.ndarray, val_rows: np.ndarray) -> int:
    """Bytes the in-memory source holds: training rows float16 + validation rows float32."""
    _, k, d = table.shape
    return len(train_rows) * k * d * 2 + len(val_rows) * k * d * 4


def make_source(table: FeatureTable, train_rows: np.ndarray, val_rows: np.ndarray,
                memory_bytes: int, stream: bool | None = None):
    """In memory when the rows fit in `memory_bytes`, else streamed (stream=True/False forces it)."""
    need = resident_need(table, train_rows, val_rows)
    if stream is None:
        stream = need > memory_bytes
    if stream:
        return StreamedSource(table, train_rows, val_rows, memory_bytes)
    log.info("features in memory: %.0f MiB (budget %.0f MiB)", need / 2**20, memory_bytes / 2**20)
    return InMemorySource(table, train_rows, val_rows)
