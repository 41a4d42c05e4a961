"""Frozen per-stage configs saved beside their outputs as YAML; a stable hash for provenance.

Each stage defines its own frozen dataclass next to its engine (defaults = the paper's values);
this module only knows how to write, read and hash them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml

from wbc.errors import WbcError

T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
    """A dataclass (or dict) as plain JSON-able values (Paths become strings)."""
    d = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return json.loads(json.dumps(d, default=str))


def save_config(cfg: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def load_config(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    if not path.exists():
        raise WbcError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    data.pop("ran", None)  # what ran (device, dtype, ...) is recorded beside the settings, not one of them
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise WbcError(f"{path}: unknown keys {unknown}; known: {sorted(names)}")
    return cls(**data)


def config_hash(cfg: Any) -> str:
    """A short, stable id of a config's values (order-independent)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
