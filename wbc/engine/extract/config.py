"""`wbc extract` settings (free of torch, so the CLI checks them before importing it)."""

from __future__ import annotations

from dataclasses import dataclass

from wbc.errors import WbcError


@dataclass(frozen=True)
class ExtractConfig:
    views: str = "d4"  # the 8 symmetries of the square: label-preserving and pairwise distinct
    batch_size: int = 0  # images per forward pass (each gives K views); 0 = 32 on GPU, 8 on CPU
    # Loader processes reading + cropping row blocks; -1 = auto: none on CPU (decoding is <1% of a
    # CPU forward, while a forked worker costs ~5-10% in copy-on-write faults), min(8, cores) on GPU.
    workers: int = -1
    device: str = "auto"
    amp: bool = True  # bf16/fp16 autocast on CUDA (features are stored as fp16 anyway); CPU is fp32
    channels_last: bool = True  # faster convolutions on GPUs and oneDNN CPUs
    chunk_rows: int = 0  # rows per cache chunk; 0 = ~4 MiB of features (wbc.cache.default_chunk_rows)
    overwrite: bool = False  # replace an existing complete (or foreign partial) output
    other_store: bool = False  # allow a store other than the checkpoint's (an external test set)

    def __post_init__(self) -> None:  # one check for CLI and Python callers, before any work
        for name in ("batch_size", "chunk_rows"):
            if getattr(self, name) < 0:
                raise WbcError(f"--{name.replace('_', '-')} must be 0 (automatic) or positive, "
                               f"got {getattr(self, name)}")
        if self.workers < -1:
            raise WbcError(f"--workers must be -1 (automatic), 0 or more, got {self.workers}")
