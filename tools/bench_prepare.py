"""Batched Macenko vs torchstain, and `wbc prepare` end to end, on the same images in one run.

Usage: .venv/bin/python tools/bench_prepare.py [--data ../shared/data] [--n 400] [--jtsc 300]
       [--template images/SNE/SNE_478479.jpg] [--work /tmp/bench-prepare] [--print-only]

On a seeded subset of `--n` PBC-LT images (template: a fixed PBC-LT image, by default the medoid
`wbc prepare` picks for the full set):
1. validation (untimed): per image, the batched backend's two implementations, numpy
   (`NumpyMacenko`, its CPU path) and torch (`BatchMacenko`, batches of 4, padded: its GPU path,
   run on the CPU), against torchstain plus the clamp (`StainNormalizer`, backend torchstain), on
   the subset and on `--jtsc` JTSC images: share of pixels within 1 grey level, worst difference,
   images flagged by one and not the other;
2. the plain per-image torchstain loop in this process, one torch thread: PIL decode ->
   `normalize(stains=False)` -> resize to 368 (run before and after the prepares: load bracket);
3. `wbc prepare SUBSET.csv --template T` through the installed script (process start-up
   included), `--stain-backend torchstain`, then `batched --device cpu` (default workers: forked processes;
   the default codec, zstd, and `--compression lzf`, the codec before it, interleaved with the loop)
   and the same with `--workers 0` (all in one thread);
4. the normalisers alone on the decoded images (CPU; and CUDA at 368 px where available);
5. the stores compared pixel by pixel (and their content ids).
Writes the `prepare` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("WBC_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torchstain
from PIL import Image

from tools.benchlib import machine, write_section
from wbc.prepare import PrepareConfig, prepare_store
from wbc.prepare_batch import _ENCODER
from wbc.sources import resize_square
from wbc.stain import StainError, StainNormalizer, try_normalize_with_info
from wbc.stain_batch import BatchMacenko, pad_batch
from wbc.stain_np import NumpyMacenko
from wbc.store import open_store


def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the `wbc prepare` subprocesses)."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def subset(data: Path, name: str, n: int) -> list[tuple[Path, str]]:
    with open(data / name / "manifest.csv", newline="") as f:
        rows = [(data / name / r["image"], r["label"]) for r in csv.DictReader(f)]
    pick = np.random.default_rng(0).choice(len(rows), min(n, len(rows)), replace=False)
    return [rows[i] for i in sorted(pick)]


def decode(p: Path) -> np.ndarray:
    return np.array(Image.open(p).convert("RGB"))


def torch_rows(batched: BatchMacenko):
    """images -> [(image, ok, reason)] by BatchMacenko, batches of 4 (padded)."""
    def run(chunk: list[np.ndarray]) -> list[tuple[np.ndarray, bool, str]]:
        r = batched.normalize(*pad_batch(chunk))
        return [(r.images[k, : im.shape[0], : im.shape[1]].numpy(), bool(r.ok[k]), r.reasons[k])
                for k, im in enumerate(chunk)]
    return run


def numpy_rows(nm: NumpyMacenko):
    """images -> [(image, ok, reason)] by NumpyMacenko, one at a time."""
    def one(im: np.ndarray) -> tuple[np.ndarray, bool, str]:
        try:
            return nm.normalize(im), True, ""
        except StainError as e:
            return im, False, str(e)
    return lambda chunk: [one(im) for im in chunk]


def validate(norm: StainNormalizer, run, paths: list[Path]) -> dict:
    """Per-image agreement of a batched-backend implementation with torchstain + clamp (images
    decoded chunk by chunk: the whole set does not sit in memory). `off`: images with more than 1%
    of their pixels off by more than one grey level, with that share."""
    within = total = worst = identical = 0
    flag_diff, fails, off = [], 0, []
    for s in range(0, len(paths), 4):
        chunk_paths = paths[s: s + 4]
        chunk = [decode(p) for p in chunk_paths]
        for p, im, (got, got_ok, got_reason) in zip(chunk_paths, chunk, run(chunk)):
            ref, ok, reason, _ = try_normalize_with_info(norm, im)
            h, w = im.shape[:2]
            if ok != got_ok:
                flag_diff.append(f"{p.name}: {reason or 'ok'} / {got_reason or 'ok'}")
                continue
            fails += not ok
            d = np.abs(ref.astype(int) - got.astype(int))
            near = int((d <= 1).all(-1).sum())
            within += near
            identical += int((d == 0).all(-1).sum())
            total += h * w
            worst = max(worst, int(d.max()))
            if near < 0.99 * h * w:
                off.append((p.name, 1 - near / (h * w)))
    return {"n": len(paths), "within1": within / total, "identical": identical / total, "worst": worst,
            "flag_diff": flag_diff, "fails": fails, "off": off}


def plain_loop(paths: list[Path], template: Path, size: int) -> tuple[float, float]:
    """(images/s, CPU ms/image): decode -> torchstain normalize(stains=False) -> resize, per image."""
    norm = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    norm.fit(torch.from_numpy(decode(template)).permute(2, 0, 1))
    t0, c0 = time.perf_counter(), cpu_seconds()
    for p in paths:
        img = decode(p)
        try:
            out, _, _ = norm.normalize(torch.from_numpy(img).permute(2, 0, 1), stains=False)
            img = out.clamp(0, 255).to(torch.uint8).numpy()  # HWC int32 -> HWC uint8
        except Exception:  # noqa: BLE001, S110 - the plain loop keeps the original, as such loops do
            pass
        Image.fromarray(img).resize((size, size), Image.BICUBIC)
    return len(paths) / (time.perf_counter() - t0), 1000 * (cpu_seconds() - c0) / len(paths)


def run_prepare(manifest: Path, out: Path, template: Path, size: int, backend: str,
                *extra: str) -> tuple[float, float]:
    """`wbc prepare` through the installed script: (images/s incl. start-up, CPU ms/image)."""
    exe = Path(sys.executable).parent / "wbc"
    cmd = [str(exe), "prepare", str(manifest), "--out", str(out), "--template", str(template),
           "--size", str(size), "--stain-backend", backend, "--overwrite", *extra]
    if backend == "batched":
        cmd += ["--device", "cpu"]
    n = len(manifest.read_text().splitlines()) - 1
    t0, c0 = time.perf_counter(), cpu_seconds()
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    return n / (time.perf_counter() - t0), 1000 * (cpu_seconds() - c0) / n


def alone_numpy(nm: NumpyMacenko, images: list[np.ndarray]) -> tuple[float, float]:
    """(images/s, CPU ms/image) of the numpy normaliser on decoded images, one thread."""
    t0, c0 = time.perf_counter(), time.process_time()
    for im in images:
        try:
            nm.normalize(im)
        except StainError:
            pass
    return len(images) / (time.perf_counter() - t0), 1000 * (time.process_time() - c0) / len(images)


def alone(batched: BatchMacenko, images: list[np.ndarray], batch: int) -> tuple[float, float]:
    """(images/s, CPU ms/image) of the batched normaliser on decoded images."""
    chunks = [pad_batch(images[s: s + batch]) for s in range(0, len(images), batch)]
    chunks = [(x.to(batched.device), sz) for x, sz in chunks]
    batched.normalize(*chunks[0])  # warm-up
    sync = torch.cuda.synchronize if batched.device.type == "cuda" else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for x, sz in chunks:
        batched.normalize(x, sz)
    sync()
    return len(images) / (time.perf_counter() - t0), 1000 * (time.process_time() - c0) / len(images)


def fixed_costs(paths: list[Path], size: int) -> dict:
    """CPU ms per image of what every prepare does besides Macenko (lzf: prepare's per-thread
    encoder), and the start-up of a process that imports the CLI and prepare (no torch), and of
    one that imports torch: wall s and CPU s."""
    c = time.process_time()
    images = [decode(p) for p in paths]
    out = {"decode": time.process_time() - c}
    c = time.process_time()
    small = [resize_square(im, size) for im in images]
    out["resize"] = time.process_time() - c
    c = time.process_time()
    for im in small:
        _ENCODER.encode(im, "lzf")
    out["lzf"] = time.process_time() - c
    c = time.process_time()
    for im in small:
        _ENCODER.encode(im, "zstd")
    out["zstd"] = time.process_time() - c
    out = {k: 1000 * v / len(paths) for k, v in out.items()}
    t0, c0 = time.perf_counter(), cpu_seconds()
    code = "import sys, wbc.cli, wbc.prepare, wbc.prepare_batch; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True,
                   env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    out["startup_wall"], out["startup_cpu"] = time.perf_counter() - t0, cpu_seconds() - c0
    t0, c0 = time.perf_counter(), cpu_seconds()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    out["torch_wall"], out["torch_cpu"] = time.perf_counter() - t0, cpu_seconds() - c0
    return out


def compare_stores(a: Path, b: Path) -> dict:
    sa, sb = open_store(a), open_store(b)
    d = np.concatenate([np.abs(sa.images([i]).astype(int) - sb.images([i]).astype(int)).reshape(-1, 3)
                        for i in range(len(sa))])
    return {"within1": float((d <= 1).all(1).mean()), "identical": float((d == 0).all(1).mean()),
            "worst": int(d.max()), "same_ok": bool((sa.stain_ok == sb.stain_ok).all()),
            "ids": (sa.content_id, sb.content_id), "n": len(sa)}


def measure(args: argparse.Namespace) -> dict:
    """Everything the section reports, in one run (validation first, untimed)."""
    m: dict = {"load0": os.getloadavg()}
    args.work.mkdir(parents=True, exist_ok=True)
    pbc = subset(args.data, "pbc-lt", args.n)
    template = args.data / "pbc-lt" / args.template
    manifest = args.work / "subset.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([("image", "label"), *((str(p), y) for p, y in pbc)])

    norm = StainNormalizer.fit(decode(template), backend="torchstain")
    batched = BatchMacenko(norm.stain_matrix, norm.max_conc, norm.params)
    nm = NumpyMacenko(norm.stain_matrix, norm.max_conc, norm.params)
    pbc_images = [decode(p) for p, _ in pbc]
    # Validation (untimed) on every PBC-LT image (--n-validate 0) and every JTSC image.
    val_sets = (("PBC-LT", [p for p, _ in subset(args.data, "pbc-lt", args.n_validate or 10**9)]),
                ("JTSC", [p for p, _ in subset(args.data, "jtsc", args.jtsc)]))
    m["val"] = {f"{name}, {impl}": validate(norm, run, ps) for name, ps in val_sets
                for impl, run in (("numpy (CPU path)", numpy_rows(nm)), ("torch (GPU path, on CPU)", torch_rows(batched)))}

    paths = [p for p, _ in pbc]
    m["n_paths"] = len(paths)
    m["ts"] = run_prepare(manifest, args.work / "torchstain.h5", template, args.size, "torchstain")
    m["bt1"] = run_prepare(manifest, args.work / "batched1.h5", template, args.size, "batched", "--workers", "0")
    # The headline pair, interleaved: loop, prepare, loop, prepare, ..., loop; each prepare is
    # compared with the mean of the loops either side of it (the machine's load drifts).
    loops = [plain_loop(paths, template, args.size)]
    bts, lzfs = [], []
    for _ in range(args.rounds):
        bts.append(run_prepare(manifest, args.work / "batched.h5", template, args.size, "batched"))
        lzfs.append(run_prepare(manifest, args.work / "batched-lzf.h5", template, args.size, "batched",
                                "--compression", "lzf"))
        loops.append(plain_loop(paths, template, args.size))
    m["loops"], m["bts"], m["lzfs"] = loops, bts, lzfs
    m["ratios"] = [b[0] / ((loops[i][0] + loops[i + 1][0]) / 2) for i, b in enumerate(bts)]
    m["lzf_ratios"] = [b[0] / ((loops[i][0] + loops[i + 1][0]) / 2) for i, b in enumerate(lzfs)]
    m["kib"] = {k: os.path.getsize(args.work / f) / 1024 / len(paths)
                for k, f in (("zstd", "batched.h5"), ("lzf", "batched-lzf.h5"))}
    med = int(np.argsort(m["ratios"])[len(bts) // 2])
    m["bt"] = bts[med]
    m["loop"] = ((loops[med][0] + loops[med + 1][0]) / 2, (loops[med][1] + loops[med + 1][1]) / 2)
    t0, c0 = time.perf_counter(), cpu_seconds()
    prepare_store(manifest, args.work / "inproc.h5", PrepareConfig(size=args.size, template=str(template),
                                                                   device="cpu"), overwrite=True)
    m["inproc"] = (len(paths) / (time.perf_counter() - t0), 1000 * (cpu_seconds() - c0) / len(paths))
    m["fixed"] = fixed_costs(paths, args.size)
    m["solo_np"] = alone_numpy(nm, pbc_images)
    m["solo"] = alone(batched, pbc_images, 4)
    t0, c0 = time.perf_counter(), time.process_time()
    for im in pbc_images:
        try_normalize_with_info(norm, im)
    m["ref_solo"] = (len(pbc_images) / (time.perf_counter() - t0), 1000 * (time.process_time() - c0) / len(pbc_images))
    m["gpu"] = None
    if torch.cuda.is_available():
        gb = BatchMacenko(norm.stain_matrix, norm.max_conc, norm.params, "cuda")
        sq = [np.asarray(Image.fromarray(im).resize((args.size, args.size), Image.BICUBIC)) for im in pbc_images]
        m["gpu"] = alone(gb, sq * max(1, 2048 // len(sq)), 256)
    m["cmp"] = compare_stores(args.work / "torchstain.h5", args.work / "batched.h5")
    m["cmp1"] = compare_stores(args.work / "batched1.h5", args.work / "batched.h5")
    m["cmp_lzf"] = compare_stores(args.work / "batched-lzf.h5", args.work / "batched.h5")
    m["load1"] = os.getloadavg()
    return m


def report(args: argparse.Namespace, m: dict) -> str:
    loop, ts, bt, bt1, inproc, fixed = m["loop"], m["ts"], m["bt"], m["bt1"], m["inproc"], m["fixed"]
    solo_np, solo, ref_solo, gpu, cmp, n = m["solo_np"], m["solo"], m["ref_solo"], m["gpu"], m["cmp"], m["n_paths"]

    def ratio(x: float) -> str:
        return f"{x / loop[0]:.2f}x"

    lines = [
        "## prepare (`tools/bench_prepare.py`)",
        "",
        (f"{args.n} PBC-LT images (seeded subset), template `{args.template}`, {args.size} px, measured in one "
         "run. `wbc prepare` runs through the installed script (process start-up, template fit, "
         "normalise, resize, zstd compression (the store's default codec), HDF5 writes); the plain loop is PIL decode -> "
         "torchstain `normalize(stains=False)` -> resize, one process, one torch thread. On the CPU the "
         "batched backend is numpy (`wbc.stain_np`, no torch import) in forked worker processes (default "
         "`--workers`: one per core; each compresses under its own HDF5 lock). Pixel agreement is checked "
         "on every PBC-LT and JTSC image; the timing on the subset."),
        "",
        "| pipeline | images/s (wall) | vs plain loop | CPU ms / image (all processes) |",
        "|---|---|---|---|",
        f"| plain torchstain loop, each round (before the first prepare, after each) | {' / '.join(f'{x[0]:.1f}' for x in m['loops'])} | 1.00x | {loop[1]:.1f} |",
        f"| `wbc prepare --stain-backend torchstain` | {ts[0]:.1f} | {ratio(ts[0])} | {ts[1]:.1f} |",
        f"| `wbc prepare --stain-backend batched --device cpu`, each round | {' / '.join(f'{x[0]:.1f}' for x in m['bts'])} | {' / '.join(f'{r:.2f}x' for r in m['ratios'])} (median **{ratio(bt[0])}**) | {bt[1]:.1f} |",
        f"| the same, `--compression lzf` (the codec before zstd), each round | {' / '.join(f'{x[0]:.1f}' for x in m['lzfs'])} | {' / '.join(f'{r:.2f}x' for r in m['lzf_ratios'])} (median {float(np.median(m['lzf_ratios'])):.2f}x) | {float(np.median([x[1] for x in m['lzfs']])):.1f} |",
        f"| the same (zstd), `--workers 0` (one thread) | {bt1[0]:.1f} | {ratio(bt1[0])} | {bt1[1]:.1f} |",
        f"| `prepare_store(..., device='cpu')` in this process (no start-up) | {inproc[0]:.1f} | {ratio(inproc[0])} | {inproc[1]:.1f} |",
        f"| numpy normaliser alone (`NumpyMacenko`, decoded images) | {solo_np[0]:.1f} | - | {solo_np[1]:.1f} |",
        f"| torch batched normaliser alone (CPU, 1 thread, batches of 4) | {solo[0]:.1f} | - | {solo[1]:.1f} |",
        f"| torchstain + clamp alone (`StainNormalizer`, same images) | {ref_solo[0]:.1f} | - | {ref_solo[1]:.1f} |",
        (f"| torch batched normaliser alone, CUDA, {args.size} px, batches of 256 | {gpu[0]:.0f} | - | {gpu[1]:.2f} |"
         if gpu else "| torch batched normaliser alone, CUDA | not measured: no GPU on this machine | - | - |"),
        "",
        "Batched backend vs torchstain + clamp, per image (validation, untimed):",
        "",
        "| images, implementation | pixels within 1 grey level | identical | worst | flagged by one only | flagged by both |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in m["val"].items():
        lines.append(f"| {name} ({v['n']}) | {100 * v['within1']:.4f}% | {100 * v['identical']:.2f}% | {v['worst']} | "
                     f"{len(v['flag_diff'])} | {v['fails']} |")
    offs = [f"{name.split(',')[0]}: " + ", ".join(f"{f} ({100 * x:.0f}% of its pixels)" for f, x in v["off"])
            for name, v in m["val"].items() if v["off"] and "numpy" in name]
    if offs:
        lines += ["", "Images with more than 1% of their pixels off by more than one level (numpy path): "
                  + "; ".join(offs) + "."]
    pbc_ok = all(v["within1"] >= 0.999 and not v["flag_diff"] for v in m["val"].values())
    own = fixed["decode"] + fixed["resize"] + fixed["zstd"]
    lines += [
        "",
        (f"What every `prepare` pays besides Macenko, measured in this run (CPU ms per image, one thread): "
         f"decode {fixed['decode']:.1f}, resize {fixed['resize']:.1f}, zstd compression {fixed['zstd']:.1f} "
         f"(lzf: {fixed['lzf']:.1f}) "
         f"({own:.1f} in all, against the plain loop's {loop[1]:.1f} for decode + torchstain + resize); process "
         f"start-up (the CLI and prepare, no torch) {fixed['startup_cpu']:.2f} s CPU, {fixed['startup_wall']:.2f} s wall; "
         f"`import torch` alone {fixed['torch_cpu']:.2f} s CPU, {fixed['torch_wall']:.2f} s wall."),
        "",
        (f"Stores: the batched store and the torchstain store ({cmp['n']} images each, {args.size} px): "
         f"{100 * cmp['within1']:.4f}% of pixels within 1 grey level, {100 * cmp['identical']:.2f}% identical, "
         f"worst {cmp['worst']}; same stain_ok flags: {cmp['same_ok']}. Their content ids differ by design "
         f"(`stain_backend` is part of the settings hashed: {cmp['ids'][0][:12]} / {cmp['ids'][1][:12]}), "
         "so a feature cache made from one store is not taken for the other. The batched store made with "
         f"worker processes equals the one made in this process: {m['cmp1']['identical'] == 1.0} "
         f"(content ids {'equal' if m['cmp1']['ids'][0] == m['cmp1']['ids'][1] else 'differ'}). "
         f"The zstd store equals the lzf one pixel for pixel: {m['cmp_lzf']['identical'] == 1.0} (content ids "
         f"{'equal' if m['cmp_lzf']['ids'][0] == m['cmp_lzf']['ids'][1] else 'differ'}: the codec is not content); "
         f"file size per image {m['kib']['zstd']:.0f} KiB (zstd) vs {m['kib']['lzf']:.0f} KiB (lzf)."),
        "",
        (f"Machine: {machine()}; load average (1 min) {m['load0'][0]:.1f} at the start, {m['load1'][0]:.1f} at the end "
         "(absolute figures move with the load; the ratios were measured side by side)."),
    ]
    verdict = "met" if bt[0] >= 2 * loop[0] else "**not met**"
    lines += [
        "",
        (f"Done-when of issue 17 (batched `prepare` >= 2x the plain loop end to end on this CPU, {n} images): "
         f"{verdict} ({ratio(bt[0])} end to end, the median of {len(m['ratios'])} interleaved rounds; "
         f"{ratio(inproc[0])} in process without start-up). Pixels within 1 grey level on >= 99.9% of "
         f"every set, same failure flags: {'met' if pbc_ok else '**not met**'}. "
         + (f"GPU: {gpu[0]:.0f} images/s (bar: 1,000)." if gpu else
            "The GPU figure (bar: 1,000 images/s) was not measured: no GPU here; "
            "`tests/test_stain_batch.py::test_cuda_matches_cpu` runs where CUDA exists.")),
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--jtsc", type=int, default=300)
    ap.add_argument("--n-validate", type=int, default=0, help="PBC-LT images checked against torchstain (0 = all)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved plain-loop / prepare rounds")
    ap.add_argument("--template", default="images/SNE/SNE_478479.jpg", help="relative to the PBC-LT folder")
    ap.add_argument("--size", type=int, default=368)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-prepare"))
    ap.add_argument("--print-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the plain loop's best (and the batched normaliser's, measured alone)
    body = report(args, measure(args))
    print(body)
    if not args.print_only:
        write_section("prepare", body)


if __name__ == "__main__":
    main()
