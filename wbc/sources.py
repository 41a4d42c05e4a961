"""Labelled image sources for `wbc prepare`: ImageFolder tree, CSV manifest, WBCBench parquet.

A source lists its items up front (path, label, split, group) without decoding anything, and
records listing-time problems (non-image files, duplicates, missing labels, empty class folders)
as (path, reason) pairs for the skipped report. `iter_bytes(start)` then yields each item's raw
bytes, or a reason string when the file cannot be read; decoding happens in worker processes
(`decode_image`).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from wbc.errors import WbcError

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
WBCBENCH_CLASSES = ("BA", "BL", "BNE", "EO", "LY", "MMY", "MO", "MY", "PC", "PLY", "PMY", "SNE", "VLY")
WBCBENCH_COLUMNS = ("image", "image_id", "label", "wbcbench_split", "patient_hash")
# Split names a manifest may use; everything that is not test goes into the CV pool.
SPLIT_ALIASES = {"": "", "train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "dev": "val", "test": "test", "testing": "test"}


class ImageDecodeError(Exception):
    """The bytes are not a usable image (corrupt, truncated, not an image)."""


@dataclass(frozen=True)
class Item:
    path: str  # as given, relative to the source root (parquet: the row's image path or id)
    label: str | None  # None = unlabelled (stored for prediction, label -1)
    split: str = ""
    group: str = ""


@dataclass
class Source:
    kind: str
    root: Path
    items: list[Item]
    class_names: list[str]
    problems: list[tuple[str, str]] = field(default_factory=list)
    parquet_files: list[Path] = field(default_factory=list)
    parquet_rows: list[tuple[int, int]] = field(default_factory=list)  # (file, row) per item

    def iter_bytes(self, start: int = 0) -> Iterator[tuple[int, bytes | str]]:
        """(index, bytes) per item from `start`, or (index, reason) when it cannot be read."""
        if self.kind == "parquet":
            yield from _iter_parquet_bytes(self, start)
            return
        for i in range(start, len(self.items)):
            p = self.root / self.items[i].path
            try:
                yield i, p.read_bytes()
            except FileNotFoundError:
                yield i, "file not found"
            except OSError as e:
                yield i, f"unreadable file: {e.strerror or e}"


# -- decoding -------------------------------------------------------------------------------
def decode_image(data: bytes) -> tuple[np.ndarray, str]:
    """Decode to (H, W, 3) uint8 RGB and a note on any conversion ('' if none).

    Grayscale is replicated to RGB (note 'grayscale': no stain to normalise); RGBA is composited
    on white (transparent = background); 16-bit is scaled, not clipped, to 8 bits.
    """
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:  # pixel count past PIL's safety limit: skip, not abort
        raise ImageDecodeError(f"too large to decode safely (decompression bomb): {str(e)[:80]}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"corrupt image: {str(e)[:80]}") from None
    mode, note = im.mode, ""
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im).astype(np.float64)
        peak = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        g = np.clip(np.round(a * 255.0 / peak), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2), "grayscale (16-bit)"
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im, note = Image.alpha_composite(bg, im.convert("RGBA")), "alpha composited on white"
    if mode in ("L", "1", "F"):
        note = "grayscale"
    rgb = np.asarray(im.convert("RGB"))
    if rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise ImageDecodeError(f"image too small ({rgb.shape[1]}x{rgb.shape[0]})")
    return rgb, note


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, bicubic (aspect not kept: cells are near-square crops)."""
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))


