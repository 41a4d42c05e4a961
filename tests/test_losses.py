"""Stage-2 losses against textbook references (CE, class-balanced weights, focal, hybrid)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wbc.errors import WbcError
from wbc.losses import LOSSES, LossSpec, effective_number_weights
from wbc.stage2.batched_loss import StackedLoss, head_losses, head_losses_and_grad

COUNTS = np.array([500, 120, 30, 7, 2])
C = len(COUNTS)


def _batch(seed=0, b=64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, C, generator=g) * scale, torch.randint(0, C, (b,), generator=g)


def _loss(spec: LossSpec, z, y):
    """Our loss for one head: (B, C) logits -> scalar."""
    return head_losses(z[:, None, :], y, StackedLoss.build([spec], COUNTS))[0]


def _ref(z, y, alpha, gamma, lam):
    """The issue's formula, written out: p_y is the softmax probability of the true class."""
    p_y = torch.softmax(z, 1).gather(1, y[:, None]).squeeze(1)
    ce = -torch.as_tensor(alpha, dtype=z.dtype)[y] * torch.log(p_y)
    return ((1 - lam) * ce + lam * (1 - p_y) ** gamma * ce).mean()


def test_effective_number_weights_formula_and_limits():
    beta = 0.99
    raw = (1 - beta) / (1 - beta ** COUNTS.astype(float))
    np.testing.assert_allclose(effective_number_weights(COUNTS, beta), raw * C / raw.sum(), rtol=1e-12)
    np.testing.assert_allclose(effective_number_weights(COUNTS, 0.0), np.ones(C))  # beta=0: uniform
    inv = 1.0 / COUNTS
    # beta -> 1: normalised inverse frequency (the gap shrinks like (1 - beta) * n).
    np.testing.assert_allclose(effective_number_weights(COUNTS, 1 - 1e-9), inv * C / inv.sum(), rtol=1e-6)
    assert effective_number_weights(COUNTS, 0.9999).sum() == pytest.approx(C)


def test_focal_gamma0_equals_ce_and_ce_matches_torch():
    z, y = _batch()
    ce = F.cross_entropy(z, y)
    torch.testing.assert_close(_loss(LossSpec("ce"), z, y), ce)
    torch.testing.assert_close(_loss(LossSpec("focal", gamma=0.0), z, y), ce)
    # and the hybrid with uniform weights (beta=0) and gamma=0 is CE whatever lam is
    torch.testing.assert_close(_loss(LossSpec("cb_focal_hybrid", beta=0.0, gamma=0.0, lam=0.7), z, y), ce)


@pytest.mark.parametrize("beta,gamma", [(0.9999, 2.0), (0.99, 0.5), (0.999, 1.0)])
def test_hybrid_endpoints_are_cb_ce_and_cb_focal(beta, gamma):
    z, y = _batch(1)
    alpha = effective_number_weights(COUNTS, beta)
    cb_ce = _ref(z, y, alpha, gamma, 0.0)
    cb_focal = _ref(z, y, alpha, gamma, 1.0)
    torch.testing.assert_close(_loss(LossSpec("cb_focal_hybrid", beta, gamma, 0.0), z, y), cb_ce)
    torch.testing.assert_close(_loss(LossSpec("cb_ce", beta), z, y), cb_ce)
    torch.testing.assert_close(_loss(LossSpec("cb_focal_hybrid", beta, gamma, 1.0), z, y), cb_focal)
    torch.testing.assert_close(_loss(LossSpec("cb_focal_hybrid", beta, gamma, 0.5), z, y),
                               0.5 * cb_ce + 0.5 * cb_focal)
    # cb_ce is also torch's per-sample weighted CE averaged over the batch (not over the weights)
    w = torch.tensor(alpha, dtype=torch.float32)
    torch.testing.assert_close(cb_ce, (w[y] * F.cross_entropy(z, y, reduction="none")).mean())


def test_focal_uses_p_y_not_exp_of_weighted_ce():
    """The known trap: exp(-alpha_y CE) is not p_y when alpha_y != 1."""
    z, y = _batch(2, scale=1.0)
    alpha = effective_number_weights(COUNTS, 0.9999)
    ours = _loss(LossSpec("cb_focal_hybrid", 0.9999, 2.0, 1.0), z, y)
    ce = -torch.log_softmax(z, 1).gather(1, y[:, None]).squeeze(1)
    a = torch.tensor(alpha, dtype=torch.float32)[y]
    wrong = ((1 - torch.exp(-a * ce)) ** 2 * a * ce).mean()
    torch.testing.assert_close(ours, _ref(z, y, alpha, 2.0, 1.0))
    assert abs(float(ours - wrong)) > 1e-3


