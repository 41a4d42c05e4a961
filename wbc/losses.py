"""Stage-2 losses: class-balanced (effective-number) weights, focal, hybrid, logit-adjusted.

Every registered loss is one point of a single parametric family, so a grid of heads with
different losses trains as one batched computation (`wbc.stage2.batched_loss`):

    z'_j   = z_j + offset_j                     (logit adjustment; 0 for the CE family)
    p_y    = softmax(z')_y                       (the true class's probability, NOT exp(-alpha_y CE))
    L_CE   = -alpha_y log p_y
    L      = (1 - lam) L_CE + lam (1 - p_y)^gamma L_CE

ce: alpha=1, lam=0; cb_ce: alpha=effective-number weights, lam=0; focal: alpha=1, lam=1;
cb_focal_hybrid: the paper's (1-lam) CB-CE + lam CB-focal; logit_adjusted (Menon et al. 2021):
offset = la_tau * log prior; balanced_softmax (Ren et al. 2020): offset = log prior.
This module is numpy only (no torch), so the CLI can list the registry's names cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

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
    """A named loss with its hyper-parameters (unused ones are ignored by that loss).

    Checked once, when made: an unknown name or an impossible value is a one-line WbcError.
    """

    name: str = "cb_focal_hybrid"
    beta: float = 0.9999  # effective-number beta (Cui et al. 2019); the paper's value
    gamma: float = 2.0  # focal exponent (Lin et al. 2017)
    lam: float = 0.5  # weight of the focal term in the hybrid
    la_tau: float = 1.0  # logit-adjusted loss temperature (Menon et al. 2021)

    def __post_init__(self) -> None:
        LOSSES.get(self.name)
        check_beta(self.beta)
        if not self.gamma >= 0.0:
            raise WbcError(f"--gamma must be >= 0, got {self.gamma:g} (0 = no focal term)")
        if not 0.0 <= self.lam <= 1.0:
            raise WbcError(f"--lam must be in [0, 1], got {self.lam:g} (0 = CB-CE, 1 = CB-focal)")
        if not (self.gamma < math.inf and math.isfinite(self.la_tau)):
            raise WbcError(f"gamma and la_tau must be finite, got {self.gamma:g} and {self.la_tau:g}")

    @property
    def uses(self) -> tuple[str, ...]:
        """The hyper-parameters this loss reads (the registry's data)."""
        return LOSSES.get(self.name).uses

    def label(self) -> str:
        """A short readable name holding only the parameters this loss uses."""
        return " ".join([self.name, *(f"{k}={getattr(self, k):g}" for k in self.uses)])

    def key(self) -> tuple:
        """Equal for two specs no loss can tell apart (ce ignores beta...)."""
        return (self.name, *(getattr(self, k) for k in self.uses))

    def params(self, counts) -> LossParams:
        """This loss's point of the family for training class counts (C,)."""
        return LOSSES.get(self.name).make(np.asarray(counts), self)


@dataclass(frozen=True)
class Loss:
    """A registry entry: how a spec becomes the family's parameters, and which fields it reads."""

    make: Callable[[np.ndarray, LossSpec], LossParams]
    uses: tuple[str, ...]


LOSSES: Registry[Loss] = Registry("loss")


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


def _register(name: str, uses: tuple[str, ...]):
    def deco(fn: Callable[[np.ndarray, LossSpec], LossParams]):
        LOSSES.register(name)(Loss(fn, uses))
        return fn

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
