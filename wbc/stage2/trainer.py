"""The Stage-2 trainer: linear heads trained on cached embeddings, G heads at once.

`fit_heads` trains G freshly initialised linear heads (D -> C) on one shared stream of batches:
the G heads are one fused Linear(D, G*C), so a step is one (B x D) @ (D x G*C) matmul, and each
head has its own loss (wbc.losses family) and its own early-stopping state. Every head starts
from the same initial weights and sees the same batches, and Adam's update is elementwise, so a
head of the grid equals the head trained alone with the same seed (to float rounding). When a
head stops, its rows leave the fused matrix (with their Adam state), so finished heads cost
nothing. A single cRT head is simply G = 1.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from wbc.log import progress
from wbc.losses import LossSpec
from wbc.sampling import epoch_draws
from wbc.stage2.batched_loss import StackedLoss, head_losses_and_grad
from wbc.stage2.config import HeadConfig
from wbc.stage2.validate import headline_from_confusion, val_confusion

log = logging.getLogger(__name__)

# The CPU/CUDA kernel behind torch.optim.AdamW(fused=True) (an aten op, no torch.optim import);
# older torch falls back to the written-out update below.
_FUSED_ADAMW = getattr(torch, "_fused_adamw_", None)


@dataclass
class HeadFit:
    """One trained head: the weights of its best validation epoch and its per-epoch history."""

    spec: LossSpec
    weight: np.ndarray  # (C, D) float32
    bias: np.ndarray  # (C,)
    best_epoch: int
    best_mf1: float
    history: list[dict] = field(default_factory=list)


def init_head(num_classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear's default init U(-1/sqrt(D), 1/sqrt(D)) from `seed`: (C, D), (C,)."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(dim)
    w = (torch.rand(num_classes, dim, generator=g) * 2 - 1) * bound
    b = (torch.rand(num_classes, generator=g) * 2 - 1) * bound
    return w, b


class _Fused:
    """The active heads as one Linear(D, G*C) trained with AdamW; rows g*C..(g+1)*C = head g.

    The fused matrix carries zero rows up to a multiple of PAD (MKL's GEMM runs ~1.5-2x faster
    with N = 352 than 351, 16 than 13); they get zero gradients, so AdamW leaves them at zero.
    AdamW is written out (torch.optim.AdamW's single-tensor maths, betas 0.9/0.999, eps 1e-8):
    dropping a stopped head's rows is then a slice, and no torch.optim import (which pulls in
    torch._dynamo, seconds on a busy CPU) sits in a command that runs in seconds.
    """

    BETAS, EPS, PAD = (0.9, 0.999), 1e-8, 16

    def __init__(self, w0: torch.Tensor, b0: torch.Tensor, g: int, cfg: HeadConfig, fused: bool = True):
        self.c, self.cfg, self.t, self.fused = w0.shape[0], cfg, 0, fused
        self.steps = [torch.zeros(()), torch.zeros(())]  # the fused kernel reads the step count here
        self._set(w0.repeat(g, 1), b0.repeat(g))

    def _set(self, w, b, m=None, v=None) -> None:
        self.n = len(b)  # real rows (G * C); the rest are padding
        pad = -self.n % self.PAD

        def padded(t: torch.Tensor) -> torch.Tensor:
            return F.pad(t, (0, 0, 0, pad) if t.dim() == 2 else (0, pad))

        self.w, self.b = padded(w), padded(b)
        zeros = [torch.zeros_like(self.w), torch.zeros_like(self.b)]
        self.m = [padded(t) for t in m] if m else zeros
        self.v = [padded(t) for t in v] if v else [t.clone() for t in zeros]

    def keep(self, slots: torch.Tensor) -> None:
        """Keep only heads at `slots` (positions in the current fused matrix), with their Adam state."""
        rows = (slots[:, None] * self.c + torch.arange(self.c)).reshape(-1)
        self._set(self.w[rows], self.b[rows], [t[rows] for t in self.m], [t[rows] for t in self.v])

    def step(self, x: torch.Tensor, y: torch.Tensor, loss: StackedLoss, lr: float) -> torch.Tensor:
        """One AdamW step on batch x (B, D), labels y (B,); returns each head's loss (G,)."""
        z = torch.addmm(self.b, x, self.w.t())  # (B, G*C + pad)
        per_head, dz = head_losses_and_grad(z[:, :self.n].reshape(len(x), -1, self.c), y, loss)
        dz = F.pad(dz.reshape(len(x), -1), (0, len(self.b) - self.n))
        self._adamw([dz.t() @ x, dz.sum(0)], lr)
        return per_head

    def _adamw(self, grads: list[torch.Tensor], lr: float) -> None:
        (b1, b2), wd = self.BETAS, self.cfg.weight_decay
        self.t += 1
        if _FUSED_ADAMW is not None and self.fused:
            # torch.optim.AdamW(fused=True)'s kernel: one pass over each tensor instead of eight.
            for s in self.steps:
                s.fill_(self.t)
            _FUSED_ADAMW([self.w, self.b], grads, self.m, self.v, [], self.steps, lr=lr, beta1=b1, beta2=b2,
                         weight_decay=wd, eps=self.EPS, amsgrad=False, maximize=False)
            return
        c1, c2 = 1 - b1 ** self.t, math.sqrt(1 - b2 ** self.t)
        for p, g, m, v in zip((self.w, self.b), grads, self.m, self.v):
            p.mul_(1 - lr * wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, v.sqrt().div_(c2).add_(self.EPS), value=-lr / c1)


