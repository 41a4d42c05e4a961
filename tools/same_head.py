"""Check that a cRT head is the head `wbc ablate --save-heads` marked best (ablate.csv's `best` row).

`make demo` picks the loss on the ablation and retrains it with `wbc crt` (which also writes the
head's metrics.jsonl for the report); this confirms the two heads agree, so the head the demo
evaluates is the one the ablation chose. Exit 1 when they differ.

    python tools/same_head.py cache/demo/runs/ablate-lite0 0 cache/demo/runs/crt-lite0/fold0/head.pt
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np


def compare(ablate_dir: Path, fold: int, head: Path) -> tuple[str, float, bool]:
    """(best label, max |weight difference|, same head). Same = same loss, tau, and weights within
    the batched-vs-alone tolerance of tests/test_ablate.py."""
    from wbc.engine.stage2.ablate import head_path
    from wbc.heads import Head

    with open(ablate_dir / "ablate.csv", newline="") as f:
        best = next(r for r in csv.DictReader(f) if r["best"] == "1")
    grid, alone = Head.load(head_path(ablate_dir, best["label"], fold)), Head.load(head)
    diff = float(np.abs(grid.weight - alone.weight).max())
    same = (grid.label == alone.label == best["label"] and grid.tau == alone.tau
            and np.allclose(grid.weight, alone.weight, rtol=1e-4, atol=1e-4)
            and np.allclose(grid.bias, alone.bias, rtol=1e-4, atol=1e-4))
    return best["label"], diff, same


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ablate_dir", type=Path, help="`wbc ablate --save-heads` output folder")
    p.add_argument("fold", type=int)
    p.add_argument("head", type=Path, help="the cRT head.pt to check")
    a = p.parse_args()
    label, diff, same = compare(a.ablate_dir, a.fold, a.head)
    verdict = "is" if same else "is NOT"
    print(f"{a.head} {verdict} the ablation's best head ({label}; max |weight difference| {diff:.2g})")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
