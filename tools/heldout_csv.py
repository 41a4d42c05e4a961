"""Write a CSV (image,label) of an image store's held-out test rows, pointing at their source files.

`wbc predict` classifies image files; this names the files of the cells no model trained on or was
selected on (fold -1 after `wbc split`), so a demo or a check predicts on unseen cells only.

    python tools/heldout_csv.py cache/demo/images/pbc-demo.h5 data/pbc-demo cache/demo/heldout.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path


def heldout_csv(store_path: Path, source_root: Path, out: Path) -> int:
    """Rows with fold -1; image paths written relative to `out`'s folder. Returns the row count."""
    from wbc.store import open_store

    st = open_store(store_path)
    rows = [int(i) for i in st.indices("test")]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "store_row"])
        for i in rows:
            src = source_root / st.paths[i]
            if not src.is_file():
                sys.exit(f"error: {src} (store row {i}) not found; is {source_root} the store's source root?")
            w.writerow([os.path.relpath(src, out.parent), st.class_names[int(st.labels[i])], i])
    return len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", type=Path)
    p.add_argument("source_root", type=Path, help="folder the store's paths are relative to (the manifest's folder)")
    p.add_argument("out", type=Path)
    a = p.parse_args()
    n = heldout_csv(a.store, a.source_root, a.out)
    print(f"{n} held-out test cells -> {a.out}")


if __name__ == "__main__":
    main()
