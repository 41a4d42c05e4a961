"""Stage-2 losses: class-balanced (effective-number) weights, focal, hybrid, logit-adjusted.

Every registered loss is one point of a single parametric family, so a grid of heads with
different losses trains as one batched computation (`head_losses`):

    z'_j   = z_j + offset_j                     (logit adjustment; 0 for the CE family)
    p_y    = softmax(z')_y                       (the true class's probability, NOT exp(-alpha_y CE))
    L_CE   = -alpha_y log p_y
    L      = (1 - lam) L_CE + lam (1 - p_y)^gamma L_CE

ce: alpha=1, lam=0; cb_ce: alpha=effective-number weights, lam=0; focal: alpha=1, lam=1;
cb_focal_hybrid: the paper's (1-lam) CB-CE + lam CB-focal; logit_adjusted (Menon et al. 2021):
offset = la_tau * log prior; balanced_softmax (Ren et al. 2020): offset = log prior.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from wbc.errors import WbcError
from wbc.registry import Registry


@dataclass(frozen=True)
class LossParams:
    """One head's loss in the shared family. alpha, offset: (C,) float64."""

    alpha: np.ndarray
    gamma: float
    lam: float
    offset: np.ndarray


@dataclass(frozen=True)
class LossSpec:
    """A named loss with its hyper-parameters (unused ones are ignored by that loss)."""

    name: str = "cb_focal_hybrid"
    beta: float = 0.9999  # effective-number beta (Cui et al. 2019); the paper's value
    gamma: float = 2.0  # focal exponent (Lin et al. 2017)
    lam: float = 0.5  # weight of the focal term in the hybrid
    la_tau: float = 1.0  # logit-adjusted loss temperature (Menon et al. 2021)

    def label(self) -> str:
        """A short readable name holding only the parameters this loss uses."""
        used = LOSSES.get(self.name).uses  # type: ignore[attr-defined]
        parts = [f"{k}={getattr(self, k):g}" for k in used]
        return " ".join([self.name, *parts])

    def key(self) -> tuple:
        used = LOSSES.get(self.name).uses  # type: ignore[attr-defined]
        return (self.name, *(getattr(self, k) for k in used))


LossFactory = Callable[[np.ndarray, LossSpec], LossParams]
LOSSES: Registry[LossFactory] = Registry("loss")


def effective_number_weights(counts, beta: float) -> np.ndarray:
    """alpha_j = (1 - beta) / (1 - beta^n_j), normalised to sum to C. counts: (C,) -> (C,).

    beta=0 gives uniform weights; beta -> 1 tends to normalised inverse frequency.
    """
    n = np.asarray(counts, dtype=np.float64)
    check_beta(beta)
    if (n <= 0).any():
        raise WbcError(f"class-balanced weights need every class present; counts {n.astype(int).tolist()}")
    if beta == 0.0:
        w = np.ones_like(n)
    else:
        # -expm1(n log beta) = 1 - beta^n without cancellation for beta close to 1.
        lb = np.log(beta)
        w = np.expm1(lb) / np.expm1(n * lb)
    return w * (len(n) / w.sum())


def check_beta(beta: float) -> None:
    if not 0.0 <= beta < 1.0:
        raise WbcError(f"--beta must be in [0, 1), got {beta:g} (0.9999 is the paper's value)")


def check_spec(spec: LossSpec) -> None:
    """Reject impossible hyper-parameters with a one-line message."""
    LOSSES.get(spec.name)
    check_beta(spec.beta)
    if not spec.gamma >= 0.0:
        raise WbcError(f"--gamma must be >= 0, got {spec.gamma:g} (0 = no focal term)")
    if not 0.0 <= spec.lam <= 1.0:
        raise WbcError(f"--lam must be in [0, 1], got {spec.lam:g} (0 = CB-CE, 1 = CB-focal)")


def _register(name: str, uses: tuple[str, ...]):
    def deco(fn: LossFactory) -> LossFactory:
        fn.uses = uses  # type: ignore[attr-defined]
        return LOSSES.register(name)(fn)

    return deco


def _ones(counts: np.ndarray) -> np.ndarray:
    return np.ones(len(counts), dtype=np.float64)


def _zeros(counts: np.ndarray) -> np.ndarray:
    return np.zeros(len(counts), dtype=np.float64)


def _log_prior(counts: np.ndarray) -> np.ndarray:
    n = np.asarray(counts, dtype=np.float64)
    return np.log(n / n.sum())


@_register("ce", ())
def _ce(counts, s: LossSpec) -> LossParams:
    return LossParams(_ones(counts), 0.0, 0.0, _zeros(counts))


@_register("cb_ce", ("beta",))
def _cb_ce(counts, s: LossSpec) -> LossParams:
    return LossParams(effective_number_weights(counts, s.beta), 0.0, 0.0, _zeros(counts))


@_register("focal", ("gamma",))
def _focal(counts, s: LossSpec) -> LossParams:
    return LossParams(_ones(counts), s.gamma, 1.0, _zeros(counts))


@_register("cb_focal_hybrid", ("beta", "gamma", "lam"))
def _hybrid(counts, s: LossSpec) -> LossParams:
    return LossParams(effective_number_weights(counts, s.beta), s.gamma, s.lam, _zeros(counts))


@_register("logit_adjusted", ("la_tau",))
def _logit_adjusted(counts, s: LossSpec) -> LossParams:
    return LossParams(_ones(counts), 0.0, 0.0, s.la_tau * _log_prior(counts))


@_register("balanced_softmax", ())
def _balanced_softmax(counts, s: LossSpec) -> LossParams:
    return LossParams(_ones(counts), 0.0, 0.0, _log_prior(counts))


def loss_params(spec: LossSpec, counts) -> LossParams:
    check_spec(spec)
    return LOSSES.get(spec.name)(np.asarray(counts), spec)


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
        ps = [loss_params(s, counts) for s in specs]
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
