"""`prepare_store`: source images -> Macenko-normalised, resized HDF5 store (resumable).

Pipeline per image (in worker threads for the batched backend, `wbc.prepare_batch`; in worker
processes for torchstain): decode to RGB, normalise onto the template at source
resolution, resize to S x S (bicubic), compress, sha256 of the source bytes. The main thread reads
bytes, writes rows in plan order and commits a cursor every `commit_every` items, so an interrupted
run resumes where it stopped. The batched backend on the CPU imports no torch (`wbc.stain_np`; its
template estimate too): the process starts in ~0.5 s instead of ~3.5 s.

Template `auto`: the stain matrix of every candidate (items the source marks `train`, else all
non-test items, else all; labels unused; a seeded uniform subsample of at most
`max_template_candidates`) is estimated and the image whose matrix is the medoid (least summed
angle to all others) becomes the template.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import h5py
import numpy as np

from wbc import __version__
from wbc.errors import WbcError
from wbc.fsutil import atomic_write, check_writable, output_lock
from wbc.log import progress
from wbc.sources import ImageDecodeError, Source, decode_image, open_source, resize_square
from wbc.stain import (
    BACKENDS,
    StainError,
    StainNormalizer,
    StainParams,
    estimate_stain,
    medoid,
    try_normalize,
)
from wbc.store import (
    DEFAULT_COMPRESSION,
    EncodedImage,
    StoreWriter,
    check_compression,
    encode_image,
    open_store,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareConfig:
    size: int = 368  # the method resizes to 368 and centre-crops 224 at train time
    stain: bool = True  # False = resized originals (the Macenko on/off ablation)
    template: str = "auto"  # "auto" (medoid of candidates' stain matrices) or a reference image path
    max_template_candidates: int = 500  # medoid of 500 is stable; estimating all costs a full pass
    seed: int = 0  # candidate subsample
    workers: int = -1  # threads (batched) or processes (torchstain); -1 = all CPUs (up to 8), 0 = in-process
    compression: str = DEFAULT_COMPRESSION  # zstd: faster than lzf both ways, smaller (wbc.store)
    commit_every: int = 64  # items per flush: the most an interruption can lose
    stain_backend: str = "batched"  # wbc.stain_batch on `device` (threads) | "torchstain" (per image, processes)
    device: str = "auto"  # where the batched backend normalises: auto (cuda, mps, cpu), cpu, cuda:1, ...

    def __post_init__(self) -> None:  # checked here, so CLI and Python callers fail before any work
        for name, low in (("size", 16), ("max_template_candidates", 1), ("commit_every", 1)):
            if getattr(self, name) < low:
                raise WbcError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        if self.workers < -1:
            raise WbcError(f"--workers must be -1 (all CPUs), 0 (in this process) or more, got {self.workers}")
        check_compression(self.compression)
        if self.stain_backend not in BACKENDS:
            raise WbcError(f"unknown --stain-backend {self.stain_backend!r}; choose from {', '.join(BACKENDS)}")
        if self.stain_backend == "torchstain" and self.device not in ("auto", "cpu"):
            raise WbcError("--device applies to --stain-backend batched; torchstain runs on the CPU")


@dataclass
class PrepareReport:
    out: Path
    n_items: int
    n_written: int
    n_skipped: int
    n_stain_failed: int
    stain_failures: dict[str, int]
    template: dict | None
    seconds: float
    images_per_s: float
    resumed_from: int
    skipped_csv: Path
    content_id: str = ""
    notes: dict[str, int] = field(default_factory=dict)
    template_seconds: float = 0.0  # the template pass (part of `seconds`)


# spawn: forking after torch has used OpenMP threads in this process can deadlock the children.
START_METHOD = "spawn"


# -- worker side ------------------------------------------------------------------------------
_NORMALIZERS: dict[tuple, StainNormalizer] = {}


def _init_worker(parent: int | None = None) -> None:
    import torch

    torch.set_num_threads(1)  # parallelism comes from processes; threads would oversubscribe
    # Ctrl-C goes to the whole process group: let the parent alone handle it (commit, shut down).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The parent's pid comes from the parent: it may have died while this worker imported torch.
    _exit_with_parent(parent or os.getppid())


def _init_forked(parent: int) -> None:
    """A forked worker of the batched CPU path: numpy, PIL and h5py only (no torch to set up)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent)


