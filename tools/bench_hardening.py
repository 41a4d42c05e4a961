"""What the hardening of issue 14 costs: safe checkpoint loading, locks and writable checks.

Measured in one run on this machine (ratios, not absolute times, are the result):
- `torch.load(weights_only=True)` against `weights_only=False` on a real Stage-1 best.pt/last.pt;
- `check_writable` + `output_lock` (taken and released) per output, in milliseconds.

    python tools/bench_hardening.py --checkpoint runs/lite0/fold0   # writes BENCHMARKS.md section
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from tools.benchlib import machine, write_section
from wbc.fsutil import check_writable, output_lock

SECTION = "hardening"


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="A Stage-1 fold dir with best.pt and last.pt.")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="Print only; leave BENCHMARKS.md alone.")
    a = ap.parse_args()
    rows = []
    for name in ("best.pt", "last.pt"):
        p = a.checkpoint / name
        # Interleaved so machine load drifts hit both sides alike.
        safe, unsafe = [], []
        for _ in range(a.repeats):
            safe.append(_median_s(lambda p=p: torch.load(p, map_location="cpu", weights_only=True), 1))
            unsafe.append(_median_s(lambda p=p: torch.load(p, map_location="cpu", weights_only=False), 1))
        s, u = statistics.median(safe), statistics.median(unsafe)
        rows.append(f"| torch.load {name} ({p.stat().st_size / 2**20:.0f} MiB) | {s:.3f} s | {u:.3f} s | {s / u:.2f} |")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "x.zarr"

        def guard() -> None:
            with output_lock(check_writable(out)):
                pass

        g = _median_s(guard, 200)
    head = (f"## Hardening overhead (issue 14)\n\n`python tools/bench_hardening.py --checkpoint "
            f"{a.checkpoint}`; {machine()}; median of {a.repeats} interleaved loads each.\n")
    guard_line = (f"check_writable + output_lock taken and released: {g * 1e3:.2f} ms per output "
                  "(median of 200): noise next to any command.")
    body = "\n".join([head, "| step | weights_only=True | weights_only=False | ratio |", "|---|---|---|---|",
                      *rows, "", guard_line])
    print(body)
    if not a.no_write:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
