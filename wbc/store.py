"""HDF5 image store (docs/ARCHITECTURE.md section 1): a low-level writer and the reader.

Layout: `images` (N, S, S, 3) uint8 chunked one image per chunk, so reading image i touches one
chunk (O(1)); per-row `labels`, `paths`, `stain_ok`, `group`, `source_split`, `source_sha256`;
`fold` once split. Root attributes `class_names`, `provenance`, `content_id`, `split` are JSON
strings; `complete` is set last, so a store interrupted while being written is never read as done.

The writer appends rows in the order the caller processes its plan and records a `cursor` (how
many plan items are done, including skipped ones) after each flush: an interrupted `prepare`
resumes from the cursor instead of restarting.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import h5py
import hdf5plugin  # registers the Zstandard filter with HDF5 (the store's default codec)
import numpy as np

from wbc.errors import WbcError
from wbc.folds import TEST

log = logging.getLogger(__name__)

FORMAT = "wbc.store/1"
_STR = h5py.string_dtype("utf-8")
# Per-row datasets besides `images`, with their dtypes (all resizable along axis 0).
ROW_FIELDS: dict[str, Any] = {
    "labels": np.int16,
    "paths": _STR,
    "stain_ok": np.bool_,
    "group": _STR,
    "source_split": _STR,
    "source_sha256": _STR,
    "note": _STR,  # why stain_ok is False, or a conversion made on decode ('' when none)
}
SKIP_FIELDS = ("skipped_paths", "skipped_reasons")

# The images' codec. Zstandard level 1 (HDF5 filter 32015 from hdf5plugin) against h5py's lzf on
# normalised PBC-LT images at 368 px (BENCHMARKS.md "prepare"): compresses in 1.8 vs 3.8 ms,
# decompresses ~3x faster, 201 vs 235 KiB per image. lzf stays selectable: any h5py reads it.
COMPRESSIONS = ("zstd", "lzf", "gzip", "none")
DEFAULT_COMPRESSION = "zstd"


def check_compression(name: str | None) -> str:
    """The codec's name ('none' for None); an unknown name raises WbcError."""
    name = "none" if name is None else str(name)
    if name not in COMPRESSIONS:
        raise WbcError(f"unknown --compression {name!r}; choose from {', '.join(COMPRESSIONS)}")
    return name


def compression_kwargs(name: str | None) -> dict:
    """h5py `create_dataset` keywords of a codec."""
    name = check_compression(name)
    if name == "zstd":
        return dict(hdf5plugin.Zstd(clevel=1))
    return {} if name == "none" else {"compression": name}


def compression_of(ds: h5py.Dataset) -> str:
    """The codec an existing `images` dataset was written with (stores before zstd: lzf)."""
    if "32015" in ds._filters:  # h5py names only its own filters; plugins appear by id
        return "zstd"
    if ds.compression in COMPRESSIONS:
        return ds.compression
    other = sorted(set(ds._filters) - {"shuffle", "fletcher32", "scaleoffset"})
    return "none" if not other else f"other ({', '.join(other)})"


