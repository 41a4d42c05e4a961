"""Helpers for benchmark scripts: machine description and BENCHMARKS.md section updates.

Each benchmark owns one section, delimited by HTML comments, so scripts can be rerun in any order.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from pathlib import Path

from wbc.fsutil import atomic_write

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEach section is written by the script it names; figures are ratios measured in one run.\n"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {gpu}, {_dt.date.today().isoformat()}"
    )


def write_section(name: str, body: str, path: Path = BENCH) -> None:
    """Replace (or append) the section `name` of BENCHMARKS.md with `body` (markdown)."""
    text = path.read_text() if path.exists() else HEADER
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    with atomic_write(path) as f:
        f.write(text)


def pbc_lt_default() -> Path:
    """PBC-LT as built by tools/build_pbc_lt.py, else the copy beside the repo on the lab machine."""
    built = ROOT / "data" / "pbc-lt-images"
    return built if (built / "manifest.csv").is_file() else ROOT.parent / "shared" / "data" / "pbc-lt"