def _exit_with_parent(parent: int, every_s: float = 0.5) -> None:
    """A worker must not outlive its parent (kill -9 of `wbc prepare` would leave it running):
    a daemon thread exits the process once it has been re-parented."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _estimator(backend: str):
    """The template's stain estimate: torchstain's for that backend, else numpy's (the batched
    backend's CPU path, no torch import; the same within 1e-3)."""
    if backend == "torchstain":
        return estimate_stain
    from wbc.stain_np import estimate

    return estimate


def _estimate_task(task: tuple[int, bytes | str], backend: str = "torchstain") -> tuple[int, list | None, list | None, str]:
    i, payload = task
    if isinstance(payload, str):
        return i, None, None, payload
    try:
        rgb, note = decode_image(payload)
        if note.startswith("grayscale"):
            return i, None, None, note
        he, max_c = _estimator(backend)(rgb)
        return i, he.tolist(), max_c.tolist(), ""
    except (ImageDecodeError, StainError) as e:
        return i, None, None, str(e)


def _prepare_task(task: tuple[int, bytes | str, tuple]) -> tuple[int, EncodedImage | None, bool, str, str]:
    """-> (index, stored image as a compressed chunk or None if skipped, stain_ok, sha256,
    note or skip reason)."""
    i, payload, (size, stain, compression) = task
    if isinstance(payload, str):
        return i, None, False, "", payload
    sha = hashlib.sha256(payload).hexdigest()
    try:
        rgb, note = decode_image(payload)
    except ImageDecodeError as e:
        return i, None, False, sha, str(e)
    ok = True
    if stain is not None:
        if note.startswith("grayscale"):
            ok, note = False, f"{note}: no stain to normalise"
        else:
            norm = _NORMALIZERS.get(stain)
            if norm is None:
                he, max_c, params = stain
                norm = _NORMALIZERS[stain] = StainNormalizer(he, max_c, StainParams(*params))
            rgb, ok, reason = try_normalize(norm, rgb)
            note = reason if not ok else note
    return i, encode_image(resize_square(rgb, size), compression), ok, sha, note


def _imap(pool: ProcessPoolExecutor | None, fn, tasks, window: int = 64):
    """Ordered map with at most `window` tasks in flight (Pool.imap would read every source
    image into its queue up front). A worker that dies raises BrokenProcessPool, never a hang."""
    if pool is None:
        yield from map(fn, tasks)
        return
    pending: deque = deque()
    for t in tasks:
        pending.append(pool.submit(fn, t))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# -- main side --------------------------------------------------------------------------------
def _plan_id(src: Source, cfg: PrepareConfig) -> str:
    h = hashlib.sha256()
    for it in src.items:
        h.update(f"{it.path}\t{it.label}\t{it.split}\t{it.group}\n".encode())
    keys = ("size", "stain", "template", "max_template_candidates", "seed")
    plan = {k: getattr(cfg, k) for k in keys}
    if cfg.stain:  # a store is not resumed with other Macenko settings (the clamp, the backend)
        plan["stain_params"] = asdict(StainParams())
        plan["stain_backend"] = cfg.stain_backend
    h.update(json.dumps(plan, sort_keys=True).encode())
    return h.hexdigest()[:16]


def template_candidates(src: Source, limit: int, seed: int) -> tuple[list[int], int]:
    """Indices of template candidates (see module doc) and the pool size they were drawn from."""
    splits = [it.split.lower() for it in src.items]
    pool = [i for i, s in enumerate(splits) if s == "train"]
    pool = pool or [i for i, s in enumerate(splits) if s != "test"] or list(range(len(splits)))
    if len(pool) <= limit:
        return pool, len(pool)
    pick = np.random.default_rng(seed).choice(len(pool), size=limit, replace=False)
    return sorted(pool[j] for j in pick), len(pool)


