"""One training epoch and one validation pass (device, AMP, accumulation and DDP aware)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from wbc.data import normalize
from wbc.engine.distributed import DistEnv
from wbc.errors import WbcError


@dataclass
class StepSetup:
    """What every step needs besides the batch."""

    device: torch.device
    mean: list[float]
    std: list[float]
    amp: torch.dtype | None  # autocast dtype; None = full precision
    channels_last: bool
    accum_steps: int


class NonFiniteLoss(WbcError):
    pass


def _inputs(x: torch.Tensor, s: StepSetup) -> torch.Tensor:
    x = normalize(x.to(s.device, non_blocking=True), s.mean, s.std)
    return x.contiguous(memory_format=torch.channels_last) if s.channels_last else x


def train_epoch(
    model: torch.nn.Module, loader: DataLoader, opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None, s: StepSetup, env: DistEnv, epoch: int, bar=None, task=None,
) -> tuple[float, int, float]:
    """Returns (mean loss, images seen by this rank, seconds). Raises NonFiniteLoss on NaN/inf."""
    model.train()
    opt.zero_grad(set_to_none=True)
    n_steps, total, seen, t0 = len(loader), 0.0, 0, time.perf_counter()
    for step, (x, y) in enumerate(loader):
        x, y = _inputs(x, s), y.to(s.device, non_blocking=True)
        # The last group may hold fewer micro-batches: divide by its own size so every
        # optimizer step sees a mean gradient.
        start = step - step % s.accum_steps
        group = min(s.accum_steps, n_steps - start)
        sync = step + 1 == start + group
        no_sync = model.no_sync() if env.distributed and not sync else contextlib.nullcontext()
        with no_sync:
            with torch.autocast(s.device.type, dtype=s.amp, enabled=s.amp is not None):
                loss = F.cross_entropy(model(x), y)
            if env.any(not bool(torch.isfinite(loss))):
                raise NonFiniteLoss(f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}")
            scaled = loss / group
            (scaler.scale(scaled) if scaler else scaled).backward()
        if sync:
            optimizer_step(opt, scaler)
        total += loss.item() * len(y)
        seen += len(y)
        if bar is not None:
            rate = seen * env.world / (time.perf_counter() - t0)
            bar.update(task, advance=1, info=f"loss {total / seen:.4f}  {rate:.1f} img/s")
    return total / max(seen, 1), seen, time.perf_counter() - t0


@torch.inference_mode()
def predict_loader(model: torch.nn.Module, loader: DataLoader, s: StepSetup) -> tuple[np.ndarray, np.ndarray, float]:
    """(predictions (N,), labels (N,), summed CE loss) over this rank's loader."""
    model.eval()
    preds, labels, loss = [], [], 0.0
    for x, y in loader:
        x, y = _inputs(x, s), y.to(s.device)
        with torch.autocast(s.device.type, dtype=s.amp, enabled=s.amp is not None):
            logits = model(x)
        loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
        preds.append(logits.argmax(1).cpu().numpy())
        labels.append(y.cpu().numpy())
    if not preds:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0.0
    return np.concatenate(preds), np.concatenate(labels), loss


def optimizer_step(opt, scaler) -> None:
    """One optimizer step (through the fp16 GradScaler when there is one), then clear gradients."""
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
