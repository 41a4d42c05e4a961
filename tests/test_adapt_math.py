"""The maths of `wbc adapt` against independent references: alignment (mean/std, CORAL), cell scale on
synthetic discs, EM priors, review thresholds and the risk-coverage curve."""

import numpy as np
import pytest
from scipy.linalg import sqrtm

from wbc.adapt.align import fit_alignment, moments
from wbc.adapt.priors import em_priors, reweight
from wbc.adapt.scale import estimate_zoom, relative_size, sizes
from wbc.metrics import classification_metrics
from wbc.selective import choose_review, fit_mahalanobis, risk_coverage


def _pair(seed=0, n=4000, d=6):
    rng = np.random.default_rng(seed)
    # well-conditioned mixing (+ 2 I): the EPS floor on eigenvalues must not matter here
    src = rng.normal(size=(n, d)) @ (rng.normal(size=(d, d)) + 2 * np.eye(d)) + rng.normal(size=d) * 3
    tgt = rng.normal(size=(n, d)) @ (rng.normal(size=(d, d)) + 2 * np.eye(d)) * 0.5 + rng.normal(size=d)
    return src, tgt


def test_meanstd_alignment_matches_numpy():
    src, tgt = _pair()
    al = fit_alignment(moments(src), moments(tgt), "meanstd")
    ref = (tgt - tgt.mean(0)) / tgt.std(0, ddof=1) * src.std(0, ddof=1) + src.mean(0)
    np.testing.assert_allclose(al.apply(tgt), ref, rtol=1e-4, atol=1e-4)
    out = al.apply(tgt).astype(np.float64)
    np.testing.assert_allclose(out.mean(0), src.mean(0), atol=1e-4)
    np.testing.assert_allclose(out.std(0, ddof=1), src.std(0, ddof=1), rtol=1e-4)