def choose_template(src: Source, cfg: PrepareConfig, pool) -> dict:
    """Template record: stain matrix, max concentrations, which image, how it was chosen."""
    if cfg.template != "auto":
        p = Path(cfg.template)
        if not p.is_file():
            raise WbcError(f"template image not found: {p}; give an image path or --template auto")
        try:
            rgb, _ = decode_image(p.read_bytes())
            he, max_c = _estimator(cfg.stain_backend)(rgb)
        except (ImageDecodeError, StainError) as e:
            raise WbcError(f"template {p} cannot be used: {e}; choose another image") from None
        return {"spec": str(p), "path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                "stain_matrix": he.tolist(), "max_conc": max_c.tolist()}
    cand, pool_size = template_candidates(src, cfg.max_template_candidates, cfg.seed)
    wanted = set(cand)

    def tasks():
        for i, b in src.iter_bytes(cand[0]):
            if i in wanted:
                yield i, b
            if i >= cand[-1]:
                return

    found: dict[int, tuple[list, list]] = {}
    with progress() as bar:
        task = bar.add_task("template", total=len(cand), info="")
        for i, he, max_c, _ in _imap(pool, partial(_estimate_task, backend=cfg.stain_backend), tasks()):
            if he is not None:
                found[i] = (he, max_c)
            bar.advance(task)
    if not found:
        raise WbcError("no template candidate gives a Macenko estimate (blank or unstained images?); "
                       "use --template PATH or --no-stain")
    idx = sorted(found)
    m, mean_angle = medoid([found[i][0] for i in idx])
    best = idx[m]
    log.info("template: %s (medoid of %d stain matrices, mean angle %.2f deg)",
             src.items[best].path, len(idx), mean_angle)
    return {"spec": "auto", "path": src.items[best].path, "index": best,
            "stain_matrix": found[best][0], "max_conc": found[best][1],
            "candidates": len(cand), "candidates_failed": len(cand) - len(idx),
            "candidate_pool": pool_size, "seed": cfg.seed, "medoid_mean_angle_deg": mean_angle}


def prepare_store(source: str | Path, out: str | Path, cfg: PrepareConfig = PrepareConfig(),
                  overwrite: bool = False) -> PrepareReport:
    """Build (or resume) the image store `out` from `source`; see the module doc."""
    t0 = time.perf_counter()
    out = check_writable(out, "image store")
    src = open_source(source)
    with output_lock(out):  # a second prepare of `out` is refused, even with --overwrite
        return _prepare_locked(src, out, cfg, overwrite, t0)


def _prepare_locked(src: Source, out: Path, cfg: PrepareConfig, overwrite: bool, t0: float) -> PrepareReport:
    workers = min(os.cpu_count() or 1, 8) if cfg.workers < 0 else cfg.workers
    device = prepare_device(cfg.device)  # an unavailable device fails here, before any output exists
    label_index = {c: k for k, c in enumerate(src.class_names)}
    plan_id = _plan_id(src, cfg)
    done = None if overwrite else _complete_report(out, plan_id, len(src.items))
    if done is not None:
        return done
    # An unusable --template image is refused before any output file exists.
    given_tpl = choose_template(src, cfg, None) if cfg.stain and cfg.template != "auto" else None
    torch_here = cfg.stain and (cfg.stain_backend == "torchstain" and workers == 0
                                or cfg.stain_backend == "batched" and device != "cpu")
    # The pool first: forked workers must not inherit the open store.
    with _pool_ctx(workers, _pool_kind(cfg, device, workers), torch_here=torch_here) as pool, \
            StoreWriter(out, size=cfg.size, plan_id=plan_id, compression=cfg.compression, overwrite=overwrite) as w:
        start = w.cursor
        if w.get_meta("listed") is None:
            w.add_skipped(src.problems)
            w.commit(0)
            w.set_meta("listed", True)
        tpl = w.get_meta("template")
        t_tpl = time.perf_counter()
        if cfg.stain and tpl is None:
            tpl = given_tpl or choose_template(src, cfg, pool)
            w.set_meta("template", tpl)
        t_tpl = time.perf_counter() - t_tpl
        stain_key = None
        if cfg.stain:
            stain_key = (tuple(map(tuple, tpl["stain_matrix"])), tuple(tpl["max_conc"]),
                         tuple(asdict(StainParams()).values()))
        if w.compression != check_compression(cfg.compression):
            log.info("%s was started with %s compression: resuming with it, not %s", out, w.compression,
                     cfg.compression)
        job = (cfg.size, stain_key, w.compression)
        _write_rows(w, src, label_index, _row_runner(cfg, pool, job, device), cfg.commit_every, start)
        report, skipped = _finish(w, src, cfg, tpl, t0, start)
        report.template_seconds = t_tpl
    _write_skipped_csv(report.skipped_csv, skipped)
    return report


def _complete_report(out: Path, plan_id: str, n_items: int) -> PrepareReport | None:
    """The report of an existing complete store built by the same plan (rerunning is a no-op)."""
    try:
        with h5py.File(out, "r") as f:
            same = bool(f.attrs.get("complete", False)) and f.attrs.get("plan_id") == plan_id
    except OSError:
        return None  # missing or unreadable: StoreWriter decides
    if not same:
        return None
    s = open_store(out)
    p = s.provenance
    log.info("%s is already complete for this source and settings; nothing to do", out)
    return PrepareReport(
        out=out, n_items=n_items, n_written=len(s), n_skipped=len(s.skipped),
        n_stain_failed=int((~s.stain_ok).sum()) if p.get("stain") == "macenko" else 0,
        stain_failures=p.get("stain_failures", {}), template=p.get("template"), seconds=0.0,
        images_per_s=0.0, resumed_from=n_items, skipped_csv=skipped_csv_path(out),
        content_id=s.content_id, notes=p.get("notes", {}))


def _gpu_possible() -> bool:
    """Whether torch could find a GPU here, judged without importing torch (~3 s, more than
    preparing a few hundred images): CUDA needs the NVIDIA driver's device nodes (/dev/dxg under
    WSL), ROCm /dev/kfd, mps macOS."""
    return sys.platform == "darwin" or any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg"))


def prepare_device(spec: str) -> str:
    """Where the batched backend normalises: 'cpu' (numpy), or the torch device `spec` resolves to."""
    if spec == "cpu" or (spec == "auto" and not _gpu_possible()):
        return "cpu"
    from wbc.device import resolve_device

    return str(resolve_device(spec))


def _row_runner(cfg: PrepareConfig, pool, job: tuple, device: str):
    """tasks (index, bytes or problem) -> rows (index, stored chunk or None, stain_ok, sha, note)."""
    if cfg.stain_backend == "batched":
        from wbc.prepare_batch import batch_size_for, batched_rows

        size, stain, compression = job
        norm = None
        if stain and device == "cpu":
            from wbc.stain_np import NumpyMacenko

            norm = NumpyMacenko(*map(np.asarray, stain[:2]), StainParams(*stain[2]))
        elif stain:
            from wbc.stain_batch import BatchMacenko

            norm = BatchMacenko(*map(np.asarray, stain[:2]), StainParams(*stain[2]), device)
        return lambda tasks: batched_rows(pool, tasks, norm, size, compression, batch_size_for(device))
    return lambda tasks: _imap(pool, _prepare_task, ((i, b, job) for i, b in tasks))


def _pool_kind(cfg: PrepareConfig, device: str, workers: int) -> str:
    """'spawn' processes for torchstain (torch in each); for the batched backend 'fork' on the CPU
    (numpy only: nothing to re-import, and each process compresses under its own HDF5 lock, where
    threads share h5py's one), else 'threads' (a GPU: one torch, in this process)."""
    if cfg.stain_backend != "batched":
        return "spawn"
    if device == "cpu" and workers > 1 and "fork" in mp.get_all_start_methods():
        return "fork"
    return "threads"


class _pool_ctx:
    """A worker pool of `kind` (None for in-process work) that is shut down on any exit."""

    def __init__(self, workers: int, kind: str = "spawn", torch_here: bool = False):
        self.pool = None
        self.threads = None
        if workers == 0 or kind == "threads":
            if torch_here:
                # In-process torch: one thread, as in a worker. With more, OpenMP threads spin on a
                # busy machine (measured: 3x the CPU per image on 2 shared cores).
                import torch

                self.threads = torch.get_num_threads()
                torch.set_num_threads(1)
            if workers:
                self.pool = ThreadPoolExecutor(workers, thread_name_prefix="wbc-prepare")
            return
        fork = kind == "fork"
        ctx = mp.get_context("fork" if fork else START_METHOD)
        init = _init_forked if fork else _init_worker
        self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=init, initargs=(os.getpid(),))
        # Start the workers now with SIGINT ignored (inherited): Ctrl-C during their slow start
        # (importing torch) must reach only this process, which commits and shuts down cleanly.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for _ in range(workers):  # with spawn, each submit starts one worker while none is idle
                self.pool.submit(int)
        finally:
            signal.signal(signal.SIGINT, old)

    def __enter__(self) -> ProcessPoolExecutor | None:
        return self.pool

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)