def _jdump(obj: Any) -> str:
    return json.dumps(obj, default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


@dataclass(frozen=True)
class EncodedImage:
    """One image as a store chunk, compressed off the writer's process (see `encode_image`)."""

    data: bytes
    filter_mask: int
    size: int
    compression: str


def encode_image(image: np.ndarray, compression: str | None = DEFAULT_COMPRESSION) -> EncodedImage:
    """Compress one (S, S, 3) uint8 image into the store's chunk format.

    Worker processes call this so the writer only copies bytes (`write_direct_chunk`): with
    many workers, compressing in the single writing process would be the bottleneck.
    """
    compression = check_compression(compression)
    with h5py.File(io.BytesIO(), "w") as f:
        ds = f.create_dataset("x", data=image[None], chunks=(1, *image.shape), **compression_kwargs(compression))
        mask, data = ds.id.read_direct_chunk((0, 0, 0, 0))
    return EncodedImage(bytes(data), int(mask), int(image.shape[0]), compression)


def compute_content_id(source_sha256: Sequence[str], labels: Sequence[int], settings: dict) -> str:
    """sha256 over the images' source hashes, their labels and the prepare settings."""
    h = hashlib.sha256()
    for s, y in zip(source_sha256, labels):
        h.update(f"{s}:{int(y)}\n".encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _held_by_another(e: OSError) -> bool:
    """h5py's error when another process holds the file open for writing (HDF5 file locking)."""
    return e.errno in (11, 35) or "unable to lock file" in str(e).lower()


class StoreWriter:
    """Create (or resume) a store and append rows to it; `finalize` marks it complete.

    `plan_id` identifies the source listing + settings: a partial store written under another
    plan is refused (the caller decides whether to overwrite), one under the same plan resumes.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        size: int,
        plan_id: str,
        compression: str | None = DEFAULT_COMPRESSION,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        self.size = int(size)
        self.plan_id = plan_id
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and overwrite:
            self.path.unlink()
        if self.path.exists():
            self.f = self._open_existing()
        else:
            self.f = self._create(check_compression(compression))
        # A resumed store keeps the codec it was started with (its chunks must all decode alike).
        self.compression = compression_of(self.f["images"])

    # -- opening ---------------------------------------------------------------------------
    def _open_existing(self) -> h5py.File:
        # Read-only peek first: it works even while this process holds the file open for reading.
        try:
            with h5py.File(self.path, "r") as f:
                attrs = dict(f.attrs)
        except OSError as e:
            if _held_by_another(e):  # never advise --overwrite while someone else has the file
                raise WbcError(f"{self.path} is open in another process (HDF5 file lock); wait for "
                               "it to finish, then rerun") from None
            raise WbcError(
                f"{self.path} exists but cannot be opened as HDF5 ({e}); "
                "delete it or rerun with --overwrite"
            ) from None
        if attrs.get("format") != FORMAT:
            raise WbcError(f"{self.path} is not a wbc image store; choose another --out or --overwrite")
        if bool(attrs.get("complete", False)):
            raise WbcError(f"{self.path} is already a complete store; use --overwrite to rebuild it")
        if attrs.get("plan_id") != self.plan_id or int(attrs["size"]) != self.size:
            raise WbcError(
                f"{self.path} is a partial store from a different source or settings "
                f"(plan {attrs.get('plan_id')} != {self.plan_id}); rerun with --overwrite"
            )
        try:
            f = h5py.File(self.path, "a")
        except OSError as e:
            raise WbcError(f"cannot open {self.path} for writing ({e}); close other readers of it first") from None
        self.f = f
        self._truncate_to_commit()
        log.info("resuming %s at item %d", self.path, self.cursor_of(f))
        return f

    @staticmethod
    def cursor_of(f: h5py.File) -> int:
        return int(f.attrs.get("cursor", 0))

    def _create(self, compression: str) -> h5py.File:
        f = h5py.File(self.path, "w")
        s = self.size
        f.attrs.update(format=FORMAT, plan_id=self.plan_id, size=s, complete=False, cursor=0)
        f.create_dataset(
            "images", shape=(0, s, s, 3), maxshape=(None, s, s, 3), dtype=np.uint8,
            chunks=(1, s, s, 3), **compression_kwargs(compression),
        )
        for name, dt in ROW_FIELDS.items():
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(4096,))
        for name in SKIP_FIELDS:
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_STR, chunks=(1024,))
        f.flush()
        return f

    # -- state -----------------------------------------------------------------------------
    @property
    def cursor(self) -> int:
        """Number of plan items already handled (written or skipped)."""
        return self.cursor_of(self.f)

    @property
    def n_rows(self) -> int:
        return int(self.f["images"].shape[0])

    def done_paths(self) -> list[str]:
        return list(self.f["paths"].asstr()[:])

    # -- writing ---------------------------------------------------------------------------
    def append(
        self,
        images: np.ndarray | Sequence[EncodedImage],
        labels: Sequence[int],
        paths: Sequence[str],
        stain_ok: Sequence[bool],
        groups: Sequence[str],
        source_splits: Sequence[str],
        source_sha256: Sequence[str],
        notes: Sequence[str] | None = None,
    ) -> None:
        """Append B rows. images: (B, S, S, 3) uint8, or B `EncodedImage`s from `encode_image`
        (compressed by the caller, e.g. in worker processes; written as raw chunks)."""
        b = len(images)
        if b == 0:
            return
        encoded = isinstance(images[0], EncodedImage)
        if encoded:
            self._check_encoded(images)
        else:
            images = np.asarray(images)
            if images.shape[1:] != (self.size, self.size, 3) or images.dtype != np.uint8:
                raise ValueError(f"images must be (B, {self.size}, {self.size}, 3) uint8, got "
                                 f"{images.shape} {images.dtype}")
        cols = {"labels": labels, "paths": paths, "stain_ok": stain_ok, "group": groups,
                "source_split": source_splits, "source_sha256": source_sha256,
                "note": notes if notes is not None else [""] * b}
        n = self.n_rows
        ds = self.f["images"]
        ds.resize(n + b, axis=0)
        if encoded:
            for k, e in enumerate(images):
                ds.id.write_direct_chunk((n + k, 0, 0, 0), e.data, filter_mask=e.filter_mask)
        else:
            ds[n:] = images
        for name, values in cols.items():
            if len(values) != b:
                raise ValueError(f"{name}: {len(values)} values for {b} images")
            ds = self.f[name]
            ds.resize(n + b, axis=0)
            ds[n:] = np.asarray(values, dtype=object if ds.dtype == _STR else ds.dtype)

    def _check_encoded(self, images: Sequence[EncodedImage]) -> None:
        want = (self.size, self.compression)
        for e in images:
            if (e.size, e.compression) != want:
                raise ValueError(f"encoded image is {(e.size, e.compression)}, store wants {want}")

    def add_skipped(self, items: Sequence[tuple[str, str]]) -> None:
        """Record (path, reason) pairs of source files that could not be used."""
        if not items:
            return
        for name, values in zip(SKIP_FIELDS, zip(*items)):
            ds = self.f[name]
            n = ds.shape[0]
            ds.resize(n + len(values), axis=0)
            ds[n:] = np.asarray(values, dtype=object)

    def skipped(self) -> list[tuple[str, str]]:
        return list(zip(self.f["skipped_paths"].asstr()[:], self.f["skipped_reasons"].asstr()[:]))

    def commit(self, cursor: int) -> None:
        """Record that plan items [0, cursor) are handled and flush to disk.

        Row and skip counts are recorded with the cursor: rows appended after the last commit
        (an interruption between append and commit) are dropped on resume.
        """
        self.f.attrs["committed_rows"] = self.n_rows
        self.f.attrs["committed_skipped"] = int(self.f["skipped_paths"].shape[0])
        self.f.attrs["cursor"] = int(cursor)
        self.f.flush()

    def _truncate_to_commit(self) -> None:
        rows = int(self.f.attrs.get("committed_rows", 0))
        skipped = int(self.f.attrs.get("committed_skipped", 0))
        for name in ("images", *ROW_FIELDS):
            if self.f[name].shape[0] != rows:
                self.f[name].resize(rows, axis=0)
        for name in SKIP_FIELDS:
            if self.f[name].shape[0] != skipped:
                self.f[name].resize(skipped, axis=0)

    def get_meta(self, key: str) -> Any:
        """A JSON attribute of the partial store (e.g. the chosen template), None when absent."""
        v = self.f.attrs.get(f"meta_{key}")
        return None if v is None else json.loads(v)

    def set_meta(self, key: str, value: Any) -> None:
        self.f.attrs[f"meta_{key}"] = _jdump(value)
        self.f.flush()

    def finalize(self, class_names: Sequence[str], provenance: dict, settings: dict) -> str:
        """Write class names, provenance and content id, then set `complete` (last). Returns the id."""
        labels = self.f["labels"][:]
        sha = self.f["source_sha256"].asstr()[:]
        content_id = compute_content_id(sha, labels, settings)
        self.f.attrs["class_names"] = _jdump(list(class_names))
        self.f.attrs["provenance"] = _jdump(provenance)
        self.f.attrs["content_id"] = content_id
        self.f.flush()
        self.f.attrs["complete"] = True
        self.f.flush()
        return content_id

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_split(path: str | Path, fold: np.ndarray, info: dict) -> None:
    """Store the split: fold (N,) int8 (-1 test, 0..F-1 CV fold, -2 unused) and its settings."""
    path = Path(path)
    open_store(path)  # refuses missing / incomplete stores
    try:
        f = h5py.File(path, "a")
    except OSError as e:
        raise WbcError(f"cannot open {path} for writing ({e}); close other readers of it first") from None
    with f:
        n = f["images"].shape[0]
        fold = np.asarray(fold, dtype=np.int8)
        if fold.shape != (n,):
            raise ValueError(f"fold must be ({n},), got {fold.shape}")
        if "fold" in f:
            del f["fold"]
        f.create_dataset("fold", data=fold)
        f.attrs["split"] = _jdump(info)


class ImageStore:
    """Reader. Metadata is loaded once; images come from a lazily opened, per-process h5py handle,
    so an ImageStore can be pickled into DataLoader workers (each opens its own handle)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._h5: h5py.File | None = None
        self._pid: int | None = None
        with self._open_file() as f:
            self._load_meta(f)

    def _open_file(self) -> h5py.File:
        if not self.path.exists():
            raise WbcError(f"image store not found: {self.path}; create it with `wbc prepare`")
        try:
            return h5py.File(self.path, "r")
        except OSError as e:
            raise WbcError(f"{self.path} is not a readable HDF5 image store ({e})") from None

    def _load_meta(self, f: h5py.File) -> None:
        if f.attrs.get("format") != FORMAT:
            raise WbcError(f"{self.path} is not a wbc image store (format {f.attrs.get('format')!r})")
        if not bool(f.attrs.get("complete", False)):
            raise WbcError(
                f"{self.path} is incomplete (an interrupted `wbc prepare`); rerun the same "
                "prepare command to resume it"
            )
        self.size = int(f.attrs["size"])
        self.compression: str = compression_of(f["images"])
        self.class_names: list[str] = json.loads(f.attrs["class_names"])
        self.provenance: dict = json.loads(f.attrs["provenance"])
        self.content_id: str = str(f.attrs["content_id"])
        self.split_info: dict | None = json.loads(f.attrs["split"]) if "split" in f.attrs else None
        self.labels: np.ndarray = f["labels"][:]
        self.stain_ok: np.ndarray = f["stain_ok"][:]
        self.paths: list[str] = list(f["paths"].asstr()[:])
        self.groups: list[str] = list(f["group"].asstr()[:])
        self.notes: list[str] = list(f["note"].asstr()[:])
        self.source_splits: list[str] = list(f["source_split"].asstr()[:])
        self._fold: np.ndarray | None = f["fold"][:] if "fold" in f else None
        self.skipped: list[tuple[str, str]] = list(
            zip(f["skipped_paths"].asstr()[:], f["skipped_reasons"].asstr()[:])
        )

    # -- lazy per-process handle -----------------------------------------------------------
    def _handle(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = self._open_file()  # a forked worker must not reuse the parent's handle
            self._pid = os.getpid()
        return self._h5

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_pid"] = None
        return state

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- data ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        """Image i: (S, S, 3) uint8 (one chunk read)."""
        return self._handle()["images"][int(i)]

    def images(self, idx: Sequence[int]) -> np.ndarray:
        """Several images: (len(idx), S, S, 3) uint8, in the order given."""
        ds = self._handle()["images"]
        return np.stack([ds[int(i)] for i in idx]) if len(idx) else np.zeros((0, self.size, self.size, 3), np.uint8)

    @property
    def is_split(self) -> bool:
        return self._fold is not None

    @property
    def folds(self) -> np.ndarray:
        """(N,) int8: -1 held-out test, 0..F-1 CV fold, -2 unused (unlabelled)."""
        if self._fold is None:
            raise WbcError(f"{self.path} has no split yet; run `wbc split {self.path}`")
        return self._fold

    @property
    def num_folds(self) -> int:
        f = self.folds
        return int(f.max()) + 1 if (f >= 0).any() else 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def indices(self, fold: int | str) -> np.ndarray:
        """Row indices (sorted) of CV fold `fold` (int) or of the held-out test ('test')."""
        code = TEST if fold == "test" else int(fold)
        return np.flatnonzero(self.folds == code)


def open_store(path: str | Path) -> ImageStore:
    """Open a complete store; WbcError for a missing, foreign or incomplete one."""
    return ImageStore(path)


def store_info(path: str | Path) -> dict:
    """Summary for `wbc info`: class counts per part (test, folds, unused), stain failures per
    class, skipped files, provenance and split settings. Plain JSON-able values."""
    s = open_store(path)
    y = s.labels
    parts: dict[str, np.ndarray] = {"all": np.ones(len(y), bool)}
    if s.is_split:
        parts["test"] = s.folds == TEST
        for k in range(s.num_folds):
            parts[f"fold{k}"] = s.folds == k
        if (s.folds == -2).any():
            parts["unused"] = s.folds == -2
    names = [*s.class_names, "(unlabelled)"] if (y < 0).any() else list(s.class_names)
    codes = [*range(len(s.class_names)), -1][: len(names)]
    counts = {p: [int(((y == c) & m).sum()) for c in codes] for p, m in parts.items()}
    fails = [int(((y == c) & ~s.stain_ok).sum()) for c in codes]
    return {"path": str(s.path), "n": len(s), "size": s.size, "compression": s.compression,
            "content_id": s.content_id,
            "classes": names, "counts": counts, "stain_failed": fails,
            "n_stain_failed": int((~s.stain_ok).sum()), "n_skipped": len(s.skipped),
            "skipped_reasons": _reason_counts(r for _, r in s.skipped),
            "split": s.split_info, "provenance": s.provenance}


def _reason_counts(reasons: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reasons:
        key = r.split(" (")[0]
        out[key] = out.get(key, 0) + 1
    return out
