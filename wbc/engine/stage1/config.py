"""Stage-1 settings (kept free of torch so the CLI can read its defaults cheaply)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage1Config:
    """Stage-1 settings; defaults are the paper's unless a comment says otherwise."""

    backbone: str = "r50"  # alias (r50, r152, swin, lite0..2) or any timm name
    pretrained: str = "hub"  # hub | none | package | PATH (timm-format state dict)
    fold: int = 0  # validation fold; training uses the other CV folds
    epochs: int = 100
    batch_size: int = 256  # effective batch = micro-batch x accum_steps x processes
    accum_steps: int = 1  # gradient accumulation when 256 images do not fit at once
    lr: float = 1e-4  # AdamW
    weight_decay: float = 0.05  # not given by the paper; the usual AdamW fine-tuning value
    min_lr: float = 0.0  # cosine annealing floor (per epoch, over `epochs`)
    patience: int = 10  # early stopping: epochs without a better validation Macro-F1
    augment: str = "randaugment"  # none | randaugment | degradations | scale, or a comma list
    recipe: str = "paper"  # paper | lp-ft | frozen-pretrained (wbc.engine.stage1.lp_ft)
    randaugment_ops: int = 2  # torchvision's defaults
    randaugment_magnitude: int = 9
    crop: int = 224  # centre crop side fed to the network
    resize: int = 0  # side before the crop; 0 keeps the paper's 368/224 ratio (160 -> 263)
    amp: bool = True  # CUDA only: bf16 where supported, else fp16 with a GradScaler
    channels_last: bool = True  # CUDA only
    device: str = "auto"
    workers: int = 2  # DataLoader worker processes
    preload: bool = True  # decode and crop every image once into RAM
    seed: int = 0  # fixes init, sampling order and augmentation

    def __post_init__(self) -> None:
        """Refuse impossible values here, so `wbc train` and Python callers fail before any work."""
        from wbc.errors import WbcError

        at_least = {"epochs": 1, "batch_size": 1, "accum_steps": 1, "patience": 1, "crop": 8,
                    "randaugment_ops": 0, "randaugment_magnitude": 0, "resize": 0, "workers": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise WbcError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        if not self.lr > 0:
            raise WbcError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.min_lr < 0:
            raise WbcError(f"--weight-decay and min_lr must be >= 0, got {self.weight_decay}, {self.min_lr}")
        if self.resize and self.resize < self.crop:
            raise WbcError(f"--resize {self.resize} is smaller than --crop {self.crop}")