def test_gradients_match_reference():
    z, y = _batch(3)
    alpha = effective_number_weights(COUNTS, 0.999)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    _loss(LossSpec("cb_focal_hybrid", 0.999, 2.0, 0.5), z1, y).backward()
    _ref(z2, y, alpha, 2.0, 0.5).backward()
    torch.testing.assert_close(z1.grad, z2.grad)


def test_gradients_finite_when_true_class_is_certain():
    z = torch.tensor([[60.0, 0, 0, 0, 0]], requires_grad=True)  # p_y == 1 in float32
    for gamma in (0.0, 0.5, 2.0):
        z.grad = None
        _loss(LossSpec("focal", gamma=gamma), z, torch.tensor([0])).backward()
        assert torch.isfinite(z.grad).all()


def test_logit_adjusted_and_balanced_softmax():
    z, y = _batch(4)
    log_prior = torch.tensor(np.log(COUNTS / COUNTS.sum()), dtype=torch.float32)
    torch.testing.assert_close(_loss(LossSpec("logit_adjusted", la_tau=1.5), z, y),
                               F.cross_entropy(z + 1.5 * log_prior, y))
    torch.testing.assert_close(_loss(LossSpec("balanced_softmax"), z, y),
                               F.cross_entropy(z + torch.log(torch.tensor(COUNTS, dtype=torch.float32)), y))


def test_batched_heads_equal_heads_alone():
    specs = [LossSpec(n, b, g, lam) for n in LOSSES.names() for b, g, lam in [(0.99, 1.0, 0.3), (0.9999, 2.0, 0.5)]]
    g = torch.Generator().manual_seed(5)
    z = torch.randn(32, len(specs), C, generator=g) * 2
    y = torch.randint(0, C, (32,), generator=g)
    batched = head_losses(z, y, StackedLoss.build(specs, COUNTS))
    alone = torch.stack([_loss(s, z[:, i], y) for i, s in enumerate(specs)])
    torch.testing.assert_close(batched, alone)


@pytest.mark.parametrize("kw,msg", [({"beta": 1.0}, "--beta"), ({"beta": -0.1}, "--beta"),
                                    ({"gamma": -1.0}, "--gamma"), ({"lam": 1.5}, "--lam"),
                                    ({"lam": -0.1}, "--lam"), ({"name": "cb_foca"}, "unknown loss")])
def test_bad_hyper_parameters_are_user_errors(kw, msg):
    with pytest.raises(WbcError, match=msg):
        StackedLoss.build([LossSpec(**kw)], COUNTS)


def test_absent_class_is_a_user_error():
    with pytest.raises(WbcError, match="every class"):
        effective_number_weights([10, 0, 3], 0.99)


def test_labels_name_only_the_used_parameters():
    assert LossSpec("ce", beta=0.5).label() == "ce"
    assert LossSpec("cb_ce", beta=0.99).label() == "cb_ce beta=0.99"
    assert LossSpec().label() == "cb_focal_hybrid beta=0.9999 gamma=2 lam=0.5"


def test_closed_form_gradient_equals_autograd_for_every_loss():
    specs = [LossSpec(n, b, g, lam) for n in LOSSES.names()
             for b, g, lam in [(0.99, 0.0, 0.5), (0.9999, 2.0, 0.5), (0.999, 0.5, 1.0), (0.9, 1.0, 0.0)]]
    gen = torch.Generator().manual_seed(6)
    z = (torch.randn(40, len(specs), C, generator=gen, dtype=torch.float64) * 4).requires_grad_()
    z.data[0, :, 0] = 80.0  # a certain sample (p_y = 1), where gamma < 1 is delicate
    y = torch.randint(0, C, (40,), generator=gen)
    y[0] = 0
    params = StackedLoss.build(specs, COUNTS)
    params = StackedLoss(*(t.double() for t in (params.alpha, params.gamma, params.lam, params.offset)))
    losses, grad = head_losses_and_grad(z.detach(), y, params)
    head_losses(z, y, params).sum().backward()
    torch.testing.assert_close(losses, head_losses(z.detach(), y, params))
    torch.testing.assert_close(grad, z.grad)