def zoom_image(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Magnify the content by `factor` about the centre, keeping the frame size.

    Matches another microscope's or crop's scale to the training images' (`--zoom` of predict and
    external evaluation): factor < 1 zooms out, shrinking the image into a frame padded with the
    median colour of its border (the slide background); factor > 1 zooms in (centre crop).
    """
    if factor == 1.0:
        return rgb
    h, w = rgb.shape[:2]
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    scaled = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BICUBIC))
    if factor > 1.0:
        y, x = (nh - h) // 2, (nw - w) // 2
        return np.ascontiguousarray(scaled[y:y + h, x:x + w])
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    out = np.empty_like(rgb)
    out[:] = np.median(border, axis=0).astype(rgb.dtype)
    y, x = (h - nh) // 2, (w - nw) // 2
    out[y:y + nh, x:x + nw] = scaled
    return out


def check_zoom(factor: float) -> float:
    """A usable --zoom (0.05..20], else a one-line WbcError."""
    if not 0.05 <= factor <= 20:
        raise WbcError(f"--zoom must be between 0.05 and 20 (1 = as is, 0.5 = cells half as wide); got {factor}")
    return float(factor)


# -- listing --------------------------------------------------------------------------------
def open_source(source: str | Path) -> Source:
    """Dispatch on the path: a directory of class folders, a .csv manifest, or .parquet file(s)."""
    p = Path(source)
    if not p.exists():
        raise WbcError(f"source not found: {p}")
    if p.is_file() and p.suffix.lower() == ".csv":
        return from_manifest(p)
    if p.suffix.lower() == ".parquet" or (p.is_dir() and any(p.glob("*.parquet"))):
        return from_parquet(p)
    if p.is_dir():
        return from_image_folder(p)
    raise WbcError(f"{p}: expected a class-folder directory, a .csv manifest or .parquet file(s)")


def from_image_folder(root: Path) -> Source:
    """`root/<class>/<image>` (sub-folders inside a class are included); classes sorted by name."""
    items, problems, classes = [], [], []
    for d in sorted(x for x in root.iterdir() if x.is_dir() and not x.name.startswith(".")):
        files = sorted(f for f in d.rglob("*") if f.is_file())
        for f in sorted(f for f in d.rglob("*") if f.is_symlink() and not f.exists()):
            problems.append((f.relative_to(root).as_posix(), f"dangling symlink (target {os.readlink(f)} missing)"))
        if not files:
            problems.append((f"{d.name}/", "empty class folder: class dropped"))
            log.warning("class folder %s is empty: class %r dropped", d, d.name)
            continue
        n_images = 0
        for f in files:
            rel = f.relative_to(root).as_posix()
            if f.suffix.lower() not in IMAGE_EXTS:
                problems.append((rel, f"not an image file (extension {f.suffix or 'none'!r})"))
                continue
            items.append(Item(rel, d.name))
            n_images += 1
        if n_images:
            classes.append(d.name)
        else:
            problems.append((f"{d.name}/", "class folder has no image files: class dropped"))
    if not items:
        raise WbcError(f"{root}: no images found; expected class folders like {root}/<class>/<image>.jpg")
    return Source("folder", root, items, classes, problems)


def _norm_split(value: str, where: str) -> str:
    v = (value or "").strip().lower()
    if v not in SPLIT_ALIASES:
        raise WbcError(f"{where}: unknown split {value!r}; use train, val or test (or leave empty)")
    return SPLIT_ALIASES[v]


def from_manifest(csv_path: Path) -> Source:
    """CSV with columns image,label (+ optional split, group); image paths relative to the CSV."""
    from wbc.csvio import read_csv

    _, rows = read_csv(csv_path, ("image", "label"), "a manifest needs image,label (+ optional split, group)")
    items, problems, seen = [], [], {}
    for line, r in rows:
        path = r["image"]
        if not path:
            problems.append((f"<line {line}>", "empty image path"))
            continue
        if path in seen:
            problems.append((path, f"duplicate path (line {line}; first on line {seen[path]})"))
            continue
        seen[path] = line
        if not r["label"]:
            problems.append((path, f"no label in manifest (line {line})"))
            continue
        if Path(path).suffix.lower() not in IMAGE_EXTS:
            problems.append((path, f"not an image file (extension {Path(path).suffix or 'none'!r})"))
            continue
        split = _norm_split(r.get("split", ""), f"{csv_path}:{line}")
        items.append(Item(path, r["label"], split, r.get("group", "")))
    if not items:
        raise WbcError(f"{csv_path}: no usable rows (see problems: {problems[:3]})")
    classes = sorted({it.label for it in items if it.label is not None})
    return Source("manifest", csv_path.parent, items, classes, problems)


def from_parquet(path: Path) -> Source:
    """WBCBench 2026 parquet file(s): `patient_hash` is the group, `wbcbench_split` is kept, rows
    without a label are stored unlabelled (for prediction). Needs pyarrow (`pip install wbc[parquet]`)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise WbcError("reading parquet needs pyarrow: pip install 'wbc[parquet]'") from None
    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    items, problems, rows, seen = [], [], [], set()
    for fi, f in enumerate(files):
        try:
            pf = pq.ParquetFile(f)
        except (OSError, pa.ArrowException) as e:
            raise WbcError(f"{f}: not a readable parquet file ({e})") from None
        names = pf.schema_arrow.names
        missing = [c for c in WBCBENCH_COLUMNS if c not in names]
        if missing:
            raise WbcError(f"{f}: missing WBCBench column(s) {missing}; found {names}")
        t = pf.read(columns=["image_id", "label", "wbcbench_split", "patient_hash"]).to_pylist()
        for ri, r in enumerate(t):
            key = str(r["image_id"])
            if key in seen:
                problems.append((key, f"duplicate image_id ({f.name} row {ri})"))
                continue
            seen.add(key)
            label = r["label"] or None
            if label is not None and label not in WBCBENCH_CLASSES:
                problems.append((key, f"unknown label {label!r}; WBCBench classes: {', '.join(WBCBENCH_CLASSES)}"))
                continue
            items.append(Item(key, label, str(r["wbcbench_split"] or ""), str(r["patient_hash"] or "")))
            rows.append((fi, ri))
    if not items:
        raise WbcError(f"{path}: no usable rows in {len(files)} parquet file(s)")
    root = path.parent if path.is_file() else path
    return Source("parquet", root, items, list(WBCBENCH_CLASSES), problems, files, rows)


def _iter_parquet_bytes(src: Source, start: int) -> Iterator[tuple[int, bytes | str]]:
    import pyarrow.parquet as pq

    wanted: dict[tuple[int, int], int] = {fr: i for i, fr in enumerate(src.parquet_rows) if i >= start}
    out: dict[int, bytes | str] = {}
    nxt = start
    for fi, f in enumerate(src.parquet_files):
        row = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=256, columns=["image"]):
            for cell in batch.column(0).to_pylist():
                i = wanted.get((fi, row))
                row += 1
                if i is None:
                    continue
                data = (cell or {}).get("bytes")
                out[i] = data if data else "no image bytes in parquet row"
            while nxt in out:  # items are in file/row order, so this yields in index order
                yield nxt, out.pop(nxt)
                nxt += 1
