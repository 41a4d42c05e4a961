"""`HeadConfig`: everything one Stage-2 head is a function of, checked once when made.

Defaults are the paper's cRT recipe. Import-light (no torch): the CLI reads its defaults here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from wbc.errors import WbcError
from wbc.losses import LossSpec
from wbc.sampling import SAMPLERS

# The fields a grid of heads must share to train in one pass (same draws, same schedule).
TRAINING = ("sampler", "lr", "weight_decay", "epochs", "batch_size", "patience", "seed", "memory_gb",
            "stream", "threads")


@dataclass(frozen=True)
class HeadConfig:
    """One Stage-2 head: its loss, how it is trained, and its post-hoc choices.

    loss: a LossSpec, or a registered loss name (`wbc.losses.LOSSES`) with that loss's defaults.
    Bad values raise a one-line WbcError here, so a config that exists is a valid one.
    """

    loss: LossSpec = field(default_factory=LossSpec)
    sampler: str = "class_balanced"  # weight 1/n_y, with replacement; 'instance' = plain
    lr: float = 1e-3  # AdamW, cosine to 0 over `epochs` (per step, no warm-up)
    weight_decay: float = 5e-4  # the cRT paper's (Kang et al. 2020) value
    epochs: int = 50
    batch_size: int = 256
    patience: int = 10  # epochs without a better validation MF1 before a head stops
    seed: int = 0
    tau: float | str = 0.0  # tau-normalisation: a number >= 0, or 'auto' (best on validation)
    logit_adjust: float = 0.0  # post-hoc logits - T log(training prior); 0 = off
    memory_gb: float = 4.0  # feature data held in memory at most; larger caches are streamed
    stream: bool | None = None  # force streaming (True) or memory (False); None = by memory_gb
    threads: int = 0  # torch threads (0 = torch's default); changes speed only, not the head

    def __post_init__(self) -> None:
        if isinstance(self.loss, str):
            object.__setattr__(self, "loss", LossSpec(self.loss))
        elif not isinstance(self.loss, LossSpec):
            raise WbcError(f"loss must be a loss name or a LossSpec, got {type(self.loss).__name__}")
        SAMPLERS.get(self.sampler)
        for name in ("lr", "epochs", "batch_size", "patience", "memory_gb"):
            if not getattr(self, name) > 0:
                raise WbcError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not self.weight_decay >= 0:
            raise WbcError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.threads < 0:
            raise WbcError(f"--threads must be >= 0, got {self.threads}")
        if not math.isfinite(self.logit_adjust):
            raise WbcError(f"--logit-adjust must be a finite number, got {self.logit_adjust}")
        object.__setattr__(self, "tau", parse_tau(self.tau))

    def training_key(self) -> tuple:
        """Equal for configs that can train in one batched pass."""
        return tuple(getattr(self, k) for k in TRAINING)

    def record(self) -> dict:
        """What a head is a function of, as saved in head.pt and config.yaml (threads only change
        speed, so they are left out; memory_gb and stream decide in-memory vs streamed batches,
        which mix the same draws differently)."""
        train = {k: getattr(self, k) for k in TRAINING if k not in ("stream", "threads")}
        tau = self.tau if self.tau == "auto" else f"{self.tau:g}"
        return {"loss": dataclasses.asdict(self.loss), "train": train, "tau": tau,
                "logit_adjust": self.logit_adjust, "stream": self.stream}

    def with_loss(self, loss: LossSpec | str) -> HeadConfig:
        return dataclasses.replace(self, loss=loss)


def parse_tau(tau) -> float | str:
    """'auto', or a number >= 0 (given as a number or a string)."""
    if str(tau) == "auto":
        return "auto"
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise WbcError(f"--tau must be a number >= 0 or 'auto', got {tau!r}") from None
    if not 0 <= value < math.inf:
        raise WbcError(f"--tau must be a number >= 0 or 'auto', got {value:g}")
    return value