def _write_rows(w: StoreWriter, src: Source, label_index: dict, run, commit_every: int, start: int) -> None:
    n = len(src.items)
    rows: list = []
    skipped: list[tuple[str, str]] = []

    def flush(cursor: int) -> None:
        if rows:
            its = [src.items[r[0]] for r in rows]
            w.append([r[1] for r in rows],
                     [label_index[it.label] if it.label is not None else -1 for it in its],
                     [it.path for it in its], [r[2] for r in rows], [it.group for it in its],
                     [it.split for it in its], [r[3] for r in rows], [r[4] for r in rows])
        w.add_skipped(skipped)
        w.commit(cursor)
        rows.clear()
        skipped.clear()

    first = _stored_contents(w)
    stored = w.n_rows  # counted here: reading the dataset's shape per image costs ~0.3 ms
    with progress() as bar:
        task = bar.add_task("prepare", total=n, completed=start, info="")
        for i, img, ok, sha, note in run(src.iter_bytes(start)):
            if img is not None and sha in first:  # one file listed twice (e.g. relative + absolute)
                img, note = None, _duplicate_reason(first[sha], src.items[i])
            elif img is not None:
                first[sha] = (stored, src.items[i].path, src.items[i].label)
                stored += 1
            if img is None:
                skipped.append((src.items[i].path, note))
                log.warning("skipped %s: %s", src.items[i].path, note)
            else:
                rows.append((i, img, ok, sha, note))
            bar.advance(task)
            if len(rows) + len(skipped) >= commit_every:
                flush(i + 1)
        flush(n)


