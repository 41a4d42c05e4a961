"""The loss family of `wbc.losses` for G heads at once, in torch: values and closed-form gradients.

`StackedLoss` holds G heads' parameters as tensors; `head_losses` is the reference (autograd
can differentiate it); `head_losses_and_grad` is what the fused trainer runs every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from wbc.losses import LossSpec


@dataclass
class StackedLoss:
    """G heads' loss parameters as tensors: alpha (G, C), gamma (G,), lam (G,), offset (G, C)."""

    alpha: torch.Tensor
    gamma: torch.Tensor
    lam: torch.Tensor
    offset: torch.Tensor

    def __post_init__(self) -> None:
        # Which terms any head uses, decided once instead of at every training step.
        self.focal = bool((self.lam * self.gamma).any())
        self.shifted = bool(self.offset.any())

    @classmethod
    def build(cls, specs: list[LossSpec], counts) -> StackedLoss:
        ps = [s.params(counts) for s in specs]
        f32 = {"dtype": torch.float32}
        return cls(
            alpha=torch.tensor(np.stack([p.alpha for p in ps]), **f32),
            gamma=torch.tensor([p.gamma for p in ps], **f32),
            lam=torch.tensor([p.lam for p in ps], **f32),
            offset=torch.tensor(np.stack([p.offset for p in ps]), **f32),
        )

    def select(self, idx: torch.Tensor) -> StackedLoss:
        return StackedLoss(self.alpha[idx], self.gamma[idx], self.lam[idx], self.offset[idx])


def head_losses(logits: torch.Tensor, y: torch.Tensor, p: StackedLoss) -> torch.Tensor:
    """Mean loss of each head over the batch. logits: (B, G, C); y: (B,) int64 -> (G,)."""
    z = logits + p.offset
    logp = torch.log_softmax(z, dim=-1)
    logp_y = logp.gather(-1, y.view(-1, 1, 1).expand(-1, z.shape[1], 1)).squeeze(-1)  # (B, G)
    ce = -p.alpha[:, y].t() * logp_y
    # 1 - p_y from log p_y without cancellation; the clamp keeps gamma<1 gradients finite at p_y=1.
    one_minus_p = (-torch.expm1(logp_y)).clamp_min(1e-12)
    modulator = (1.0 - p.lam) + p.lam * one_minus_p.pow(p.gamma)
    return (modulator * ce).mean(0)


def head_losses_and_grad(logits: torch.Tensor, y: torch.Tensor, p: StackedLoss
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """`head_losses` and its gradient w.r.t. the logits in closed form (no autograd graph).

    With q = 1 - p_y, l = -log p_y and m = (1 - lam) + lam q^gamma, the per-sample loss
    alpha_y m l has d/dz = alpha_y (m + lam gamma l p_y q^(gamma-1)) (softmax(z') - onehot_y).
    logits: (B, G, C); y: (B,) -> losses (G,), d mean-loss / d logits (B, G, C).
    Written for few kernel launches: it runs once per training step.
    """
    b, g, _ = logits.shape
    logp = torch.log_softmax(logits + p.offset if p.shifted else logits, dim=-1)
    idx = y.view(-1, 1, 1).expand(-1, g, 1)
    logp_y = logp.gather(-1, idx).squeeze(-1)  # (B, G)
    prob = logp.exp_()
    p_y = logp_y.exp()
    q = torch.expm1(logp_y).neg_().clamp_min_(1e-12)  # 1 - p_y without cancellation
    a_y = p.alpha.t()[y]  # (B, G)
    if p.focal:
        q_gamma = q.pow(p.gamma)
        m = torch.addcmul(1.0 - p.lam, p.lam, q_gamma)
        # q^(gamma-1) = q^gamma / q; lam*gamma = 0 heads get exactly 0 (q >= 1e-12 keeps it finite)
        dm = (p.lam * p.gamma) * p_y * q_gamma / q * -logp_y
        scale, per_sample = a_y * (m + dm), a_y * m
    else:  # no focal term anywhere: m = 1
        scale = per_sample = a_y
    scale = scale / b
    grad = prob.mul_(scale.unsqueeze(-1))
    grad.scatter_add_(-1, idx, -scale.unsqueeze(-1))
    return (per_sample * -logp_y).mean(0), grad
