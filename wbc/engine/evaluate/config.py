"""`wbc robustness` settings (free of torch, so the CLI reads its defaults cheaply)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RobustnessConfig:
    degradations: tuple[str, ...] = ()  # () = every registered degradation except `none`
    severities: tuple[int, ...] = (1, 2, 3, 4)  # 0 (clean) is always scored, from the main cache
    max_images: int = 0  # 0 = every held-out test row; else a stratified subset (CPU budgets)
    seed: int = 0  # draws that subset
    views: str = ""  # views of the degraded extraction; "" = the cache's own views
    batch_size: int = 0  # extraction: images per forward pass (0 = 32 GPU / 8 CPU)
    workers: int = 2  # extraction: loader processes (they also run the degradations)
    device: str = "auto"
    amp: bool = True
