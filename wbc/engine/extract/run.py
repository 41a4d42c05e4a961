"""`wbc extract`: embed every image of a store with a frozen Stage-1 backbone under K views, once.

Per row block (R rows, one chunk of the cache): a loader worker reads the stored images, applies
an optional image transform (degradations, for named variant groups), crops them once with the
Stage-1 eval geometry (`wbc.data.crop_images`) and hands a pinned uint8 batch over; on the
device the batch is normalised, expanded into its K views (`wbc.views`), embedded under
`inference_mode` (AMP and channels_last on CUDA) and its rows are checked for NaN/inf; a writer
thread stores the block while the next one is computed. Blocks already flagged done are skipped,
so an interrupted run resumes; under torchrun each rank takes blocks b % world == rank.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Self

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wbc import __version__
from wbc.backbones import embed, load_checkpoint
from wbc.cache import block_rows, done_blocks, mark_complete, open_for_writing, write_rows
from wbc.config import file_sha256, to_dict
from wbc.data import crop_images
from wbc.device import amp_dtype
from wbc.embed import embed_block
from wbc.engine.distributed import DistEnv, setup
from wbc.engine.extract.config import ExtractConfig
from wbc.engine.extract.plan import check_pairing, prepare_output, resolve_checkpoint, row_table
from wbc.errors import WbcError
from wbc.fsutil import check_writable, output_lock
from wbc.log import progress
from wbc.store import ImageStore, open_store
from wbc.views import resolve_views

log = logging.getLogger(__name__)

# images (B, S, S, 3) uint8, store rows (B,) int64 -> images (B, S, S, 3) uint8. Rows let a
# transform seed its randomness per image, so resumed and sharded runs give the same pixels.
ImageFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def extract(
    source: str | Path,
    store: str | Path | ImageStore,
    out: str | Path,
    cfg: ExtractConfig | None = None,
    *,
    group: str | None = None,
    image_fn: ImageFn | None = None,
    image_transform: str | None = None,
    rows: Sequence[int] | None = None,
) -> dict:
    """Extract features of `store` rows (default: all) with the checkpoint at `source`.

    source: best.pt, a fold directory holding it, or a run root with a single fold.
    group/image_fn/image_transform: write into the named group `variants/<group>` of `out`
    the features of images passed through image_fn (image_transform names it for provenance).
    Returns a summary (path, rows, views, dim, blocks written, timings).
    """
    cfg = cfg or ExtractConfig()
    check_writable(out, "feature cache")
    if (image_fn is None) != (image_transform is None):
        raise ValueError("image_fn and image_transform (its name, for provenance) go together")
    ckpt = resolve_checkpoint(source)
    st = store if isinstance(store, ImageStore) else open_store(store)
    views = resolve_views(cfg.views)
    d = setup(cfg.device)
    held = contextlib.ExitStack()
    try:
        d.checked(lambda: _claim(Path(out), held), main_only=True)
        with held, torch.inference_mode():
            return _run(ckpt, st, Path(out), cfg, views, d, group, image_fn, image_transform, rows)
    except OSError as e:  # creating the store or marking it complete; block writes say it themselves
        if e.errno == errno.ENOSPC:
            raise WbcError(f"disk full while writing {out}: free space and rerun the same command "
                           "(written blocks are kept)") from None
        raise
    finally:
        d.close()


def _claim(out: Path, held: contextlib.ExitStack) -> None:
    """No other process may be writing `out`: the lock is held until the cache is complete, so
    an --overwrite elsewhere cannot interleave its blocks with ours."""
    held.enter_context(output_lock(out))


def _run(ckpt, st, out, cfg, views, d: DistEnv, group, image_fn, image_transform, rows) -> dict:
    t0 = time.perf_counter()
    model, meta = load_checkpoint(ckpt, d.device)
    check_pairing(meta, st, ckpt, cfg.other_store)
    rows, labels, fold = row_table(st, rows, cfg.other_store)
    dc = meta["data_config"]
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp = amp_dtype(d.device, cfg.amp)
    dim = int(embed(model, torch.zeros(1, *dc["input_size"], device=d.device)).shape[1])
    shape = (len(rows), len(views), dim, len(st.class_names))
    d.checked(lambda: prepare_output(
        out, group, _attrs(ckpt, meta, st, views, image_transform, amp, d, cfg), shape,
        rows, labels, fold, cfg.chunk_rows, cfg.overwrite), main_only=True)
    g = open_for_writing(out, group)
    done = done_blocks(g)
    mine = [b for b in range(len(done)) if b % d.world == d.rank and not done[b]]
    if d.is_main:
        log.info("extracting %d rows x %d views (%s, dim %d) on %s into %s%s", len(rows), len(views),
                 meta["timm_name"], dim, d.device, out, f" [{group}]" if group else "")
        if done.any():
            log.info("resuming: %d of %d row blocks already written", int(done.sum()), len(done))
    timing = d.checked(
        lambda: _extract_blocks(model, g, st, rows, mine, dc, views, cfg, amp, d, image_fn, out))
    per_rank = d.gather(timing)
    wall = time.perf_counter() - t0
    timings = _merge_timings(per_rank, wall, len(views))
    d.checked(lambda: mark_complete(g, timings=timings), main_only=True)
    if d.is_main:
        log.info("wrote %s: %d images in %.1f s (%.1f images/s, %.1f views/s)", out,
                 timings["images"], wall, timings["images_per_s"], timings["views_per_s"])
    return {"path": str(out), "group": group, "rows": len(rows), "views": views, "dim": dim,
            "blocks_written": sum(t["blocks"] for t in per_rank), "blocks": len(done),
            "timings": timings}


def _attrs(ckpt, meta, st, views, image_transform, amp, d: DistEnv, cfg) -> dict:
    """Provenance of the cache: what it was made from and how."""
    return {
        "backbone": meta["timm_name"], "backbone_alias": meta.get("alias"),
        "checkpoint_sha256": file_sha256(ckpt), "checkpoint_path": str(ckpt),
        "checkpoint_fold": meta.get("fold"), "checkpoint_epoch": meta.get("epoch"),
        "checkpoint_store_content_id": meta.get("store_content_id"),
        "store_content_id": st.content_id, "store_path": str(st.path),
        "views": views, "class_names": list(st.class_names), "data_config": meta["data_config"],
        "image_transform": image_transform, "wbc_version": __version__,
        "amp": str(amp).replace("torch.", "") if amp else None, "device": d.device.type,
        "config": to_dict(cfg), "created": dt.datetime.now().isoformat(timespec="seconds"),
        # what ran, beside what was asked in `config` (amp is asked; only CUDA runs it)
        "ran": {"device": str(d.device), "amp": amp is not None,  # processes: timings["ranks"]
                "dtype": str(amp or torch.float32).replace("torch.", ""), "features_dtype": "float16",
                "channels_last": cfg.channels_last,
                "torch": torch.__version__.split("+")[0]},
    }


def _merge_timings(per_rank: list[dict], wall: float, k: int) -> dict:
    images = sum(t["images"] for t in per_rank)
    keys = ("first_wait_s", "load_wait_s", "forward_s", "write_s", "loop_s", "loop_cpu_s")
    return {
        "total_s": round(wall, 3), "ranks": len(per_rank), "images": images, "views": images * k,
        "images_per_s": round(images / wall, 2), "views_per_s": round(images * k / wall, 2),
        **{key: round(max(t.get(key, 0.0) for t in per_rank), 3) for key in keys},
    }


class _Blocks(Dataset):
    """Item i = (block id, uint8 crops (M, 3, h, w)) of the i-th row block to extract."""

    def __init__(self, store, rows, blocks, rows_per_chunk, data_config, image_fn):
        self.store, self.rows, self.blocks = store, rows, blocks
        self.r, self.dc, self.image_fn = rows_per_chunk, data_config, image_fn

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        b = self.blocks[i]
        rows = self.rows[b * self.r: (b + 1) * self.r]
        images = self.store.images(rows)
        if self.image_fn is not None:
            out = self.image_fn(images, rows)
            if out.shape != images.shape or out.dtype != np.uint8:
                raise ValueError(f"image_fn returned {out.shape} {out.dtype}, want {images.shape} uint8")
            images = out
        return b, crop_images(images, self.dc).contiguous()


def _extract_blocks(model, g, st, rows, mine, dc, views, cfg, amp, d: DistEnv, image_fn, out) -> dict:
    cuda = d.device.type == "cuda"
    r = int(g.attrs["rows_per_chunk"])
    workers = cfg.workers if cfg.workers >= 0 else (min(8, os.cpu_count() or 1) if cuda else 0)
    loader = DataLoader(
        _Blocks(st, rows, mine, r, dc, image_fn), batch_size=None, shuffle=False,
        num_workers=workers, pin_memory=cuda, prefetch_factor=4 if workers else None,
    )
    bs = cfg.batch_size or (32 if cuda else 8)
    t = {"images": 0, "blocks": 0, "load_wait_s": 0.0, "forward_s": 0.0, "write_s": 0.0}
    n_mine = sum(min(len(rows), (b + 1) * r) - b * r for b in mine)
    t_loop, cpu_loop = time.perf_counter(), _cpu_seconds()
    bar = progress()
    bar.disable = bar.disable or not d.is_main
    with bar, _Writer(g, out) as writer:
        task = bar.add_task("extract", total=n_mine, info=f"{len(views)} views")
        it = iter(loader)
        while True:
            t1 = time.perf_counter()
            item = next(it, None)
            t2 = time.perf_counter()
            t["load_wait_s"] += t2 - t1
            t.setdefault("first_wait_s", t2 - t1)  # worker start-up + first read: not steady state
            if item is None:
                break
            b, crops = item
            feats, logits = embed_block(model, crops, dc, views, bs, amp, d.device, cfg.channels_last)
            t["forward_s"] += time.perf_counter() - t2
            start, stop = block_rows(g, b)
            _check_finite(feats, logits, rows[start:stop], st)
            writer.submit(start, feats, logits)
            t["images"] += stop - start
            t["blocks"] += 1
            bar.advance(task, stop - start)
    t["write_s"] = writer.seconds
    t["loop_s"] = time.perf_counter() - t_loop
    t["loop_cpu_s"] = _cpu_seconds() - cpu_loop  # the loader's workers have exited: counted too
    return t


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (loader workers): robust to time-slicing."""
    try:
        import resource
    except ImportError:  # Windows
        return time.process_time()
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + r.ru_utime + r.ru_stime


