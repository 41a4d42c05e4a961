"""Selective classification: which cells a person should look at, and what that buys.

- `confidence`: the ensemble's top probability.
- `ood_score`: distance of a cell's embedding (view-averaged) from the training embeddings: the
  smallest Mahalanobis distance to a class mean under the shared within-class covariance (Lee et
  al. 2018), fitted on the cached training features. Averaged over members.
- `review`: confidence below t_conf OR ood_score above t_ood, both chosen on the source validation
  fold so that a stated fraction of in-domain cells (default 95%, every class weighing the same)
  is left to the model.
- Risk-coverage: cells ranked by confidence; accuracy and Macro-F1 of the most confident fraction
  against that fraction; AURC = mean error over every coverage k/N (Geifman & El-Yaniv 2017).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wbc.metrics import classification_metrics

COVERAGES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
SHRINK = 0.1  # within-class covariance shrunk towards its diagonal (D is large next to N)


@dataclass
class Mahalanobis:
    """whiten (D, D): Sigma^{-1/2}; centres (C, D): class means already whitened."""

    whiten: np.ndarray
    centres: np.ndarray

    def score(self, feats: np.ndarray) -> np.ndarray:
        """(N, D) or (N, K, D) (views averaged) -> (N,) smallest distance to a class mean."""
        x = np.asarray(feats, np.float64)
        if x.ndim == 3:
            x = x.mean(axis=1)
        z = x @ self.whiten
        d2 = (z * z).sum(1)[:, None] - 2 * z @ self.centres.T + (self.centres ** 2).sum(1)[None]
        return np.sqrt(np.clip(d2.min(axis=1), 0, None))


def fit_mahalanobis(feats: np.ndarray, labels: np.ndarray, num_classes: int,
                    shrink: float = SHRINK) -> Mahalanobis:
    """feats: (N, D) or (N, K, D) training embeddings (views averaged); labels (N,) int."""
    x = np.asarray(feats, np.float64)
    if x.ndim == 3:
        x = x.mean(axis=1)
    y = np.asarray(labels, np.int64)
    means = np.stack([x[y == c].mean(0) if (y == c).any() else x.mean(0) for c in range(num_classes)])
    r = x - means[y]
    cov = r.T @ r / max(len(x) - num_classes, 1)
    cov = (1 - shrink) * cov + shrink * np.diag(np.diag(cov)) + 1e-6 * np.eye(len(cov))
    w, v = np.linalg.eigh(cov)
    whiten = (v * np.clip(w, 1e-9, None) ** -0.5) @ v.T
    return Mahalanobis(whiten, means @ whiten)


@dataclass(frozen=True)
class ReviewRule:
    """review = confidence < conf_min or ood_score > ood_max; chosen for `coverage` in-domain."""

    conf_min: float
    ood_max: float
    coverage: float  # asked-for fraction of validation cells left un-flagged
    achieved: float  # fraction actually left un-flagged on validation
    n_val: int

    def flags(self, confidence: np.ndarray, ood: np.ndarray | None) -> np.ndarray:
        f = np.asarray(confidence) < self.conf_min
        if ood is not None:
            f |= np.asarray(ood) > self.ood_max
        return f

    def to_dict(self) -> dict:
        return {"conf_min": float(self.conf_min), "ood_max": float(self.ood_max),
                "coverage": float(self.coverage), "achieved": float(self.achieved), "n_val": int(self.n_val)}


def class_balanced_weights(labels: np.ndarray) -> np.ndarray:
    """(N,) weights summing to 1 with every class present holding the same total."""
    y = np.asarray(labels)
    _, inv, counts = np.unique(y, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inv]
    return w / w.sum()


def weighted_quantile(x: np.ndarray, q: float, w: np.ndarray) -> float:
    """The smallest x whose cumulative weight (sorted ascending) reaches q; w sums to 1."""
    order = np.argsort(x, kind="stable")
    cw = np.cumsum(w[order])
    return float(x[order][min(np.searchsorted(cw, q - 1e-12), len(x) - 1)])


def choose_review(confidence: np.ndarray, ood: np.ndarray | None, coverage: float = 0.95,
                  labels: np.ndarray | None = None, ood_reference: tuple[np.ndarray, np.ndarray | None] | None = None
                  ) -> ReviewRule:
    """Thresholds leaving at least `coverage` of in-domain cells un-flagged: each score flags
    (1 - coverage) / 2 of its own reference (all of it to confidence without an OOD score), so
    their union flags at most 1 - coverage there (less where the two agree: `achieved`, on
    validation, is then above `coverage`). Deliberately not a joint fit on validation: the
    validation fold also chose the early-stopping epochs, so its confidence runs high, and
    spending the whole budget there flagged twice the asked share of PBC-LT test cells.

    With `labels`, coverage is counted class-balanced (every class weighs the same): validation
    folds are long-tailed like training, while a lab's review load and the held-out test are not;
    rare classes are the least confident, so plain counting flags far more than asked on a
    balanced set (83% un-flagged for 95% asked, PBC-LT test).

    `ood_reference` (scores, labels or None): the OOD threshold is read from these instead of from
    `ood`: `wbc.adapt.reference` passes out-of-fold scores of the training cells with the
    validation ones, five times the cells, rare classes included, where the validation fold alone
    holds 2 cells of the rarest class."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    conf = np.asarray(confidence, np.float64)
    ood_v = None if ood is None else np.asarray(ood, np.float64)
    w = np.full(len(conf), 1 / len(conf)) if labels is None else class_balanced_weights(labels)
    q = (1 - coverage) / (2 if ood_v is not None else 1)
    c = weighted_quantile(conf, q, w) if q > 0 else -np.inf
    o = np.inf
    if ood_v is not None and q > 0:
        ref_o, ref_l = (ood_v, labels) if ood_reference is None else ood_reference
        ref_w = np.full(len(ref_o), 1 / len(ref_o)) if ref_l is None else class_balanced_weights(ref_l)
        o = weighted_quantile(np.asarray(ref_o, np.float64), 1 - q, ref_w)
    kept = float(1 - (w * ReviewRule(c, o, coverage, 0, 0).flags(conf, ood_v)).sum())
    return ReviewRule(c, o, coverage, kept, len(conf))


