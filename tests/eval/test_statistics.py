import numpy as np
import pytest

from d2l_jax.eval.statistics import bootstrap_interval, gap_ratio, mean_and_interval, paired_bootstrap_interval


def test_interval_contains_the_mean_and_narrows_with_more_questions():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 500, 5000):
        values = rng.uniform(0, 1, n)
        low, high = bootstrap_interval(values, seed=1)
        assert low <= values.mean() <= high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    # The standard error of a uniform's mean is 0.289 / sqrt(n): a 95% interval spans about 3.92 of them.
    assert widths[1] == pytest.approx(3.92 * 0.2887 / np.sqrt(500), rel=0.2)


def test_constant_values_give_a_point_interval():
    assert bootstrap_interval([0.25] * 10) == (0.25, 0.25)
    assert mean_and_interval([1.0, 1.0]) == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 2}


def test_paired_interval_of_the_gap_ratio():
    rng = np.random.default_rng(0)
    none = rng.uniform(0, 0.2, 400)
    in_context = none + rng.uniform(0.2, 0.6, 400)
    method = none + 0.5 * (in_context - none)  # closes half the gap on every question
    point = gap_ratio(method.mean(), none.mean(), in_context.mean())
    assert point == pytest.approx(0.5)
    low, high = paired_bootstrap_interval(gap_ratio, {"method": method, "none": none, "in_context": in_context})
    # Paired resampling keeps the per-question relation, so the interval stays at 0.5.
    assert low == pytest.approx(0.5) and high == pytest.approx(0.5)
    noisy = method + rng.normal(0, 0.1, 400)
    low, high = paired_bootstrap_interval(gap_ratio, {"method": noisy, "none": none, "in_context": in_context})
    assert low < gap_ratio(noisy.mean(), none.mean(), in_context.mean()) < high


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="no values"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval([1.0], confidence=1.5)
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap_interval(gap_ratio, {"method": [1.0], "none": [0.0, 1.0], "in_context": [1.0]})
