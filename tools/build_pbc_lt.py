"""Build the PBC-LT benchmark (data/pbc-lt/manifest.csv) from a downloaded copy of the PBC dataset.

PBC: Acevedo et al., "A dataset of microscopic peripheral blood cell images for development of
automatic recognition systems", Data in Brief 30:105474 (2020), Mendeley Data
doi:10.17632/snkd93bnjr.1, CC BY 4.0. Download `PBC_dataset_normal_DIB.zip` from
https://data.mendeley.com/datasets/snkd93bnjr/1 and pass the zip or the folder it unpacks to.

Each manifest row names a PBC file (`source_name`, e.g. SNE_1000.jpg, found anywhere under the
PBC root or in the zip), its label, split and sha256. The file is copied byte for byte to
OUT/images/<label>/<source_name> and its sha256 checked; OUT/manifest.csv is the shipped manifest.
Nothing is written under OUT/images unless every file is found with the right checksum.

    python tools/build_pbc_lt.py ~/Downloads/PBC_dataset_normal_DIB.zip --out data/pbc-lt-images
    wbc prepare data/pbc-lt-images/manifest.csv --out cache/images/pbc-lt.h5
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import shutil
import sys
import zipfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "data" / "pbc-lt" / "manifest.csv"


class BuildError(Exception):
    """A problem the user can fix (wrong folder, corrupt download): one line, exit 2."""


def read_manifest(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"image", "label", "split", "source_name", "sha256"}
    if not rows or not need <= set(rows[0]):
        raise BuildError(f"{path}: a PBC-LT manifest needs columns {sorted(need)}")
    return rows


class Source:
    """File name -> bytes, from a PBC folder (searched recursively) or the downloaded zip."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if zipfile.is_zipfile(self.path):
            self.zip = zipfile.ZipFile(self.path)
            self.index = {Path(n).name: n for n in self.zip.namelist() if not n.endswith("/")}
        elif self.path.is_dir():
            self.zip = None
            self.index = {p.name: p for p in self.path.rglob("*") if p.is_file()}
        else:
            raise BuildError(f"{self.path}: not a folder or a zip file (the PBC download)")

    def read(self, name: str) -> bytes | None:
        where = self.index.get(name)
        if where is None:
            return None
        return self.zip.read(where) if self.zip else Path(where).read_bytes()


def check(rows: list[dict], source: Source) -> tuple[list[str], list[str]]:
    """(missing file names, names whose sha256 differs): the whole set is checked before copying."""
    missing, bad = [], []
    for r in rows:
        data = source.read(r["source_name"])
        if data is None:
            missing.append(r["source_name"])
        elif hashlib.sha256(data).hexdigest() != r["sha256"]:
            bad.append(r["source_name"])
    return missing, bad


def build(pbc: Path, out: Path, manifest: Path = MANIFEST) -> Counter:
    """Copy every manifest file from `pbc` into `out`; returns counts per (split, label)."""
    rows = read_manifest(manifest)
    source = Source(pbc)
    missing, bad = check(rows, source)
    if missing or bad:
        raise BuildError(f"{len(missing)} of {len(rows)} files not found under {pbc} (e.g. {missing[:3]}), "
                         f"{len(bad)} with another sha256 (e.g. {bad[:3]}); is this the PBC download "
                         "(PBC_dataset_normal_DIB)?")
    for r in rows:
        dest = out / r["image"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(source.read(r["source_name"]))
    shutil.copyfile(manifest, out / "manifest.csv")
    readme = manifest.parent / "README.md"
    if readme.is_file():
        shutil.copyfile(readme, out / "README.md")
    return Counter((r["split"], r["label"]) for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pbc", type=Path, help="PBC_dataset_normal_DIB.zip or the folder it unpacks to")
    p.add_argument("--out", type=Path, default=Path("data/pbc-lt-images"), help="output folder")
    p.add_argument("--manifest", type=Path, default=MANIFEST, help="PBC-LT manifest (default: the shipped one)")
    a = p.parse_args(argv)
    try:
        counts = build(a.pbc, a.out, a.manifest)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split in sorted({s for s, _ in counts}, reverse=True):
        per = {lab: n for (s, lab), n in sorted(counts.items()) if s == split}
        print(f"{split}: {sum(per.values())} images, " + ", ".join(f"{k} {v}" for k, v in per.items()))
    print(f"PBC-LT built and checked (sha256 of every file) -> {a.out / 'manifest.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