def test_moments_accept_views_and_chunks():
    src, _ = _pair(n=600)
    m = moments(src.reshape(100, 6, 6).astype(np.float32), chunk=7)  # (N, K, D): every view a sample
    np.testing.assert_allclose(m.cov, np.cov(src.reshape(-1, 6), rowvar=False), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shrink", [0.0, 0.3])
def test_coral_matches_scipy_reference(shrink):
    src, tgt = _pair(1)

    def shrunk(x):
        c = np.cov(x, rowvar=False)
        return (1 - shrink) * c + shrink * np.diag(np.diag(c)) + 1e-6 * np.eye(len(c))

    ref = (tgt - tgt.mean(0)) @ np.real(np.linalg.inv(sqrtm(shrunk(tgt))) @ sqrtm(shrunk(src))) + src.mean(0)
    al = fit_alignment(moments(src), moments(tgt), "coral", shrink=shrink)
    np.testing.assert_allclose(al.apply(tgt), ref, rtol=1e-3, atol=1e-3)
    if shrink == 0:  # unshrunk CORAL gives the target exactly the source's covariance
        np.testing.assert_allclose(np.cov(al.apply(tgt).astype(np.float64), rowvar=False),
                                   np.cov(src, rowvar=False), rtol=1e-3, atol=1e-3)


def test_alignment_round_trips_through_arrays():
    src, tgt = _pair(2)
    al = fit_alignment(moments(src), moments(tgt), "coral")
    from wbc.adapt.align import Alignment

    back = Alignment.from_arrays("coral", al.arrays())
    np.testing.assert_array_equal(back.apply(tgt), al.apply(tgt))


def disc_image(rng, side=200, radius=0.12, crowd=0):
    """A dark-violet nucleus disc at the centre on a pale background, with `crowd` pink red cells
    (mid density) touching it: the case a two-level threshold merges into the nucleus."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    img = np.empty((side, side, 3), np.float64)
    img[:] = (225, 215, 220)
    r = radius * rng.uniform(0.95, 1.05)
    for k in range(crowd):
        a = 2 * np.pi * k / max(crowd, 1)
        cy, cx = 0.5 + (r + 0.1) * np.sin(a), 0.5 + (r + 0.1) * np.cos(a)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 0.11 ** 2] = (205, 120, 140)
    img[(yy - 0.5) ** 2 + (xx - 0.5) ** 2 < r ** 2] = (80, 40, 120)
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_relative_size_of_a_disc():
    rng = np.random.default_rng(0)
    im = disc_image(rng, radius=0.15)
    assert relative_size(im) == pytest.approx(np.sqrt(np.pi) * 0.15, rel=0.08)


@pytest.mark.parametrize("crowd", [0, 5])
def test_zoom_recovers_a_known_scale_and_one_when_scales_match(crowd):
    rng = np.random.default_rng(1)
    src = sizes(disc_image(rng, radius=0.1, crowd=crowd) for _ in range(30))
    big = sizes(disc_image(rng, radius=0.16, crowd=crowd) for _ in range(30))
    same = sizes(disc_image(rng, radius=0.1, crowd=crowd) for _ in range(30))
    est = estimate_zoom(src, big)
    assert est.zoom == pytest.approx(0.1 / 0.16, rel=0.06) and est.reason == "scales differ"
    assert est.low < est.raw < est.high
    assert estimate_zoom(src, same).zoom == 1.0
    # 15% apart, clearly measured: still 1 (a class-mix change moves nucleus sizes that much)
    near = sizes(disc_image(rng, radius=0.1 / 0.85, crowd=crowd) for _ in range(30))
    est = estimate_zoom(src, near)
    assert est.high < 1.0 and est.zoom == 1.0 and "within 20%" in est.reason


def test_zoom_counts_unmeasurable_images_and_refuses_too_few():
    rng = np.random.default_rng(2)
    blank = np.full((100, 100, 3), 220, np.uint8)
    src = sizes(disc_image(rng) for _ in range(10))
    tgt = sizes([*(disc_image(rng) for _ in range(8)), blank, blank])
    assert estimate_zoom(src, tgt).n_unmeasured == 2
    with pytest.raises(ValueError, match="measurable"):
        estimate_zoom(src, sizes([blank] * 10))


def test_em_recovers_shifted_priors():
    """Calibrated posteriors of a 1-D Gaussian problem trained under uniform priors."""
    rng = np.random.default_rng(0)
    true_pi = np.array([0.7, 0.2, 0.1])
    mus = np.array([-2.0, 0.0, 2.0])
    y = rng.choice(3, 20000, p=true_pi)
    x = rng.normal(mus[y], 1.0)
    lik = np.exp(-0.5 * (x[:, None] - mus[None]) ** 2)
    post = lik / lik.sum(1, keepdims=True)  # uniform source priors
    pi, _ = em_priors(post)
    np.testing.assert_allclose(pi, true_pi, atol=0.02)
    # the corrected posteriors are the Bayes posteriors under the true priors
    bayes = lik * true_pi
    np.testing.assert_allclose(reweight(post, pi, np.full(3, 1 / 3)), bayes / bayes.sum(1, keepdims=True),
                               atol=0.03)


def test_review_rule_leaves_at_least_the_asked_coverage():
    """Each score flags half the budget of its reference: independent scores leave 0.95^2 of the
    cells, scores that agree leave 95%; never less than the 90% asked."""
    rng = np.random.default_rng(0)
    conf, ood = rng.uniform(size=2000), rng.normal(size=2000)
    rule = choose_review(conf, ood, 0.9)
    assert (conf < rule.conf_min).mean() == pytest.approx(0.05, abs=0.001)
    assert (ood > rule.ood_max).mean() == pytest.approx(0.05, abs=0.001)
    assert rule.achieved == pytest.approx(0.95 * 0.95, abs=0.01) and rule.achieved >= 0.9
    assert 1 - rule.flags(conf, ood).mean() == pytest.approx(rule.achieved)
    same = choose_review(conf, -conf, 0.9)  # one ordering: the two halves flag the same cells
    assert same.achieved == pytest.approx(0.95, abs=0.001)
    only_conf = choose_review(conf, None, 0.95)
    assert only_conf.conf_min == pytest.approx(0.05, abs=0.01)


def test_review_rule_reads_the_ood_threshold_from_its_reference():
    rng = np.random.default_rng(1)
    conf, ood = rng.uniform(size=500), rng.normal(size=500)
    ref = rng.normal(2.0, 1.0, 5000)
    rule = choose_review(conf, ood, 0.9, ood_reference=(ref, None))
    assert rule.ood_max == pytest.approx(np.quantile(ref, 0.95), abs=0.01)
    assert (conf < rule.conf_min).mean() == pytest.approx(0.05, abs=0.003)


def test_out_of_fold_ood_scores_each_fold_without_it():
    from wbc.adapt.reference import out_of_fold_ood

    rng = np.random.default_rng(2)
    y = np.tile(np.arange(3), 100)
    x = rng.normal(size=(300, 6)) + 2 * np.eye(3, 6)[y]
    folds = np.repeat(np.arange(3), 100)
    got = out_of_fold_ood(x, y, folds, 3)
    for k in range(3):  # independently: fit on the other folds, score fold k
        m = fit_mahalanobis(x[folds != k], y[folds != k], 3)
        np.testing.assert_allclose(got[folds == k], m.score(x[folds == k]))
    assert got.mean() > fit_mahalanobis(x, y, 3).score(x).mean()  # in-sample scores run small
    assert out_of_fold_ood(x, y, np.zeros(300, int), 3) is None


def test_review_rule_class_balanced_coverage_transfers_to_a_balanced_set():
    """Validation long-tailed (9000 common, 1000 rare cells), the rare class less confident: with the
    labels, 90% coverage is counted per class, so a balanced set drawn from the same classes keeps
    ~90% (plain counting keeps ~86% there, having spent the flags on the rare class)."""
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(9000, int), np.ones(1000, int)]
    conf = np.where(labels == 0, rng.uniform(0.5, 1.0, 10000), rng.uniform(0.0, 0.7, 10000))
    rule = choose_review(conf, None, 0.9, labels)
    w = np.where(labels == 0, 1 / 9000, 1 / 1000) / 2  # independent: each class half the weight
    kept = (w * ~rule.flags(conf, None)).sum()
    assert 0.9 <= kept <= 0.9 + 0.00051 and rule.achieved == pytest.approx(kept)  # within one rare cell
    bal = np.r_[rng.uniform(0.5, 1.0, 5000), rng.uniform(0.0, 0.7, 5000)]
    assert 1 - rule.flags(bal, None).mean() == pytest.approx(0.9, abs=0.02)
    plain = choose_review(conf, None, 0.9)
    assert 1 - plain.flags(bal, None).mean() < 0.88


def test_risk_coverage_matches_brute_force():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    p = np.where(rng.uniform(size=300) < 0.7, y, rng.integers(0, 4, 300))
    score = rng.uniform(size=300)
    rc = risk_coverage(y, p, score, 4)
    order = np.argsort(-score)
    for pt in rc["points"]:
        sel = order[: pt["n"]]
        assert pt["acc"] == pytest.approx((y[sel] == p[sel]).mean())
        assert pt["mf1"] == pytest.approx(classification_metrics(y[sel], p[sel], 4)["mf1"])
    errs = [1 - (y[order[:k]] == p[order[:k]]).mean() for k in range(1, 301)]
    assert rc["aurc"] == pytest.approx(np.mean(errs))


def test_mahalanobis_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 5)) + np.repeat(np.eye(5)[:2] * 4, 250, axis=0)
    y = np.repeat([0, 1], 250)
    m = fit_mahalanobis(x, y, 2, shrink=0.0)
    means = np.stack([x[y == c].mean(0) for c in range(2)])
    r = x - means[y]
    prec = np.linalg.inv(r.T @ r / (len(x) - 2) + 1e-6 * np.eye(5))
    q = rng.normal(size=(7, 5)) * 3
    ref = np.sqrt(np.min([np.einsum("nd,de,ne->n", q - mu, prec, q - mu) for mu in means], axis=0))
    np.testing.assert_allclose(m.score(q), ref, rtol=1e-6)


def test_prototypes_follow_shifted_classes():
    """Two classes whose target clusters moved: the source means misclassify, the prototypes
    re-estimated from the (imperfect) posteriors recover them."""
    from wbc.adapt.protos import fit_prototypes, prototype_probs

    rng = np.random.default_rng(0)
    src_means = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    tgt_means = np.array([[1.0, 0.0, 0.9], [0.2, 1.0, 0.9]])  # both moved along a new axis, class 1 also drifted
    y = rng.integers(0, 2, 400)
    x = tgt_means[y] + rng.normal(0, 0.1, (400, 3))
    probs = prototype_probs(x, src_means / np.linalg.norm(src_means, axis=1, keepdims=True), tau=1.0)
    probs = 0.6 * probs + 0.4 * rng.dirichlet([1, 1], 400)  # noisy posteriors
    cent = fit_prototypes(x, probs, src_means)
    assert (prototype_probs(x, cent).argmax(1) == y).mean() > 0.97
    unit = tgt_means / np.linalg.norm(tgt_means, axis=1, keepdims=True)
    assert np.allclose(cent, unit, atol=0.05)


def test_mix_weights_restore_the_source_class_mix():
    """Weighted, the predicted classes of the target take the source's frequencies (renormalised
    over the classes predicted at all); the weights average 1."""
    from wbc.adapt.mix import mix_weights, source_mix, weighted_draw

    pi_s = source_mix(np.r_[np.zeros(60, int), np.ones(30, int), np.full(10, 2), np.full(5, 3)], 5)
    np.testing.assert_allclose(pi_s, [60 / 105, 30 / 105, 10 / 105, 5 / 105, 0])
    pred = np.r_[np.zeros(10, int), np.ones(40, int), np.full(50, 2)]  # class 3 never predicted
    w = mix_weights(pred, pi_s)
    assert w.mean() == pytest.approx(1.0)
    got = np.array([w[pred == k].sum() for k in range(3)]) / w.sum()
    np.testing.assert_allclose(got, pi_s[:3] / pi_s[:3].sum())
    draw = weighted_draw(w, seed=0)
    assert len(draw) == 200 and np.all(np.diff(draw) >= 0)
    share = np.bincount(pred[draw], minlength=3) / len(draw)
    np.testing.assert_allclose(share, pi_s[:3] / pi_s[:3].sum(), atol=0.08)
    np.testing.assert_array_equal(draw, weighted_draw(w, seed=0))


def test_weighted_moments_match_numpy():
    from wbc.adapt.align import moments

    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(40, 3, 5)), rng.uniform(size=40)
    m = moments(x, chunk=7, weights=w)
    flat, ww = x.reshape(-1, 5), np.repeat(w, 3)
    np.testing.assert_allclose(m.mean, np.average(flat, axis=0, weights=ww))
    np.testing.assert_allclose(m.cov, np.cov(flat.T, aweights=ww))
    plain = moments(x, chunk=7)
    np.testing.assert_allclose(plain.cov, np.cov(flat.T))


@pytest.mark.parametrize("n_val", [6, 40, 488])
def test_in_domain_share_matches_a_simulation(n_val):
    """The guard's in-domain baseline: the share of fresh draws above np.quantile(val, 0.95) of
    n_val draws from the same distribution, averaged over many validation sets (Monte Carlo)."""
    from wbc.adapt.steps import in_domain_share

    rng = np.random.default_rng(0)
    val = rng.standard_normal((4000, n_val))
    q = np.quantile(val, 0.95, axis=1)
    fresh = rng.standard_normal((4000, 200))
    share = (fresh > q[:, None]).mean()
    # exact at integer ranks; between them numpy interpolates values, not ranks: within 8%
    assert abs(share - in_domain_share(n_val)) < 0.08 * share
    assert abs(in_domain_share(10**6) - 0.05) < 1e-4