def _check_finite(feats: np.ndarray, logits: np.ndarray, store_rows: np.ndarray, st) -> None:
    bad = ~(np.isfinite(feats).all(axis=(1, 2)) & np.isfinite(logits).all(axis=(1, 2)))
    if bad.any():
        rows = store_rows[bad]
        names = ", ".join(st.paths[i] for i in rows[:3])
        raise WbcError(
            f"non-finite (NaN/inf) embeddings for {len(rows)} image(s): store rows "
            f"{rows[:10].tolist()} ({names}); the checkpoint may have diverged, or values overflow "
            "float16 (try --no-amp). Nothing was marked complete; earlier blocks are kept"
        )


class _Writer:
    """Writes row blocks on one background thread, at most `depth` blocks behind the compute."""

    def __init__(self, g, out: Path, depth: int = 2):
        self.g, self.out, self.depth = g, out, depth
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="cache-writer")
        self.pending: deque[Future] = deque()
        self.seconds = 0.0

    def submit(self, start: int, feats: np.ndarray, logits: np.ndarray) -> None:
        while len(self.pending) >= self.depth:
            self._wait(self.pending.popleft())
        self.pending.append(self.pool.submit(self._write, start, feats, logits))

    def _write(self, start: int, feats: np.ndarray, logits: np.ndarray) -> None:
        t = time.perf_counter()
        write_rows(self.g, start, feats, logits)
        self.seconds += time.perf_counter() - t

    def _wait(self, fut: Future) -> None:
        try:
            fut.result()
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise WbcError(f"disk full while writing {self.out}: written blocks are kept; free "
                               "space and rerun the same command to resume") from None
            raise WbcError(f"cannot write {self.out}: {e}") from None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            while self.pending:  # finish in-flight blocks even when stopping: they are whole
                fut = self.pending.popleft()
                if exc_type is None:
                    self._wait(fut)
                else:
                    fut.exception()
        finally:
            self.pool.shutdown(wait=True)
