"""Zarr v3 feature cache (docs/ARCHITECTURE.md section 3): layout, writer, provenance-checked reader.

Layout of `X.zarr` (one group; degraded copies of the images live in named groups
`X.zarr/variants/<name>` with the same layout and their own attributes):
    features       (N, K, D) float16   embeddings per test-time view (NaN until written)
    stage1_logits  (N, K, C) float32   the Stage-1 head's logits, so its baseline needs no backbone
    labels         (N,) int16          class index (-1 unlabelled)
    index          (N,) int32          row in the image store
    fold           (N,) int8           -1 held-out test, 0..F-1 CV fold, -2 unused (as the store)
    done           (B,) uint8          1 once row block b is written (one chunk per block)

Chunks: row blocks of R rows holding all K views and all D dims, (R, K, D) and (R, K, C), with R a
power of two giving ~4 MiB of features per chunk (128 rows for K=8, D=1280 or 2048). A row block is
one file read, Stage 2 reads a whole cache in N/R sequential reads, resume loses at most one
block of work, and ranks of a multi-GPU run own whole blocks, so their writes never touch the same
file. Features are zstd level 1 compressed (fast to decode; 0.42 of the raw size for
EfficientNet-Lite0 features of PBC: 28.6 MiB for 3,338 images x 8 views x 1,280 dims).
Writes are resumable: a block's `done` flag is set after its rows, zarr's LocalStore writes each
file atomically (temp file + rename), and the `complete` attribute is set last, after checking
every flag; readers refuse an incomplete cache.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from wbc.errors import WbcError
from wbc.folds import TEST

log = logging.getLogger(__name__)

FORMAT = "wbc.cache/1"
VARIANTS = "variants"
TARGET_CHUNK_BYTES = 4 << 20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def default_chunk_rows(k: int, d: int, target_bytes: int = TARGET_CHUNK_BYTES) -> int:
    """Rows per chunk: the power of two in [8, 1024] nearest below target_bytes of fp16 features."""
    rows = max(1, target_bytes // (2 * k * d))
    return int(min(1024, max(8, 2 ** int(math.log2(rows)))))


def group_path(group: str | None) -> str:
    """'' for the main cache, 'variants/<name>' for a named group (degraded images)."""
    if group is None:
        return ""
    if not _NAME.match(group):
        raise WbcError(f"bad cache group name {group!r}: use letters, digits and . _ = + -")
    return f"{VARIANTS}/{group}"


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def read_attrs(p: Path) -> dict:
    """Attributes of the zarr group at directory p, read without zarr ({} if none)."""
    try:
        return json.loads((p / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return {}


def _n_blocks(n: int, rows: int) -> int:
    return max(1, -(-n // rows))


# -- writer ----------------------------------------------------------------------------------
def create_cache(
    path: str | Path,
    n: int,
    k: int,
    d: int,
    c: int,
    attrs: dict,
    *,
    chunk_rows: int | None = None,
    group: str | None = None,
    labels: np.ndarray | None = None,
    index: np.ndarray | None = None,
    fold: np.ndarray | None = None,
    overwrite: bool = False,
) -> zarr.Group:
    """Create an empty cache (or named group) for N rows, K views, D dims, C classes.

    attrs: provenance (backbone, checkpoint_sha256, store_content_id, views, class_names, ...);
    `format`, `dim`, `dtype`, `rows_per_chunk` and `complete=False` are added. labels/index/fold:
    (N,) written now (defaults: -1, arange(N), -1). Fill rows with `write_rows`, then call
    `mark_complete`. An existing cache or group at the place is refused unless overwrite.
    """
    path = Path(path)
    gp = group_path(group)
    target = path / gp if gp else path
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):  # empty dir: fine
        if not overwrite:
            raise WbcError(f"{target} already exists; pass --overwrite to replace it")
        if read_attrs(target).get("format") != FORMAT:
            raise WbcError(f"refusing to delete {target}: it is not a wbc feature cache")
        shutil.rmtree(target)
    rows = int(chunk_rows or default_chunk_rows(k, d))
    root = zarr.open_group(str(path), mode="a")
    g = root.require_group(VARIANTS).require_group(group) if group else root
    g.attrs.update(_jsonable({**attrs, "format": FORMAT, "dim": d, "dtype": "float16",
                              "rows_per_chunk": rows, "num_rows": n, "complete": False}))
    zstd = ZstdCodec(level=1)
    g.create_array("features", shape=(n, k, d), chunks=(rows, k, d), dtype="float16",
                   fill_value=np.nan, compressors=zstd, dimension_names=("row", "view", "dim"))
    g.create_array("stage1_logits", shape=(n, k, c), chunks=(rows, k, c), dtype="float32",
                   fill_value=np.nan, compressors=zstd, dimension_names=("row", "view", "class"))
    # Per-row metadata is tiny: one chunk each, written once here.
    cols = {
        "labels": (np.full(n, -1) if labels is None else labels, "int16"),
        "index": (np.arange(n) if index is None else index, "int32"),
        "fold": (np.full(n, -1) if fold is None else fold, "int8"),
    }
    for name, (values, dt) in cols.items():
        values = np.asarray(values)
        if values.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {values.shape}")
        g.create_array(name, shape=(n,), chunks=(max(n, 1),), dtype=dt, fill_value=-1)[:] = values.astype(dt)
    g.create_array("done", shape=(_n_blocks(n, rows),), chunks=(1,), dtype="uint8",
                   fill_value=0, compressors=None)
    return g


def open_for_writing(path: str | Path, group: str | None = None) -> zarr.Group:
    """Open an existing cache (or group) read-write, e.g. in a second process of a sharded run."""
    return zarr.open_group(str(path), path=group_path(group), mode="r+")


def block_rows(g: zarr.Group, b: int) -> tuple[int, int]:
    """Rows [start, stop) of row block b."""
    rows, n = int(g.attrs["rows_per_chunk"]), int(g.attrs["num_rows"])
    return b * rows, min(n, (b + 1) * rows)


def done_blocks(g: zarr.Group) -> np.ndarray:
    """(B,) bool: which row blocks are written."""
    return g["done"][:].astype(bool)


def write_rows(g: zarr.Group, start: int, features: np.ndarray, logits: np.ndarray) -> None:
    """Write rows [start, start+len) of features (M, K, D) and logits (M, K, C), then flag their blocks.

    The rows must cover whole blocks (start and stop on block boundaries, or stop = N), so a
    block is either fully written and flagged or rewritten on resume.
    """
    rows, n = int(g.attrs["rows_per_chunk"]), int(g.attrs["num_rows"])
    stop = start + len(features)
    if start % rows or (stop % rows and stop != n) or stop > n or len(logits) != len(features):
        raise ValueError(f"rows [{start}, {stop}) are not whole blocks of {rows} (N={n})")
    g["features"][start:stop] = np.asarray(features, dtype=np.float16)
    g["stage1_logits"][start:stop] = np.asarray(logits, dtype=np.float32)
    g["done"][start // rows: _n_blocks(stop, rows)] = 1


def mark_complete(g: zarr.Group, **attrs: Any) -> None:
    """Record final attributes (timings...), check every block is done, then set `complete` last."""
    missing = np.flatnonzero(~done_blocks(g))
    if len(missing):
        raise WbcError(f"cannot mark {g.store_path} complete: row blocks {missing[:10].tolist()} "
                       f"({len(missing)} in all) are not written; rerun the extraction to fill them")
    if attrs:
        g.attrs.update(_jsonable(attrs))
    g.attrs["complete"] = True


# -- reader ----------------------------------------------------------------------------------
PROVENANCE_KEYS = ("backbone", "checkpoint_sha256", "checkpoint_fold", "store_content_id", "views",
                   "image_transform", "wbc_version")


@dataclass
class FeatureCache:
    """A complete cache. features: (N, K, D) float16 zarr array; labels/index/fold: (N,) numpy.

    `in_memory(rows)` gives a cache of those rows held as numpy arrays (same API, row i = the
    i-th of `rows`), so several readers of one cache decode its Zarr chunks once.
    """

    path: Path
    group: str | None
    attrs: dict
    features: Any  # zarr.Array (or numpy in an in-memory copy)
    stage1_logits: Any
    labels: np.ndarray
    index: np.ndarray
    fold: np.ndarray
    _g: Any = field(repr=False)  # the zarr group, or a dict of numpy arrays

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def arrays(self) -> dict[str, Any]:
        """Every array of the cache by name (features, stage1_logits, labels, index, fold, done)."""
        return dict(self._g) if isinstance(self._g, dict) else dict(self._g.arrays())

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    @property
    def views(self) -> list[str]:
        return list(self.attrs["views"])

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def rows_per_block(self) -> int:
        """Rows per stored chunk: the natural read size."""
        return int(self.attrs.get("rows_per_chunk") or self.features.chunks[0])

    @property
    def cache_id(self) -> str:
        return cache_id(self.attrs)

    @property
    def provenance(self) -> dict:
        """What a head trained on this cache records about it (ids, path, cache_id)."""
        return {**{k: self.attrs.get(k) for k in PROVENANCE_KEYS}, "path": str(self.path),
                "cache_id": self.cache_id}

    def rows(self, fold: int | str) -> np.ndarray:
        """Cache rows of CV fold `fold`, 'test' (fold -1) or 'cv' (every fold >= 0)."""
        if fold == "test":
            return np.flatnonzero(self.fold == TEST)
        if fold == "cv":
            return np.flatnonzero(self.fold >= 0)
        return np.flatnonzero(self.fold == int(fold))

    def block(self, name: str, b: int) -> np.ndarray:
        """Row block b of `features` or `stage1_logits`: one chunk, one file read."""
        r = self.rows_per_block
        return np.asarray(self._g[name][b * r: min(len(self), (b + 1) * r)])

    def read(self, name: str = "features", rows: np.ndarray | None = None) -> np.ndarray:
        """Rows of `features` (M, K, D) or `stage1_logits` (M, K, C), read block by block.

        Only the blocks holding the requested rows are read, one file each, so a subset never
        materialises the whole array.
        """
        if rows is None:
            return np.asarray(self._g[name][:])
        return self.read_sets(name, [rows])[0]

    def read_sets(self, name: str, row_sets: list[np.ndarray]) -> list[np.ndarray]:
        """`read` for several row sets in one pass: each block holding any requested row is read
        and decoded once, whatever the number of sets (training and validation rows together)."""
        arr, r = self._g[name], self.rows_per_block
        sets = [np.asarray(rows, dtype=np.int64) for rows in row_sets]
        outs = [np.empty((len(rows), *arr.shape[1:]), dtype=arr.dtype) for rows in sets]
        blocks = np.unique(np.concatenate([rows // r for rows in sets])) if sets else []
        spans = []
        for rows in sets:  # rows of each set grouped by block: order[start[i]:stop[i]] lie in blocks[i]
            order = np.argsort(rows, kind="stable")
            rb = rows[order] // r
            spans.append((order, np.searchsorted(rb, blocks), np.searchsorted(rb, blocks, side="right")))
        for i, b in enumerate(blocks):
            chunk = self.block(name, int(b))
            for rows, out, (order, start, stop) in zip(sets, outs, spans):
                sel = order[start[i]:stop[i]]
                if len(sel):
                    out[sel] = chunk[rows[sel] - b * r]
        return outs

    def in_memory(self, rows: np.ndarray | str = "cv") -> FeatureCache:
        """These rows ('cv', 'test', a fold or an index array) read once into numpy: features in
        their stored float16, Stage-1 logits as float32."""
        rows = self.rows(rows) if isinstance(rows, str | int) else np.asarray(rows, dtype=np.int64)
        feats, logits = self.read("features", rows), self.read("stage1_logits", rows).astype(np.float32)
        cols = {"labels": self.labels[rows], "index": self.index[rows], "fold": self.fold[rows]}
        attrs = {**self.attrs, "num_rows": len(rows)}
        return FeatureCache(self.path, self.group, attrs, feats, logits, **cols,
                            _g={"features": feats, "stage1_logits": logits, **cols})

    def split(self, fold: int):
        """Fold `fold` as validation: training, validation and test rows, their labels, and the
        row sources Stage 2 trains from (in memory or streamed). See `wbc.cache_split.FoldSplit`."""
        from wbc.cache_split import FoldSplit  # lazy: torch only when Stage 2 reads

        return FoldSplit.of(self, fold)


def cache_id(attrs: dict) -> str:
    """What a cache is a function of: checkpoint, image store, views and image transform."""
    parts = [attrs.get("checkpoint_sha256", ""), attrs.get("store_content_id", ""),
             ",".join(attrs.get("views", [])), attrs.get("image_transform") or ""]
    return ":".join(parts)


def _short(x: str) -> str:
    return x[:12] if x else "none"


def _resolve_checkpoint_sha(checkpoint: str | Path) -> tuple[str, str]:
    s = str(checkpoint)
    if _HEX64.match(s):
        return s, f"checkpoint {_short(s)}"
    p = Path(checkpoint)
    if not p.is_file():
        raise WbcError(f"checkpoint not found: {p}")
    from wbc.config import file_sha256

    return file_sha256(p), str(p)


def _resolve_store_id(store: Any) -> tuple[str, str]:
    if hasattr(store, "content_id"):
        return str(store.content_id), str(getattr(store, "path", "the image store"))
    s = str(store)
    if _HEX64.match(s):
        return s, f"store {_short(s)}"
    from wbc.store import open_store

    st = open_store(s)
    return st.content_id, s


def open_group(path: str | Path, group: str | None = None, mode: str = "r") -> zarr.Group:
    """The zarr group of a cache (any state); WbcError if it is missing or not a wbc cache."""
    path = Path(path)
    if not path.exists():
        raise WbcError(f"feature cache not found: {path}; create it with `wbc extract`")
    try:
        g = zarr.open_group(str(path), path=group_path(group), mode=mode)
    except (zarr.errors.GroupNotFoundError, FileNotFoundError, ValueError):
        where = f"group {group!r} of {path}" if group else str(path)
        raise WbcError(f"{where} is not a feature cache (no zarr group there)") from None
    if g.attrs.get("format") != FORMAT:
        raise WbcError(f"{path} is not a wbc feature cache (format {g.attrs.get('format')!r})")
    return g


def open_cache(
    path: str | Path,
    checkpoint: str | Path | None = None,
    store: Any = None,
    group: str | None = None,
) -> FeatureCache:
    """Open a complete cache, checking it was made from `checkpoint` and `store` when given.

    checkpoint: a Stage-1 checkpoint path or its sha256; store: an ImageStore, a store path or a
    content id. A missing, incomplete or mismatched cache raises WbcError naming both ids.
    """
    path = Path(path)
    g = open_group(path, group)
    attrs = g.attrs.asdict()
    where = f"{path} (group {group})" if group else str(path)
    if not attrs.get("complete"):
        done = done_blocks(g)
        raise WbcError(f"{where} is incomplete ({int(done.sum())} of {len(done)} row blocks "
                       "written): rerun the same `wbc extract` command to finish it")
    for given, resolve, key, made in ((checkpoint, _resolve_checkpoint_sha, "checkpoint_sha256", "checkpoint"),
                                      (store, _resolve_store_id, "store_content_id", "image store")):
        if given is None:
            continue
        value, what = resolve(given)
        if value != attrs.get(key):
            raise WbcError(
                f"stale cache {where}: made from {made} {_short(attrs.get(key, ''))} "
                f"but {what} is {_short(value)}; re-extract it with `wbc extract ... --overwrite`"
            )
    return FeatureCache(
        path=path, group=group, attrs=attrs, features=g["features"],
        stage1_logits=g["stage1_logits"], labels=g["labels"][:], index=g["index"][:],
        fold=g["fold"][:], _g=g,
    )


def _disk_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def cache_info(path: str | Path, group: str | None = None) -> dict:
    """Shapes, views, provenance, completeness and size on disk of a cache in any state."""
    path = Path(path)
    g = open_group(path, group)
    attrs = g.attrs.asdict()
    done = done_blocks(g)
    root = zarr.open_group(str(path), mode="r")
    variants = sorted(root[VARIANTS].group_keys()) if VARIANTS in root else []
    gp = group_path(group)
    return {
        "path": str(path),
        "group": group,
        "complete": bool(attrs.get("complete")),
        "blocks_done": int(done.sum()),
        "blocks": len(done),
        "shapes": {name: list(g[name].shape) for name in ("features", "stage1_logits", "labels")},
        "chunks": list(g["features"].chunks),
        "views": attrs.get("views"),
        "class_names": attrs.get("class_names"),
        "backbone": attrs.get("backbone"),
        "checkpoint_sha256": attrs.get("checkpoint_sha256"),
        "store_content_id": attrs.get("store_content_id"),
        "image_transform": attrs.get("image_transform"),
        "wbc_version": attrs.get("wbc_version"),
        "timings": attrs.get("timings"),
        "rows_by_fold": {int(f): int(c) for f, c in zip(*np.unique(g["fold"][:], return_counts=True))},
        "size_bytes": _disk_size(path / gp if gp else path),
        "variants": variants,
    }
