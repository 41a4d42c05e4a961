"""Stage 2 (cRT): linear heads trained on cached embeddings, G heads at once.

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

from wbc.errors import WbcError
from wbc.heads import TAU_GRID, prior_adjustment, tau_logits, view_mean_softmax
from wbc.log import progress
from wbc.losses import LossSpec, StackedLoss, check_spec, head_losses_and_grad
from wbc.metrics import HEADLINE, classification_metrics
from wbc.sampling import SAMPLERS, epoch_draws

log = logging.getLogger(__name__)

# The CPU/CUDA kernel behind torch.optim.AdamW(fused=True) (an aten op, no torch.optim import);
# older torch falls back to the written-out update below.
_FUSED_ADAMW = getattr(torch, "_fused_adamw_", None)


@dataclass(frozen=True)
class TrainConfig:
    """Stage-2 optimisation settings; defaults are the paper's cRT recipe."""

    sampler: str = "class_balanced"  # weight 1/n_y, with replacement; 'instance' = plain
    lr: float = 1e-3  # AdamW, cosine to 0 over `epochs` (per step, no warm-up)
    weight_decay: float = 5e-4  # the cRT paper's (Kang et al. 2020) value
    epochs: int = 50
    batch_size: int = 256
    patience: int = 10  # epochs without a better validation MF1 before a head stops
    seed: int = 0
    memory_gb: float = 4.0  # feature data held in memory at most; larger caches are streamed
    threads: int = 0  # torch threads (0 = torch's default); not part of the result

    def check(self) -> None:
        SAMPLERS.get(self.sampler)
        for name in ("lr", "epochs", "batch_size", "patience", "memory_gb"):
            if not getattr(self, name) > 0:
                raise WbcError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise WbcError(f"--weight-decay must be >= 0, got {self.weight_decay}")


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


def val_logits(source, weight: torch.Tensor, bias: torch.Tensor | None, n_val: int) -> torch.Tensor:
    """All validation views through a fused head: (Nv, K, M) for weight (M, D)."""
    out = None
    for sel, x in source.val_chunks():
        z = x.reshape(-1, x.shape[-1]) @ weight.t()
        if bias is not None:
            z += bias
        if out is None:
            out = torch.empty(n_val, x.shape[1], weight.shape[0])
        out[sel] = z.view(x.shape[0], x.shape[1], -1)
    return out