def _stored_contents(w: StoreWriter) -> dict[str, tuple[int, str, str | None]]:
    """source sha256 -> (store row, path, label) of the rows already written (a resumed run)."""
    sha, paths = w.f["source_sha256"].asstr()[:], w.f["paths"].asstr()[:]
    return {s: (r, p, None) for r, (s, p) in enumerate(zip(sha, paths)) if s}


def _duplicate_reason(first: tuple[int, str, str | None], item) -> str:
    row, path, label = first
    clash = f"; labelled {label!r} there, {item.label!r} here" if label is not None and label != item.label else ""
    return f"duplicate: same file content as store row {row} ({path}), stored once{clash}"


def _finish(w: StoreWriter, src: Source, cfg: PrepareConfig, tpl: dict | None, t0: float,
            start: int) -> tuple[PrepareReport, list[tuple[str, str]]]:
    ok = w.f["stain_ok"][:]
    notes = list(w.f["note"].asstr()[:])
    # Count by kind ("too little stain"), not by the exact message with its pixel count.
    fails = Counter(n.split(" (")[0] for n, o in zip(notes, ok) if not o) if cfg.stain else Counter()
    other_notes = Counter(n for n, o in zip(notes, ok) if o and n)
    skipped = w.skipped()
    settings = {"size": cfg.size, "stain": "macenko" if cfg.stain else "none", "resize": "bicubic",
                "stain_matrix": tpl["stain_matrix"] if tpl else None,
                "max_conc": tpl["max_conc"] if tpl else None, "stain_params": asdict(StainParams())}
    if cfg.stain:  # the backends agree within one grey level, not bit for bit: a different content
        settings["stain_backend"] = cfg.stain_backend
    provenance = {
        "stain": settings["stain"], "template": tpl, "stain_matrix": settings["stain_matrix"],
        "max_conc": settings["max_conc"], "stain_params": settings["stain_params"],
        "settings": asdict(cfg), "source": {"kind": src.kind, "path": str(src.root)},
        "counts": {"items": len(src.items) + len(src.problems), "written": w.n_rows,
                   "skipped": len(skipped), "stain_failed": int(sum(fails.values()))},
        "stain_failures": dict(fails), "notes": dict(other_notes), "wbc_version": __version__,
        "torchstain_version": _torchstain_version(),
    }
    present = set(w.f["labels"][:].tolist())
    for k, c in enumerate(src.class_names):
        if k not in present and src.kind != "parquet":
            log.warning("class %r has no usable image", c)
    content_id = w.finalize(src.class_names, provenance, settings)
    secs = time.perf_counter() - t0
    done = len(src.items) - start
    if fails:
        log.warning("%d image(s) stored un-normalised (stain_ok=False): %s", sum(fails.values()),
                    "; ".join(f"{k} x{v}" for k, v in fails.most_common(5)))
    return PrepareReport(
        out=w.path, n_items=len(src.items), n_written=w.n_rows, n_skipped=len(skipped),
        n_stain_failed=int(sum(fails.values())), stain_failures=dict(fails), template=tpl,
        seconds=secs, images_per_s=done / secs if secs > 0 else 0.0, resumed_from=start,
        skipped_csv=skipped_csv_path(w.path), content_id=content_id, notes=dict(other_notes)), skipped


def _torchstain_version() -> str:
    from importlib.metadata import version

    return version("torchstain")


def skipped_csv_path(store: Path) -> Path:
    """`cache/images/NAME.h5` -> `cache/images/NAME.skipped.csv`."""
    return store.with_suffix(".skipped.csv")


def _write_skipped_csv(path: Path, skipped: list[tuple[str, str]]) -> None:
    with atomic_write(path, newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["path", "reason"])
        wr.writerows(skipped)
