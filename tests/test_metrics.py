"""regression_metrics on vectors small enough to score by hand (the working is in comments)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from psamf.metrics import CONVENTIONS, METRIC_KEYS, regression_metrics

# One vector exercising every convention at once.
T = [2.0, -1.0, 0.0, 0.5, -2.5]
P = [1.5, -0.5, 0.4, -0.2, -3.5]


def test_keys_match_conventions():
    m = regression_metrics(P, T)
    assert list(m) == list(METRIC_KEYS) == list(CONVENTIONS)
    assert all(isinstance(v, float) for v in m.values())
    assert all(isinstance(v, str) and v for v in CONVENTIONS.values())


def test_hand_worked_vector():
    m = regression_metrics(P, T)
    # |p - t| = 0.5, 0.5, 0.4, 0.7, 1.0 -> 3.1 / 5
    assert m["mae"] == pytest.approx(0.62)
    # acc7: clip(p, +-3) = [1.5, -0.5, 0.4, -0.2, -3] -> round [2, -0, 0, -0, -3]
    #       t             = [2, -1, 0, 0.5, -2.5]      -> round [2, -1, 0,  0, -2]
    #       equal at 0, 2, 3 -> 3/5
    assert m["acc7"] == pytest.approx(0.6)
    # acc5: clip to +-2 turns p[4] = -3.5 and t[4] = -2.5 both into -2 -> equal at 0, 2, 3, 4 -> 4/5
    assert m["acc5"] == pytest.approx(0.8)
    # Has0: t >= 0 = [T, F, T, T, F]; p >= 0 = [T, F, T, F, F]; only sample 3 wrong -> 4/5
    #   class T (support 3): tp 2, fp 0, fn 1 -> P 1, R 2/3, F1 0.8
    #   class F (support 2): tp 2, fp 1, fn 0 -> P 2/3, R 1, F1 0.8  -> weighted 0.8
    assert m["has0_acc2"] == pytest.approx(0.8)
    assert m["has0_f1"] == pytest.approx(0.8)
    # Non0: sample 2 (t = 0) dropped; t > 0 = [T, F, T, F]; p > 0 = [T, F, F, F] -> 3/4
    #   y_true = t: class T (support 2) F1 2/3; class F (support 2) F1 0.8 -> (2/3 + 0.8) / 2
    assert m["non0_acc2"] == pytest.approx(0.75)
    assert m["non0_f1"] == pytest.approx((2 / 3 + 0.8) / 2)  # 0.7333
    # MulT: same subset and accuracy, but y_true = p: class T has support 1 (F1 2/3),
    #   class F support 3 (tp 2, fn 1, fp 0 -> F1 0.8) -> (1 * 2/3 + 3 * 0.8) / 4 = 0.7667
    assert m["mult_acc2"] == m["non0_acc2"]
    assert m["mult_f1"] == pytest.approx((2 / 3 + 3 * 0.8) / 4)
    assert m["mult_f1"] != pytest.approx(m["non0_f1"])  # the argument swap matters


def test_corr_by_hand():
    # deviations p: -1, 0, 1; t: -1, 1, 0 -> cov 1, both sums of squares 2 -> r = 1/2
    assert regression_metrics([1, 2, 3], [1, 3, 2])["corr"] == pytest.approx(0.5)
    assert regression_metrics([1, 2, 3], [2, 4, 6])["corr"] == pytest.approx(1.0)
    assert regression_metrics([1, 2, 3], [3, 2, 1])["corr"] == pytest.approx(-1.0)


def test_ties_at_zero():
    # t = 0 is positive in Has0 and dropped in Non0; p = 0 is positive in Has0, negative in Non0.
    m = regression_metrics([0.0, 0.0, 0.0], [0.0, 1.0, -1.0])
    # Has0: t >= 0 = [T, T, F], p >= 0 = [T, T, T] -> 2/3
    assert m["has0_acc2"] == pytest.approx(2 / 3)
    # Non0: keeps t = 1, -1; t > 0 = [T, F], p > 0 = [F, F] -> 1/2
    assert m["non0_acc2"] == pytest.approx(0.5)
    # A t = 0 sample predicted negative: wrong under Has0, invisible to Non0.
    m = regression_metrics([-0.4, 1.0], [0.0, 1.0])
    assert m["has0_acc2"] == pytest.approx(0.5)
    assert m["non0_acc2"] == pytest.approx(1.0)


def test_rounding_half_to_even():
    # np.round: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> -0, -1.5 -> -2, -2.5 -> -2 (all match t)
    # Half-away-from-zero would give 1, 2, 3, -1, -2, -3 and match only 2 of 6.
    p = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5]
    t = [0.0, 2.0, 2.0, 0.0, -2.0, -2.0]
    m = regression_metrics(p, t)
    assert m["acc7"] == 1.0
    assert m["acc5"] == 1.0
    # and the rounding applies to labels as well: t = 0.5 is class 0, t = 1.5 is class 2
    assert regression_metrics([0.0, 2.0], [0.5, 1.5])["acc7"] == 1.0


def test_clipping():
    # acc7: clip p = [3, -2.4] -> [3, -2]; t = [3, -3] -> 1/2
    # acc5: clip p = [2, -2], clip t = [2, -2] -> 2/2
    m = regression_metrics([4.0, -2.4], [3.0, -3.0])
    assert m["acc7"] == pytest.approx(0.5)
    assert m["acc5"] == pytest.approx(1.0)
    # far outside the range still lands in the end class
    assert regression_metrics([100.0, -100.0], [3.0, -3.0])["acc7"] == 1.0


def test_constant_predictions_do_not_crash():
    p, t = [0.3] * 4, [1.0, -1.0, 2.0, -2.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from corrcoef, no sklearn warnings
        m = regression_metrics(p, t)
    assert math.isnan(m["corr"])
    # Has0: p >= 0 all T; t >= 0 = [T, F, T, F] -> acc 1/2
    #   y_true = t: T (support 2) P 1/2 R 1 F1 2/3; F (support 2) never predicted F1 0 -> 1/3
    assert m["has0_acc2"] == pytest.approx(0.5)
    assert m["has0_f1"] == pytest.approx(1 / 3)
    # MulT swap: y_true = p is all T (support 4): tp 2, fn 2 -> F1 2/3; class F has weight 0
    assert m["mult_f1"] == pytest.approx(2 / 3)
    assert m["mae"] == pytest.approx((0.7 + 1.3 + 1.7 + 2.3) / 4)


def test_all_zero_labels_leave_non0_undefined():
    m = regression_metrics([0.1, -0.1], [0.0, 0.0])
    for k in ("non0_acc2", "non0_f1", "mult_acc2", "mult_f1"):
        assert math.isnan(m[k])
    assert m["has0_acc2"] == pytest.approx(0.5)


def test_inputs_any_array_like_and_shape_checks():
    torch = pytest.importorskip("torch")
    a = regression_metrics(torch.tensor(P).view(-1, 1), torch.tensor(T))  # [N,1] model outputs are fine
    b = regression_metrics(np.array(P, dtype=np.float32), T)
    assert a == pytest.approx(b)
    with pytest.raises(ValueError, match="preds has 2 values but labels has 3"):
        regression_metrics([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="non-finite"):
        regression_metrics([float("nan"), 1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="no samples"):
        regression_metrics([], [])