class _EarlyStopping:
    """Per head: best validation MF1 so far, its epoch and weights, epochs since it improved."""

    def __init__(self, w0: torch.Tensor, b0: torch.Tensor, g: int, patience: int):
        self.best, self.epoch, self.bad = np.full(g, -1.0), np.zeros(g, dtype=int), np.zeros(g, dtype=int)
        self.w, self.b, self.patience = w0.repeat(g, 1, 1), b0.repeat(g, 1), patience

    def update(self, g: int, epoch: int, mf1: float, w: torch.Tensor, b: torch.Tensor) -> bool:
        """Record head g's epoch; True when it has run out of patience."""
        if mf1 > self.best[g]:  # strictly better: ties keep the earlier epoch
            self.best[g], self.epoch[g], self.bad[g] = mf1, epoch, 0
            self.w[g], self.b[g] = w, b
            return False
        self.bad[g] += 1
        return bool(self.bad[g] >= self.patience)


def fit_heads(source, train_labels: np.ndarray, val_labels: np.ndarray, specs: list[LossSpec],
              cfg: HeadConfig, num_classes: int, dim: int, desc: str = "cRT") -> list[HeadFit]:
    """Train len(specs) heads at once; each keeps the weights of its best validation MF1 epoch.

    source: `FoldSplit.source(...)` (InMemoryRows or StreamedRows); train_labels (Nt,) and
    val_labels (Nv,) in its training / validation row order; cfg: the training settings (its loss
    is ignored: `specs` give each head's). Returns one HeadFit per spec, in order.
    """
    G, C = len(specs), num_classes
    all_loss = StackedLoss.build(specs, np.bincount(train_labels, minlength=C))
    w0, b0 = init_head(C, dim, cfg.seed)
    fused, stop = _Fused(w0, b0, G, cfg), _EarlyStopping(w0, b0, G, cfg.patience)
    active = torch.arange(G)  # head index of each fused slot
    rngs = (np.random.default_rng(cfg.seed), np.random.default_rng([cfg.seed, 1]))  # draws, block order
    y_train = torch.from_numpy(np.asarray(train_labels, dtype=np.int64))
    y_val = torch.from_numpy(np.asarray(val_labels, dtype=np.int64))
    total = cfg.epochs * math.ceil(len(train_labels) / cfg.batch_size)
    history: list[list[dict]] = [[] for _ in range(G)]
    with progress() as bar:
        task = bar.add_task(desc, total=cfg.epochs, info="")
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            losses, lr = _epoch(fused, source, all_loss.select(active), train_labels, y_train, cfg, C, rngs, total)
            cms = val_confusion(source, fused.w, fused.b, fused.n, C, y_val)
            stopped = []
            for slot, g in enumerate(active.tolist()):
                m = headline_from_confusion(cms[slot])
                history[g].append({"epoch": epoch, "loss": float(losses[slot]), "lr": lr, **m,
                                   "seconds": round(time.perf_counter() - t0, 4)})
                rows = slice(slot * C, (slot + 1) * C)
                if stop.update(g, epoch, m["mf1"], fused.w[rows], fused.b[rows]):
                    stopped.append(slot)
            if stopped:
                keep = torch.tensor([s for s in range(len(active)) if s not in stopped], dtype=torch.long)
                active = active[keep]
                log.debug("epoch %d: %d head(s) stopped, %d left", epoch, len(stopped), len(active))
                if len(active) == 0:
                    bar.update(task, completed=cfg.epochs)
                    break
                fused.keep(keep)
            bar.update(task, advance=1, info=f"best MF1 {stop.best.max():.3f}, {len(active)}/{G} heads")
    return [HeadFit(specs[g], stop.w[g].numpy().copy(), stop.b[g].numpy().copy(), int(stop.epoch[g]),
                    float(stop.best[g]), history[g]) for g in range(G)]


def _epoch(fused: _Fused, source, loss: StackedLoss, train_labels, y_train, cfg: HeadConfig, c: int,
           rngs, total: int) -> tuple[torch.Tensor, float]:
    """One epoch of draws through the fused heads; returns each active head's mean loss and the
    last learning rate (cosine over all steps of all epochs, per step)."""
    rows, views = epoch_draws(cfg.sampler, train_labels, c, source.k, rngs[0])
    loss_sum, lr = torch.zeros(fused.n // c), cfg.lr
    for x, pos in source.batches(rows, views, cfg.batch_size, rngs[1]):
        lr = 0.5 * cfg.lr * (1 + math.cos(math.pi * fused.t / total))
        loss_sum += fused.step(x, y_train[rows[pos]], loss, lr) * len(pos)
    return loss_sum / len(rows), lr
