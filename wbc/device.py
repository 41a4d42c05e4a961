"""Device and mixed-precision choices shared by training and extraction."""

from __future__ import annotations

import torch

from wbc.errors import WbcError


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an unavailable explicit choice is a user error."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise WbcError(f"bad --device {spec!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WbcError(f"--device {spec} asked for CUDA but none is available; use --device cpu")
    return dev


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16 (needs a GradScaler); None = full precision."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
