"""Synthetic stained-looking cells and tiny image stores for tests (no /work/shared, no network).

Images are built in optical-density space by mixing two stain vectors (hematoxylin in a nucleus,
eosin in the cytoplasm), the model Macenko inverts, so Macenko tests have a known ground truth.
Classes differ in nucleus size/lobes and eosin level, so a tiny model can learn something.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Hematoxylin (Ruifrok & Johnston) and a Giemsa-like eosin OD vector, columns of HE (3, 2). The
# eosin is less extreme than Ruifrok's so pure-eosin pixels pass Macenko's OD >= beta threshold
# in every channel (pixels failing it in any channel are dropped as background).
H_VEC = np.array([0.650, 0.704, 0.286])
E_VEC = np.array([0.270, 0.800, 0.530])
HE_DEFAULT = np.stack([H_VEC / np.linalg.norm(H_VEC), E_VEC / np.linalg.norm(E_VEC)], axis=1)
IO = 240  # torchstain's transmitted light intensity


def stained_image(
    rng: np.random.Generator,
    size: int = 64,
    he: np.ndarray = HE_DEFAULT,
    nucleus: float = 0.25,
    lobes: int = 1,
    hema: float = 1.4,
    eosin: float = 1.0,
) -> np.ndarray:
    """One synthetic cell: (size, size, 3) uint8 RGB.

    he: (3, 2) stain OD vectors (H, E); nucleus: nucleus radius as a fraction of size;
    lobes: number of nuclear lobes; hema/eosin: peak concentrations.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(float) / size
    cy, cx = 0.5 + rng.uniform(-0.05, 0.05, 2)
    cyto = ((yy - cy) ** 2 + (xx - cx) ** 2) < 0.38**2
    nuc = np.zeros_like(cyto)
    for k in range(lobes):
        ang = 2 * np.pi * k / max(lobes, 1) + rng.uniform(0, 0.5)
        off = 0.0 if lobes == 1 else nucleus * 0.9
        ny, nx = cy + off * np.sin(ang), cx + off * np.cos(ang)
        r = nucleus / (1 if lobes == 1 else 1.6)
        nuc |= ((yy - ny) ** 2 + (xx - nx) ** 2) < r**2
    c_h = nuc * hema * rng.uniform(0.8, 1.2, (size, size))
    c_e = (cyto & ~nuc) * eosin * rng.uniform(0.7, 1.3, (size, size))
    od = c_h[..., None] * he[:, 0] + c_e[..., None] * he[:, 1]
    od += rng.uniform(0.0, 0.02, od.shape)  # faint background, like a smear's plasma
    return np.clip(IO * np.exp(-od), 0, 255).astype(np.uint8)


def class_params(k: int) -> dict:
    """Appearance of class k: distinct nucleus size, lobe count and eosin level."""
    return {"nucleus": 0.12 + 0.06 * (k % 3), "lobes": 1 + (k // 3) % 3, "eosin": 0.3 + 0.35 * (k % 4)}


def make_images(classes: Sequence[str], n_per_class: int, size: int, seed: int):
    """(images (N, S, S, 3) uint8, labels (N,) int, paths) with classes in blocks."""
    rng = np.random.default_rng(seed)
    imgs, labels, paths = [], [], []
    for k, name in enumerate(classes):
        for i in range(n_per_class):
            imgs.append(stained_image(rng, size, **class_params(k)))
            labels.append(k)
            paths.append(f"{name}/{i:03d}.png")
    return np.stack(imgs), np.array(labels), paths


def make_tiny_store(
    path: str | Path,
    classes: Sequence[str] = ("A", "B", "C"),
    n_per_class: int = 8,
    size: int = 64,
    folds: int = 3,
    seed: int = 0,
    n_test_per_class: int = 2,
) -> Path:
    """Write a complete, already-split synthetic store (no Macenko) and return its path.

    Per class (shuffled by `seed`): the first `n_test_per_class` rows are held-out test
    (fold -1), the rest go round-robin into folds 0..folds-1.
    """
    from wbc import __version__
    from wbc.store import StoreWriter, write_split

    path = Path(path)
    images, labels, paths = make_images(classes, n_per_class, size, seed)
    sha = [hashlib.sha256(im.tobytes()).hexdigest() for im in images]
    settings = {"size": size, "stain": False, "source": "synthetic", "seed": seed}
    with StoreWriter(path, size=size, plan_id=f"fixture-{seed}", overwrite=True) as w:
        n = len(images)
        w.append(images, labels, paths, [True] * n, [""] * n, [""] * n, sha)
        w.commit(n)
        w.finalize(
            classes,
            {"stain": "none", "template": None, "stain_matrix": None, "max_conc": None,
             "settings": settings, "wbc_version": __version__},
            settings,
        )
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), np.int8)
    for k in range(len(classes)):
        idx = rng.permutation(np.flatnonzero(labels == k))
        fold[idx[:n_test_per_class]] = -1
        fold[idx[n_test_per_class:]] = np.arange(len(idx) - n_test_per_class) % folds
    info = {"test": n_test_per_class / n_per_class, "folds": folds, "seed": seed,
            "grouped": False, "method": "fixture"}
    write_split(path, fold, json.loads(json.dumps(info)))
    return path


def write_image_folder(root: str | Path, classes: Sequence[str] = ("A", "B"), n_per_class: int = 4,
                       size: int = 96, seed: int = 0, he: np.ndarray = HE_DEFAULT) -> Path:
    """An ImageFolder tree `root/<class>/<i>.png` of synthetic stained cells; returns root."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            p = {**class_params(k), "nucleus": 0.18 + 0.04 * (k % 3), "eosin": 1.0 + 0.2 * (k % 3)}
            Image.fromarray(stained_image(rng, size, he, **p)).save(root / name / f"{i:03d}.png")
    return root


def tiny_checkpoint(path: Path, store, *, crop: int, resize: int, seed: int = 0, fold: int = 0,
                    model_name: str = "test_efficientnet") -> Path:
    """A Stage-1 checkpoint (docs/ARCHITECTURE.md section 2) of a tiny random timm model for `store`."""
    import timm
    import torch

    from wbc.backbones import data_config

    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, num_classes=len(store.class_names))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "wbc.stage1/1", "model": model.state_dict(), "timm_name": model_name,
                "alias": "test", "class_names": list(store.class_names),
                "store_content_id": store.content_id, "fold": fold, "config": {},
                "data_config": data_config(model, crop=crop, resize=resize), "epoch": 1}, path)
    return path


def cli_exit_code(argv: list[str]) -> int:
    """Run `wbc ARGV` in-process; its exit status (0 when main returns)."""
    from wbc.cli import main

    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0
