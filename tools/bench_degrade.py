"""Time each degradation per 368 px image (one thread, CPU time) against a PIL JPEG decode of it.

Usage: .venv/bin/python tools/bench_degrade.py [--size 368] [--print-only]
Writes the `bench_degrade` section of BENCHMARKS.md. Times are process CPU time, minimum over
repeats: the least disturbed by other processes on a shared machine.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import timeit
from pathlib import Path

# One BLAS/OpenMP thread, as in a DataLoader worker; set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image
from skimage import data

from tools.benchlib import machine, write_section
from wbc import degrade as dg


def ms_per_call(fn, number: int = 20, repeat: int = 7) -> float:
    # CPU time of this process, not wall time: on a shared machine, waiting for a core is not
    # the degradation's cost.
    times = timeit.repeat(fn, number=number, repeat=repeat, timer=time.process_time)
    return 1000 * min(times) / number


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=368)
    ap.add_argument("--print-only", action="store_true")
    args = ap.parse_args()

    image = np.asarray(Image.fromarray(data.astronaut()).resize((args.size, args.size)))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    blob = buf.getvalue()
    decode = ms_per_call(lambda: np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")))

    rows = [
        f"Per image, {args.size}x{args.size} RGB uint8, one thread, CPU time, min over 7x20 calls. "
        + f"Reference: PIL JPEG decode of the same image (q=95) = {decode:.2f} ms.",
        "",
        "| degradation | severity 1 (ms) | severity 4 (ms) | severity 4 / JPEG decode |",
        "|---|---|---|---|",
    ]
    for name in dg.names():
        t1 = ms_per_call(lambda name=name: dg.degrade(name, image, 1, 0))
        t4 = ms_per_call(lambda name=name: dg.degrade(name, image, 4, 0))
        rows.append(f"| `{name}` | {t1:.2f} | {t4:.2f} | {t4 / decode:.1f}x |")
    rows += ["", f"Machine: {machine()}. Other processes shared the CPU; figures may be disturbed."]
    body = "## Degradations (`tools/bench_degrade.py`)\n\n" + "\n".join(rows)
    print(body)
    if not args.print_only:
        write_section("bench_degrade", body)


if __name__ == "__main__":
    main()
