"""tools/build_pbc_lt.py rebuilds PBC-LT from a PBC download (folder or zip), checking every sha256."""

import csv
import hashlib
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "build_pbc_lt.py"


def fake_pbc(root: Path) -> tuple[Path, Path]:
    """A PBC-like tree (class folders named as PBC's) and a 3-row PBC-LT manifest for it."""
    files = {"neutrophil/SNE_1.jpg": b"sne", "neutrophil/BNE_2.jpg": b"bne", "ig/PMY_3.jpg": b"pmy",
             "ig/IG_4.jpg": b"not in the manifest"}
    for name, data in files.items():
        (root / "PBC" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "PBC" / name).write_bytes(data)
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "split", "source_name", "sha256"])
        for name, label, split in (("SNE_1.jpg", "SNE", "train"), ("BNE_2.jpg", "BNE", "test"),
                                   ("PMY_3.jpg", "PMY", "train")):
            data = files[next(k for k in files if k.endswith(name))]
            w.writerow([f"images/{label}/{name}", label, split, name, hashlib.sha256(data).hexdigest()])
    return root / "PBC", manifest


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          check=False, timeout=120)


@pytest.mark.parametrize("as_zip", [False, True])
def test_builds_from_a_folder_or_the_zip(tmp_path, as_zip):
    pbc, manifest = fake_pbc(tmp_path)
    if as_zip:
        with zipfile.ZipFile(tmp_path / "PBC.zip", "w") as z:
            for p in pbc.rglob("*.jpg"):
                z.write(p, "PBC_dataset_normal_DIB/" + str(p.relative_to(pbc)))
        pbc = tmp_path / "PBC.zip"
    r = run(pbc, "--out", tmp_path / "out", "--manifest", manifest)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "images" / "SNE" / "SNE_1.jpg").read_bytes() == b"sne"
    assert (tmp_path / "out" / "images" / "PMY" / "PMY_3.jpg").read_bytes() == b"pmy"
    assert (tmp_path / "out" / "manifest.csv").read_text() == manifest.read_text()
    assert "train: 2 images" in r.stdout and "test: 1 images, BNE 1" in r.stdout


def test_a_changed_or_missing_file_stops_before_copying(tmp_path):
    pbc, manifest = fake_pbc(tmp_path)
    (pbc / "ig" / "PMY_3.jpg").write_bytes(b"corrupt")
    (pbc / "neutrophil" / "BNE_2.jpg").unlink()
    r = run(pbc, "--out", tmp_path / "out", "--manifest", manifest)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "1 of 3 files not found" in r.stderr and "1 with another sha256" in r.stderr
    assert not (tmp_path / "out").exists()


def test_the_shipped_manifest_is_pbc_lt():
    with open(ROOT / "data" / "pbc-lt" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    counts = Counter((r["split"], r["label"]) for r in rows)
    assert sum(v for (s, _), v in counts.items() if s == "train") == 2438
    assert {lab: v for (s, lab), v in counts.items() if s == "test"} == dict.fromkeys(
        ("BA", "BNE", "EO", "LY", "MMY", "MO", "MY", "PMY", "SNE"), 100)
    assert counts[("train", "SNE")] == 1200 and counts[("train", "PMY")] == 11
    assert len({r["source_name"] for r in rows}) == len(rows) == 3338
    assert all(r["image"] == f"images/{r['label']}/{r['source_name']}" and len(r["sha256"]) == 64 for r in rows)