def risk_coverage(y_true: np.ndarray, y_pred: np.ndarray, score: np.ndarray, num_classes: int,
                  coverages=COVERAGES) -> dict:
    """Accuracy and Macro-F1 of the `score`-highest fraction of cells at each coverage, and AURC.

    y_true, y_pred: (N,) int; score: (N,) higher = more sure (ties keep input order).
    Returns {"points": [{coverage, n, acc, mf1}], "aurc": float, "curve": (coverage, acc) lists}.
    """
    y, p = np.asarray(y_true), np.asarray(y_pred)
    order = np.argsort(-np.asarray(score, np.float64), kind="stable")
    right = (y[order] == p[order]).astype(np.float64)
    n = len(y)
    if n == 0:
        return {"points": [], "aurc": float("nan"), "curve": {"coverage": [], "acc": []}}
    k = np.arange(1, n + 1)
    acc_at = np.cumsum(right) / k
    points = []
    for cov in coverages:
        m = max(1, round(cov * n))
        sel = order[:m]
        mf1 = classification_metrics(y[sel], p[sel], num_classes)["mf1"]
        points.append({"coverage": float(cov), "n": m, "acc": float(acc_at[m - 1]), "mf1": float(mf1)})
    step = max(1, n // 200)  # the curve as drawn: at most ~200 points
    return {"points": points, "aurc": float(np.mean(1 - acc_at)),
            "curve": {"coverage": (k[::step] / n).tolist(), "acc": acc_at[::step].tolist()}}


def flagged_summary(y_true: np.ndarray, y_pred: np.ndarray, review: np.ndarray, num_classes: int) -> dict:
    """Accuracy / Macro-F1 of all cells and of the un-flagged ones, and how many were flagged."""
    y, p, r = np.asarray(y_true), np.asarray(y_pred), np.asarray(review, bool)
    out = {"n": len(y), "n_flagged": int(r.sum()),
           "coverage": float(1 - r.mean()) if len(r) else float("nan")}
    for name, sel in (("all", np.ones(len(y), bool)), ("unflagged", ~r)):
        m = classification_metrics(y[sel], p[sel], num_classes) if sel.any() else {"acc": np.nan, "mf1": np.nan}
        out[f"acc_{name}"], out[f"mf1_{name}"] = float(m["acc"]), float(m["mf1"])
    return out


def selective_report(y_true, y_pred, confidence, review, num_classes: int, rule: dict | None = None) -> dict:
    """Risk-coverage (ranked by confidence) and the review flags' effect, for report.json."""
    out = {"risk_coverage": risk_coverage(y_true, y_pred, confidence, num_classes), "rule": rule}
    if review is not None:
        out["review"] = flagged_summary(y_true, y_pred, review, num_classes)
    return out


def selective_markdown(sel: dict | None) -> list[str]:
    """Report lines: 'at 90% coverage, accuracy X' and what the review flags left."""
    if not sel:
        return []
    rc = sel["risk_coverage"]
    md = ["", "## Confidence: risk-coverage", "",
          ("Cells ranked by confidence (the ensemble's top probability); the most confident fraction "
          "is auto-classified, the rest left to a person."), "",
          "| coverage | cells | accuracy | Macro-F1 |", "|---:|---:|---:|---:|"]
    md += [f"| {100 * p['coverage']:.0f}% | {p['n']} | {100 * p['acc']:.1f} | {100 * p['mf1']:.1f} |"
           for p in rc["points"]]
    md += ["", (f"Area under the risk-coverage curve (AURC, error averaged over coverages; lower is "
           f"better): {rc['aurc']:.3f}.")]
    r = sel.get("review")
    if r:
        rule = sel.get("rule") or {}
        md += ["", (f"Review flags (thresholds for {100 * rule.get('coverage', float('nan')):.0f}% of in-domain "
               f"validation cells un-flagged: confidence < {rule.get('conf_min', float('nan')):.3f} or "
               f"ood_score > {rule.get('ood_max', float('nan')):.2f}): {r['n_flagged']} of {r['n']} cells "
               f"flagged. Un-flagged cells: accuracy {100 * r['acc_unflagged']:.1f}, Macro-F1 "
               f"{100 * r['mf1_unflagged']:.1f}; all cells: accuracy {100 * r['acc_all']:.1f}, Macro-F1 "
               f"{100 * r['mf1_all']:.1f}.")]
    return md
