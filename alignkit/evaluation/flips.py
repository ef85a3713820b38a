"""Negative-flip metrics of a model update (MUSCLE, Echterhoff et al. 2024), pure and vectorised.

Given per-item results of the old and the new model on the same items:

discrete (correct / wrong per item)
    NFR    negative flip rate: share of ALL items the old model got right and the new one gets wrong
    PFR    positive flip rate: share of all items old wrong, new right
    NFR_mc share of all items where the new prediction is wrong AND differs from the old prediction
           (multi-class form: also counts a wrong answer changed into another wrong answer); "differs"
           is about the answers: with a verifier, the answers it extracts (``changed``, from
           :meth:`~alignkit.verifiers.base.Verifier.same_answer_batch`), raw values only for exact-match data
    NFI    negative flip impact: NFR / new error rate (how much of the new model's error is regression)
    BTC    backward trust compatibility: share of old-correct items the new model keeps correct
    accuracy old / new / delta

continuous (a score per item: ROUGE, verifier score, log-likelihood)
    D = S_new − S_old per item; NFR / PFR = share of items with D < −τ / D > τ (τ ≥ 0 a threshold);
    m_g = mean D over the gains, m_r = mean |D| over the regressions.

:func:`bootstrap_ci` gives percentile bootstrap intervals for any of these, resampling items;
:func:`mcnemar_test` is the paired test of the accuracy change (exact binomial on the discordant
pairs, which are exactly the negative and positive flips).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np


def _bool_array(values, name: str) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if a.dtype != bool:
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans (or 0/1)")
        a = a.astype(bool)
    return a


@dataclass
class FlipMetrics:
    items: int
    accuracy_old: float
    accuracy_new: float
    accuracy_delta: float
    negative_flips: int
    positive_flips: int
    nfr: float
    pfr: float
    nfr_mc: float | None
    nfi: float
    btc: float

    def to_dict(self) -> dict:
        return asdict(self)


def flip_metrics(old_correct, new_correct, old_pred=None, new_pred=None, *, changed=None) -> FlipMetrics:
    """Discrete flip metrics from per-item correctness (and, for NFR_mc, whether the answer changed).

    NFR_mc needs per item whether the new answer differs from the old one: ``changed`` (booleans, e.g.
    the negation of a verifier's ``same_answer_batch``, which compares extracted answers), or else
    ``old_pred`` / ``new_pred`` compared as values (exact-match data). Without either it is ``None``.

    Edge cases: with no items every rate is 0; with no old-correct item BTC is 1 (nothing to keep);
    with a perfect new model NFI is 0 (no error to attribute).
    """
    old = _bool_array(old_correct, "old_correct")
    new = _bool_array(new_correct, "new_correct")
    if old.shape != new.shape:
        raise ValueError(f"old and new cover different numbers of items: {old.size} vs {new.size}")
    n = old.size
    neg = int(np.count_nonzero(old & ~new))
    pos = int(np.count_nonzero(~old & new))
    old_right = int(np.count_nonzero(old))
    new_wrong = n - int(np.count_nonzero(new))
    nfr_mc = None
    if changed is not None:
        changed = _bool_array(changed, "changed")
        if changed.shape != old.shape:
            raise ValueError(f"changed covers {changed.size} items, the correctness arrays {old.size}")
    elif old_pred is not None and new_pred is not None:
        op, np_ = np.asarray(old_pred, dtype=object), np.asarray(new_pred, dtype=object)
        if op.shape != old.shape or np_.shape != old.shape:
            raise ValueError("predictions must cover the same items as the correctness arrays")
        changed = op != np_
    if changed is not None:
        nfr_mc = float(np.count_nonzero(~new & changed)) / n if n else 0.0
    acc_old = old_right / n if n else 0.0
    acc_new = (n - new_wrong) / n if n else 0.0
    nfr = neg / n if n else 0.0
    return FlipMetrics(
        items=n,
        accuracy_old=acc_old,
        accuracy_new=acc_new,
        accuracy_delta=acc_new - acc_old,
        negative_flips=neg,
        positive_flips=pos,
        nfr=nfr,
        pfr=pos / n if n else 0.0,
        nfr_mc=nfr_mc,
        nfi=neg / new_wrong if new_wrong else 0.0,
        btc=(old_right - neg) / old_right if old_right else 1.0,
    )


@dataclass
class ScoreFlipMetrics:
    items: int
    threshold: float
    mean_old: float
    mean_new: float
    nfr: float
    pfr: float
    mean_gain: float  # m_g: mean D over items with D > threshold (0 if none)
    mean_regression: float  # m_r: mean |D| over items with D < −threshold (0 if none)

    def to_dict(self) -> dict:
        return asdict(self)


def score_flip_metrics(old_scores, new_scores, threshold: float = 0.0) -> ScoreFlipMetrics:
    """Flip metrics of continuous per-item scores: D = new − old, flips by the sign of D beyond ``threshold``."""
    old = np.asarray(old_scores, dtype=np.float64)
    new = np.asarray(new_scores, dtype=np.float64)
    if old.shape != new.shape or old.ndim != 1:
        raise ValueError(f"old and new scores must be 1-D and the same length: {old.shape} vs {new.shape}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if np.isnan(old).any() or np.isnan(new).any():
        raise ValueError("scores contain NaN")
    n = old.size
    d = new - old
    gains, regressions = d > threshold, d < -threshold
    return ScoreFlipMetrics(
        items=n,
        threshold=threshold,
        mean_old=float(old.mean()) if n else 0.0,
        mean_new=float(new.mean()) if n else 0.0,
        nfr=float(regressions.mean()) if n else 0.0,
        pfr=float(gains.mean()) if n else 0.0,
        mean_gain=float(d[gains].mean()) if gains.any() else 0.0,
        mean_regression=float(-d[regressions].mean()) if regressions.any() else 0.0,
    )


def bootstrap_ci(
    statistic: Callable[..., float],
    *arrays,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*arrays)``, resampling items (paired across arrays).

    ``statistic`` takes index-aligned 1-D arrays and returns a number, e.g.
    ``lambda o, n: flip_metrics(o, n).nfr``. One call per resample; for a plain rate of a 0/1 array
    :func:`rate_ci` is the vectorised shortcut.
    """
    arrays = [np.asarray(a) for a in arrays]
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError("arrays must have the same length")
    if n == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    values = np.empty(samples)
    for b in range(samples):
        idx = rng.integers(0, n, n)
        values[b] = statistic(*(a[idx] for a in arrays))
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return float(lo), float(hi)


def rate_ci(flags, samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the mean of a 0/1 per-item array (e.g. negative-flip indicators), vectorised:
    the resampled count of ones is binomial(n, p̂)."""
    flags = _bool_array(flags, "flags")
    n = flags.size
    if n == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    rates = rng.binomial(n, flags.mean(), size=samples) / n
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(rates, [alpha, 1 - alpha])
    return float(lo), float(hi)


def mcnemar_test(old_correct, new_correct) -> dict:
    """Paired test of the accuracy change: exact two-sided binomial test on the discordant items.

    Under H0 (same accuracy) a discordant item is a negative or a positive flip with probability ½.
    Returns ``{"negative_flips", "positive_flips", "p_value"}``.
    """
    old = _bool_array(old_correct, "old_correct")
    new = _bool_array(new_correct, "new_correct")
    return mcnemar_from_counts(np.count_nonzero(old & ~new), np.count_nonzero(~old & new))


# ------------------------------------------------------------------------------------ large-n forms


def flip_count_bootstrap(
    old_correct,
    new_correct,
    changed=None,
    *,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every discrete flip metric, in O(samples) whatever the item count.

    Every discrete metric is a function of how many items fall in each (old right?, new right?,
    prediction changed?) category. Resampling n items with replacement and counting the categories is
    *the same random draw* as taking the counts from Multinomial(n, observed category shares), so this
    is the item bootstrap of :func:`bootstrap_ci`, drawn without touching the items. ``changed``
    (per-item "new prediction differs from old") adds the interval of NFR_mc.

    Returns ``{"accuracy_old", "accuracy_new", "accuracy_delta", "nfr", "pfr", "nfi", "btc"}`` (and
    ``"nfr_mc"``) mapped to ``(low, high)``; the edge-case conventions of :func:`flip_metrics` apply
    within each resample.
    """
    old = _bool_array(old_correct, "old_correct")
    new = _bool_array(new_correct, "new_correct")
    if old.shape != new.shape:
        raise ValueError(f"old and new cover different numbers of items: {old.size} vs {new.size}")
    n = old.size
    chg = None if changed is None else _bool_array(changed, "changed")
    if chg is not None and chg.shape != old.shape:
        raise ValueError("changed must cover the same items as the correctness arrays")
    # key bits: 1 old right, 2 new right, 4 prediction changed (only with ``changed``; else NFR_mc is not
    # reported): 0 kept wrong, 1 negative flip, 2 positive flip, 3 kept right, each + 4 when changed
    key = old.view(np.uint8) | (new.view(np.uint8) << 1)
    if chg is not None:
        key = key | (chg.view(np.uint8) << 2)
    by_key = np.bincount(key, minlength=8)
    counts = np.array([
        by_key[3] + by_key[7], by_key[2] + by_key[6], by_key[5], by_key[1], by_key[4], by_key[0],
    ])
    keys = ["accuracy_old", "accuracy_new", "accuracy_delta", "nfr", "pfr", "nfi", "btc"] + (["nfr_mc"] if chg is not None else [])
    if n == 0:
        return {k: (0.0, 0.0) for k in keys}
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts / n, size=samples).astype(np.float64)
    kept, pos, neg_c, neg_s, kw_c, kw_s = draws.T
    neg, kw = neg_c + neg_s, kw_c + kw_s
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = {
            "accuracy_old": (kept + neg) / n,
            "accuracy_new": (kept + pos) / n,
            "accuracy_delta": (pos - neg) / n,
            "nfr": neg / n,
            "pfr": pos / n,
            "nfi": np.where(neg + kw > 0, neg / np.maximum(neg + kw, 1), 0.0),
            "btc": np.where(kept + neg > 0, kept / np.maximum(kept + neg, 1), 1.0),
        }
        if chg is not None:
            stats["nfr_mc"] = (neg_c + kw_c) / n
    alpha = (1 - confidence) / 2
    out = {}
    for key in keys:
        lo, hi = np.quantile(stats[key], [alpha, 1 - alpha])
        out[key] = (float(lo), float(hi))
    return out


def score_flip_bootstrap(
    old_scores,
    new_scores,
    threshold: float = 0.0,
    *,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    max_work: int = 5_000_000,
) -> tuple[dict[str, tuple[float, float]], str]:
    """Intervals of the continuous flip metrics: ``({"nfr", "pfr", "mean_delta"}: (low, high)), method``.

    NFR and PFR by the multinomial count bootstrap (exact item resampling, any n). The mean score delta
    by a percentile item bootstrap while ``n * samples <= max_work``, else by the normal approximation
    mean ± z·sd/√n (the bootstrap's large-n limit); ``method`` says which was used.
    """
    old = np.asarray(old_scores, dtype=np.float64)
    new = np.asarray(new_scores, dtype=np.float64)
    if old.shape != new.shape or old.ndim != 1:
        raise ValueError(f"old and new scores must be 1-D and the same length: {old.shape} vs {new.shape}")
    n = old.size
    if n == 0:
        return {"nfr": (0.0, 0.0), "pfr": (0.0, 0.0), "mean_delta": (0.0, 0.0)}, "none (no items)"
    d = new - old
    counts = np.array([np.count_nonzero(d < -threshold), np.count_nonzero(d > threshold)])
    counts = np.append(counts, n - counts.sum())
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts / n, size=samples) / n
    alpha = (1 - confidence) / 2
    out = {
        "nfr": tuple(float(v) for v in np.quantile(draws[:, 0], [alpha, 1 - alpha])),
        "pfr": tuple(float(v) for v in np.quantile(draws[:, 1], [alpha, 1 - alpha])),
    }
    if n * samples <= max_work:
        means = np.empty(samples)
        for b in range(samples):
            means[b] = d[rng.integers(0, n, n)].mean()
        out["mean_delta"] = tuple(float(v) for v in np.quantile(means, [alpha, 1 - alpha]))
        method = f"percentile bootstrap, {samples} item resamples"
    else:
        z = statistics.NormalDist().inv_cdf(1 - alpha)
        half = z * float(d.std(ddof=1) if n > 1 else 0.0) / math.sqrt(n)
        out["mean_delta"] = (float(d.mean()) - half, float(d.mean()) + half)
        method = f"normal approximation (n = {n} too large for {samples} item resamples)"
    return out, method


def mcnemar_from_counts(negative_flips: int, positive_flips: int) -> dict:
    """:func:`mcnemar_test` from the two discordant counts b (negative) and c (positive flips), vectorised
    (fast for millions of flips): p = min(1, 2·P(X ≤ min(b, c))), X ~ Binomial(b + c, ½), in log space.
    """
    b, c = int(negative_flips), int(positive_flips)
    m = b + c
    if m == 0:
        return {"negative_flips": 0, "positive_flips": 0, "p_value": 1.0}
    k = min(b, c)
    i = np.arange(1, k + 1, dtype=np.float64)
    # log C(m, i) = Σ_{j ≤ i} log((m − j + 1) / j), accumulated
    log_binom = np.concatenate([[0.0], np.cumsum(np.log(m - i + 1) - np.log(i))]) - m * math.log(2)
    top = float(log_binom.max())
    tail = math.exp(top) * float(np.exp(log_binom - top).sum())
    return {"negative_flips": b, "positive_flips": c, "p_value": min(1.0, 2 * tail)}
