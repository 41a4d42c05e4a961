"""One validation fold of a feature cache (`FeatureCache.split(fold)`): its rows, and the row
sources Stage 2 trains from, in memory when they fit, else streamed from Zarr row blocks.

Both sources serve the same two things: training batches for an epoch's draws (row, view) as
(B, D) float32, and the validation rows as (b, K, D) float32 chunks (all views, for view-averaged
probabilities). The in-memory source holds the training rows as float16 (the cache's own dtype,
converted per batch) and the validation rows as float32 (converted once: validation runs every
epoch). The streamed source holds at most `memory_bytes` of feature data: a window of whole row
blocks (the cache's chunks) visited in random order; each epoch's draws are served window by
window, shuffled within the window, so batches mix ~window/N of the training set at a time.
Every read goes through the cache's own block reader (`FeatureCache.block` / `read_sets`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from wbc.errors import WbcError
from wbc.folds import TEST

log = logging.getLogger(__name__)

VAL_CHUNK_ROWS = 256  # validation images per matmul: (256*K, D); MKL runs skinny GEMMs 1.7x faster in such pieces


@dataclass
class FoldSplit:
    """Validation fold `fold` of `cache`: cache rows of training (every other CV fold),
    validation and the held-out test, each (M,) int64."""

    cache: object  # wbc.cache.FeatureCache
    fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @classmethod
    def of(cls, cache, fold: int) -> FoldSplit:
        """The split, refusing a cache Stage 2 cannot train on with a one-line reason."""
        fold = int(fold)
        folds = sorted(int(f) for f in np.unique(cache.fold) if f >= 0)
        seen = cache.attrs.get("checkpoint_fold")
        if isinstance(seen, int) and seen >= 0 and seen != fold:
            raise WbcError(f"{cache.path} holds features of the fold-{seen} Stage-1 backbone, which "
                           f"trained on fold {fold}: validate on fold {seen} (--fold {seen}), "
                           "or pass one cache per fold with '{fold}' in the path")
        if fold not in folds:
            raise WbcError(f"validation fold {fold} is not in the cache; its CV folds are {folds} "
                           "(run `wbc split` on the store and re-extract if this is empty)")
        split = cls(cache, fold, np.flatnonzero((cache.fold >= 0) & (cache.fold != fold)),
                    np.flatnonzero(cache.fold == fold), np.flatnonzero(cache.fold == TEST))
        split._check(folds)
        return split

    def _check(self, folds: list[int]) -> None:
        c, labels = self.num_classes, self.cache.labels
        if len(self.train) == 0:
            raise WbcError(f"cache has no training fold besides validation fold {self.fold} "
                           f"(CV folds {folds}); Stage 2 needs at least two CV folds")
        cv = labels[np.concatenate([self.train, self.val])]
        bad = (cv < 0) | (cv >= c)
        if bad.any():
            raise WbcError(f"{int(bad.sum())} CV rows have labels outside 0..{c - 1} (e.g. "
                           f"{int(cv[bad][0])}); the cache's labels or class_names are wrong")
        if (self.counts == 0).any():
            names = [self.cache.class_names[j] for j in np.flatnonzero(self.counts == 0)]
            raise WbcError(f"class(es) {names} have no training row outside fold {self.fold}; cRT needs "
                           "every class in training: re-split with more samples per class or drop them")

    @property
    def num_classes(self) -> int:
        return len(self.cache.class_names)

    @property
    def y_train(self) -> np.ndarray:
        return self.cache.labels[self.train].astype(np.int64)

    @property
    def y_val(self) -> np.ndarray:
        return self.cache.labels[self.val].astype(np.int64)

    @property
    def counts(self) -> np.ndarray:
        """Training rows per class (C,)."""
        return np.bincount(self.cache.labels[self.train], minlength=self.num_classes)

    def data(self, part: str = "test", name: str = "features") -> tuple[np.ndarray, np.ndarray]:
        """(features (M, K, D) float16 or stage1_logits (M, K, C), labels (M,)) of 'train', 'val'
        or 'test'."""
        rows = {"train": self.train, "val": self.val, "test": self.test}[part]
        return self.cache.read(name, rows), self.cache.labels[rows].astype(np.int64)

    def resident_bytes(self) -> int:
        """Bytes the in-memory source holds: training rows float16 + validation rows float32."""
        _, k, d = self.cache.features.shape
        return len(self.train) * k * d * 2 + len(self.val) * k * d * 4

    def source(self, memory_bytes: int, stream: bool | None = None) -> InMemoryRows | StreamedRows:
        """In memory when the rows fit in `memory_bytes`, else streamed (stream=True/False forces it)."""
        need = self.resident_bytes()
        if stream is None:
            stream = need > memory_bytes
        if stream:
            return StreamedRows(self, memory_bytes)
        log.info("features in memory: %.0f MiB (budget %.0f MiB)", need / 2**20, memory_bytes / 2**20)
        return InMemoryRows(self)


def to_dtype(x: np.ndarray, dtype) -> np.ndarray:
    """x as dtype; torch's conversion (vectorised) is several times faster than numpy's for fp16."""
    if x.dtype == dtype:
        return x
    out = torch.empty(x.shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype)
    out.copy_(torch.from_numpy(x))
    return out.numpy()


class InMemoryRows:
    """Training rows resident as (Nt*K, D) float16, validation rows as (Nv, K, D) float32."""

    streamed = False

    def __init__(self, split: FoldSplit):
        _, k, d = split.cache.features.shape
        self.k = k
        train, val = split.cache.read_sets("features", [split.train, split.val])
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


class StreamedRows:
    """Row blocks read from the cache on demand; at most `window_blocks` blocks resident at once."""

    streamed = True

    def __init__(self, split: FoldSplit, memory_bytes: int):
        _n, k, d = split.cache.features.shape
        self.cache, self.k, self.d, self.block = split.cache, k, d, split.cache.rows_per_block
        self.train_rows, self.val_rows = split.train, split.val
        block_bytes = self.block * k * d * 2
        self.window_blocks = max(1, int(memory_bytes // block_bytes))
        self.resident_bytes = self.window_blocks * block_bytes
        log.info("streaming features from Zarr: %d row blocks (%.0f MiB) resident at most",
                 self.window_blocks, self.resident_bytes / 2**20)

    def _read_window(self, blocks: np.ndarray) -> np.ndarray:
        # Filled block by block so only one decoded block exists besides the window.
        data = np.empty((len(blocks) * self.block, self.k, self.d), dtype=np.float16)
        for i, b in enumerate(blocks):
            block = self.cache.block("features", int(b))
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
            data = self.cache.block("features", int(b))[self.val_rows[sel] - b * self.block]
            yield sel, torch.from_numpy(data.astype(np.float32))