def val_predict(source, weight: torch.Tensor, bias: torch.Tensor, n: int, num_classes: int,
                n_val: int) -> np.ndarray:
    """(Nv, G) predictions of the fused heads (rows :n of weight (M, D)) from view-averaged
    softmax, computed chunk by chunk so the (Nv, K, G, C) probabilities never exist at once."""
    preds = np.empty((n_val, n // num_classes), dtype=np.int64)
    for sel, x in source.val_chunks():
        z = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight.t())[:, :n]
        probs = torch.softmax(z.reshape(x.shape[0], x.shape[1], -1, num_classes), dim=-1).mean(dim=1)
        preds[sel] = probs.argmax(-1).numpy()
    return preds


def headline(y_true, y_pred, num_classes: int) -> dict:
    m = classification_metrics(y_true, y_pred, num_classes)
    return {k: m[k] for k in HEADLINE}


class _Fused:
    """The active heads as one Linear(D, G*C) trained with AdamW; rows g*C..(g+1)*C = head g.

    The fused matrix carries zero rows up to a multiple of PAD (MKL's GEMM runs ~1.5-2x faster
    with N = 352 than 351, 16 than 13); they get zero gradients, so AdamW leaves them at zero.
    AdamW is written out (torch.optim.AdamW's single-tensor maths, betas 0.9/0.999, eps 1e-8):
    dropping a stopped head's rows is then a slice, and no torch.optim import (which pulls in
    torch._dynamo, seconds on a busy CPU) sits in a command that runs in seconds.
    """

    BETAS, EPS, PAD = (0.9, 0.999), 1e-8, 16

    def __init__(self, w0: torch.Tensor, b0: torch.Tensor, g: int, cfg: TrainConfig, fused: bool = True):
        self.c, self.cfg, self.t, self.fused = w0.shape[0], cfg, 0, fused
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
            steps = [torch.tensor(float(self.t)), torch.tensor(float(self.t))]
            _FUSED_ADAMW([self.w, self.b], grads, self.m, self.v, [], steps, lr=lr, beta1=b1, beta2=b2,
                         weight_decay=wd, eps=self.EPS, amsgrad=False, maximize=False)
            return
        c1, c2 = 1 - b1 ** self.t, math.sqrt(1 - b2 ** self.t)
        for p, g, m, v in zip((self.w, self.b), grads, self.m, self.v):
            p.mul_(1 - lr * wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, v.sqrt().div_(c2).add_(self.EPS), value=-lr / c1)


def fit_heads(source, train_labels: np.ndarray, val_labels: np.ndarray, specs: list[LossSpec],
              cfg: TrainConfig, num_classes: int, dim: int, desc: str = "cRT") -> list[HeadFit]:
    """Train len(specs) heads at once; each keeps the weights of its best validation MF1 epoch.

    train_labels: (Nt,) in the source's training-row order; val_labels: (Nv,) likewise.
    """
    for s in specs:
        check_spec(s)
    cfg.check()
    counts = np.bincount(train_labels, minlength=num_classes)
    G, C = len(specs), num_classes
    all_loss = StackedLoss.build(specs, counts)
    w0, b0 = init_head(C, dim, cfg.seed)
    fused = _Fused(w0, b0, G, cfg)
    active = torch.arange(G)  # head index of each fused slot
    draws_rng = np.random.default_rng(cfg.seed)
    order_rng = np.random.default_rng([cfg.seed, 1])  # streamed sources' block order only
    y_train = torch.from_numpy(np.asarray(train_labels, dtype=np.int64))
    steps = math.ceil(len(train_labels) / cfg.batch_size)
    total = cfg.epochs * steps
    best = np.full(G, -1.0)
    best_epoch = np.zeros(G, dtype=int)
    bad = np.zeros(G, dtype=int)
    best_w = w0.repeat(G, 1, 1)
    best_b = b0.repeat(G, 1)
    history: list[list[dict]] = [[] for _ in range(G)]
    step = 0
    with progress() as bar:
        task = bar.add_task(desc, total=cfg.epochs, info="")
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            loss = all_loss.select(active)
            rows, views = epoch_draws(cfg.sampler, train_labels, C, source.k, draws_rng)
            loss_sum = torch.zeros(len(active))
            for x, pos in source.batches(rows, views, cfg.batch_size, order_rng):
                lr = 0.5 * cfg.lr * (1 + math.cos(math.pi * step / total))
                loss_sum += fused.step(x, y_train[rows[pos]], loss, lr) * len(pos)
                step += 1
            with torch.no_grad():
                preds = val_predict(source, fused.w, fused.b, fused.n, C, len(val_labels))
            stopped = []
            for slot, g in enumerate(active.tolist()):
                m = headline(val_labels, preds[:, slot], C)
                history[g].append({"epoch": epoch, "loss": float(loss_sum[slot]) / len(rows), "lr": lr,
                                   **m, "seconds": round(time.perf_counter() - t0, 4)})
                if m["mf1"] > best[g]:
                    best[g], best_epoch[g], bad[g] = m["mf1"], epoch, 0
                    best_w[g] = fused.w[slot * C:(slot + 1) * C]
                    best_b[g] = fused.b[slot * C:(slot + 1) * C]
                else:
                    bad[g] += 1
                    if bad[g] >= cfg.patience:
                        stopped.append(slot)
            if stopped:
                log.debug("epoch %d: %d head(s) stopped early", epoch, len(stopped))
                keep = torch.tensor([s for s in range(len(active)) if s not in stopped], dtype=torch.long)
                active = active[keep]
                if len(active) == 0:
                    bar.update(task, completed=cfg.epochs)
                    break
                fused.keep(keep)
            bar.update(task, advance=1, info=f"best MF1 {best.max():.3f}, {len(active)}/{G} heads")
    return [HeadFit(specs[g], best_w[g].numpy().copy(), best_b[g].numpy().copy(), int(best_epoch[g]),
                    float(best[g]), history[g]) for g in range(G)]


@dataclass
class PostHoc:
    """Post-hoc choices applied to a trained head, selected on validation."""

    tau: float
    logit_adjust: np.ndarray | None
    metrics: dict


def post_hoc(fits: list[HeadFit], source, val_labels: np.ndarray, counts: np.ndarray,
             tau: float | str = 0.0, la_tau: float = 0.0) -> list[PostHoc]:
    """Tau-normalisation (a float, or 'auto' = best validation MF1 over TAU_GRID) and logit
    adjustment by the training prior (la_tau * -log prior; 0 = off) for each head.

    Costs one matmul for all heads: tau only rescales per-class columns of the raw logits.
    """
    C = len(counts)
    w_all = torch.from_numpy(np.concatenate([f.weight for f in fits]))
    with torch.no_grad():
        raw = val_logits(source, w_all, None, len(val_labels))  # (Nv, K, G*C), bias-free
    adjust = prior_adjustment(counts, la_tau) if la_tau else None
    taus = TAU_GRID if tau == "auto" else (float(tau),)
    out = []
    for g, f in enumerate(fits):
        r = raw[..., g * C:(g + 1) * C]
        scored = []
        for t in taus:
            z = tau_logits(r, f.weight, f.bias, t, adjust)
            scored.append((headline(val_labels, view_mean_softmax(z).argmax(-1).numpy(), C), t))
        m, t = max(scored, key=lambda s: s[0]["mf1"])  # first (smallest) tau wins ties
        out.append(PostHoc(t, adjust, m))
    return out
