"""Negative-flip metrics against hand-computed values, including the edge cases."""

import numpy as np
import pytest

from alignkit.evaluation.flips import bootstrap_ci, flip_metrics, mcnemar_test, rate_ci, score_flip_metrics

#            items:  0  1  2  3  4  5  6  7  8  9
OLD = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], bool)
NEW = np.array([1, 1, 1, 1, 0, 0, 1, 0, 0, 0], bool)


def test_hand_computed_table():
    m = flip_metrics(OLD, NEW)
    # negative flips: items 4, 5; positive flip: item 6
    assert (m.negative_flips, m.positive_flips) == (2, 1)
    assert m.nfr == pytest.approx(0.2) and m.pfr == pytest.approx(0.1)
    assert (m.accuracy_old, m.accuracy_new) == (pytest.approx(0.6), pytest.approx(0.5))
    assert m.accuracy_delta == pytest.approx(-0.1)
    assert m.nfi == pytest.approx(2 / 5)  # new errors: items 4, 5, 7, 8, 9
    assert m.btc == pytest.approx(4 / 6)
    assert m.nfr_mc is None


def test_multiclass_nfr_counts_wrong_to_other_wrong():
    old_pred = ["a", "b", "c", "x", "y"]
    new_pred = ["a", "z", "c", "w", "y"]
    reference = ["a", "b", "c", "d", "e"]
    old = [p == r for p, r in zip(old_pred, reference)]
    new = [p == r for p, r in zip(new_pred, reference)]
    m = flip_metrics(old, new, old_pred, new_pred)
    assert m.nfr == pytest.approx(1 / 5)  # item 1: right -> wrong
    assert m.nfr_mc == pytest.approx(2 / 5)  # items 1 and 3 (x -> w, both wrong); item 4 unchanged


def test_nfr_mc_from_changed_answers():
    """``changed`` (the verifier's answer comparison) replaces comparing the prediction values."""
    old, new = [True, False, False, False], [True, False, False, True]
    worded = ["The answer is 4.", "The answer is 5.", "The answer is 3.", "The answer is 6."]
    reworded = ["#### 4", r"So $\boxed{5}$.", "The answer is 7.", "#### 6"]
    assert flip_metrics(old, new, worded, reworded).nfr_mc == pytest.approx(2 / 4)  # the raw texts all differ
    changed = [False, False, True, False]  # item 1: the same wrong answer 5, worded differently
    m = flip_metrics(old, new, worded, reworded, changed=changed)
    assert m.nfr_mc == pytest.approx(1 / 4)  # only item 2 (3 -> 7, both wrong)
    assert flip_metrics(old, new, changed=changed).nfr_mc == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="changed covers 3 items"):
        flip_metrics(old, new, changed=[True, False, True])


def test_edge_cases():
    same = flip_metrics(OLD, OLD)
    assert same.nfr == same.pfr == 0 and same.btc == 1.0
    nobody_right = flip_metrics([0, 0, 0], [1, 0, 0])
    assert nobody_right.btc == 1.0 and nobody_right.nfr == 0 and nobody_right.pfr == pytest.approx(1 / 3)
    all_flipped = flip_metrics([1, 1, 1], [0, 0, 0])
    assert all_flipped.nfr == 1.0 and all_flipped.btc == 0.0 and all_flipped.nfi == 1.0
    perfect_new = flip_metrics([0, 1], [1, 1])
    assert perfect_new.nfi == 0.0
    empty = flip_metrics([], [])
    assert empty.items == 0 and empty.nfr == 0.0
    with pytest.raises(ValueError, match="different numbers of items"):
        flip_metrics([1, 0], [1])
    with pytest.raises(ValueError, match="booleans"):
        flip_metrics([0.5], [1])


def test_continuous_scores():
    old = [0.5, 0.5, 0.5, 0.5]
    new = [0.9, 0.45, 0.1, 0.5]
    m = score_flip_metrics(old, new)
    assert m.nfr == pytest.approx(0.5) and m.pfr == pytest.approx(0.25)
    assert m.mean_gain == pytest.approx(0.4) and m.mean_regression == pytest.approx((0.05 + 0.4) / 2)
    t = score_flip_metrics(old, new, threshold=0.1)
    assert t.nfr == pytest.approx(0.25) and t.mean_regression == pytest.approx(0.4)
    assert score_flip_metrics(old, old).nfr == 0 and score_flip_metrics(old, old).mean_gain == 0
    with pytest.raises(ValueError, match="NaN"):
        score_flip_metrics([float("nan")], [1.0])


def test_mcnemar_exact_values():
    # 2 negative vs 1 positive flips: p = 2 * P(X <= 1), X ~ Bin(3, 1/2) = 2 * 4/8 = 1
    assert mcnemar_test(OLD, NEW)["p_value"] == pytest.approx(1.0)
    # 10 vs 0: p = 2 * 0.5**10
    old, new = np.ones(10, bool), np.zeros(10, bool)
    assert mcnemar_test(old, new)["p_value"] == pytest.approx(2 * 0.5**10)
    assert mcnemar_test(old, old)["p_value"] == 1.0


def test_bootstrap_intervals_cover_the_estimate_and_shrink_with_n():
    rng = np.random.default_rng(1)
    old = rng.random(400) < 0.7
    new = np.where(rng.random(400) < 0.1, ~old, old)
    nfr = flip_metrics(old, new).nfr
    lo, hi = bootstrap_ci(lambda o, n: flip_metrics(o, n).nfr, old, new, samples=300)
    assert lo <= nfr <= hi and hi - lo < 0.08
    flags = old & ~new
    rlo, rhi = rate_ci(flags, samples=2000)
    assert rlo <= nfr <= rhi and abs((rhi - rlo) - (hi - lo)) < 0.02
    big = np.repeat(flags, 25)
    blo, bhi = rate_ci(big)
    assert bhi - blo < (rhi - rlo) / 3
