"""Stage-2 losses: class-balanced (effective-number) weights, focal, hybrid, logit-adjusted.

Every registered loss is one point of a single parametric family, so a grid of heads with
different losses trains as one batched computation (`wbc.stage2.batched_loss`):

    z'_j   = z_j + offset_j                     (logit adjustment; 0 for the CE family)
    p_y    = softmax(z')_y                       (the true class's probability, NOT exp(-alpha_y CE))
    L_CE   = -alpha_y log p_y
    L      = (1 - lam) L_CE + lam (1 - p_y)^gamma L_CE

A registered loss is its point (beta, gamma, lam, tau): alpha = effective-number weights at
beta (0 = uniform), offset = tau * log prior. ce (0, 0, 0, 0); cb_ce (beta, 0, 0, 0); focal
(0, gamma, 1, 0); cb_focal_hybrid (beta, gamma, lam, 0), the paper's (1-lam) CB-CE + lam CB-focal;
logit_adjusted (Menon et al. 2021) (0, 0, 0, la_tau); balanced_softmax (Ren et al. 2020) (0, 0, 0, 1).
Different points can be the same loss (gamma 0 or lam 0: CB-CE); `LossSpec.key` says which.
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

    def point(self) -> tuple[float, float, float, float]:
        """(beta, gamma, lam, tau): this loss in the family's coordinates, alpha = effective-number
        weights at beta (0 = uniform), the focal term (gamma, lam), offset = tau * log prior
        (tau: the logit adjustment's temperature, not the head's tau-normalisation)."""
        return LOSSES.get(self.name).point(self)

    def key(self) -> tuple[float, float, float, float]:
        """Equal exactly when two specs are the same loss function, whatever their names.

        The point, made canonical: with gamma = 0 the focal factor (1 - p_y)^0 is 1 and with
        lam = 0 it is unused, so either is the (CB-)CE point (0, 0) whatever the other is.
        So focal gamma=0 = ce, cb_focal_hybrid lam=1 beta=0 = focal, logit_adjusted la_tau=1 =
        balanced_softmax, and ce ignores beta.
        """
        beta, gamma, lam, tau = self.point()
        if gamma == 0.0 or lam == 0.0:
            gamma = lam = 0.0
        return (float(beta), float(gamma), float(lam), float(tau))

    def params(self, counts) -> LossParams:
        """This loss's point of the family for training class counts (C,)."""
        beta, gamma, lam, tau = self.point()
        counts = np.asarray(counts)
        # beta = 0 skips the weights' check, so CE trains with a class absent from the training rows.
        alpha = effective_number_weights(counts, beta) if beta else np.ones(len(counts))
        offset = tau * _log_prior(counts) if tau else np.zeros(len(counts))
        return LossParams(alpha, float(gamma), float(lam), offset)


@dataclass(frozen=True)
class Loss:
    """A registry entry: a spec's point (beta, gamma, lam, tau) and the fields it reads."""

    point: Callable[[LossSpec], tuple[float, float, float, float]]
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


def _log_prior(counts: np.ndarray) -> np.ndarray:
    n = np.asarray(counts, dtype=np.float64)
    return np.log(n / n.sum())


def _register(name: str, uses: tuple[str, ...], point: Callable[[LossSpec], tuple]) -> None:
    LOSSES.register(name)(Loss(point, uses))


_register("ce", (), lambda s: (0.0, 0.0, 0.0, 0.0))
_register("cb_ce", ("beta",), lambda s: (s.beta, 0.0, 0.0, 0.0))
_register("focal", ("gamma",), lambda s: (0.0, s.gamma, 1.0, 0.0))
_register("cb_focal_hybrid", ("beta", "gamma", "lam"), lambda s: (s.beta, s.gamma, s.lam, 0.0))
_register("logit_adjusted", ("la_tau",), lambda s: (0.0, 0.0, 0.0, s.la_tau))  # Menon et al. 2021
_register("balanced_softmax", (), lambda s: (0.0, 0.0, 0.0, 1.0))  # Ren et al. 2020
