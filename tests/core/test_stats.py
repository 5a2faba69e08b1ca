"""Bootstrap statistics: exactness on degenerate data, pairing, invariances, coverage, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.core.stats import Estimate, bootstrap, diff_ci, gap_recovered, mean_ci, resampled_means

columns = st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=2, max_size=40).map(np.asarray)


def test_constant_column_gives_degenerate_interval():
    est = mean_ci(np.full(50, 2.5), n_boot=200)
    assert (est.value, est.lo, est.hi, est.n) == (2.5, 2.5, 2.5, 50)


def test_resampling_is_joint_across_columns():
    # b = a + 1 exactly: a paired bootstrap sees the same units in both columns, so the difference never varies
    a = np.random.default_rng(0).normal(size=300)
    est = diff_ci(a, a + 1.0, n_boot=300)
    assert est.value == pytest.approx(-1.0)
    assert est.lo == pytest.approx(-1.0) and est.hi == pytest.approx(-1.0)


def test_group_bootstrap_resamples_whole_groups():
    x = np.random.default_rng(1).normal(size=30)
    # three identical copies per group: resampling groups must equal resampling the distinct values
    tripled = resampled_means({"x": np.repeat(x, 3)}, 64, seed=5, groups=np.repeat(np.arange(30), 3))["x"]
    np.testing.assert_allclose(tripled, resampled_means({"x": x}, 64, seed=5)["x"])
    # with one group, every replicate is the full mean: a degenerate interval
    est = mean_ci(x, n_boot=50, groups=np.zeros(30))
    assert est.lo == pytest.approx(x.mean()) and est.hi == pytest.approx(x.mean())
    with pytest.raises(ValueError, match="29 labels"):
        mean_ci(x, groups=np.zeros(29))


def test_resampled_means_are_deterministic_and_seed_dependent():
    x = {"x": np.arange(20.0)}
    a, b, c = resampled_means(x, 50, seed=1)["x"], resampled_means(x, 50, seed=1)["x"], resampled_means(x, 50, 2)["x"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@settings(max_examples=30, deadline=None)
@given(columns, st.floats(-50, 50, allow_nan=False))
def test_mean_interval_is_shift_equivariant(x, shift):
    a, b = mean_ci(x, n_boot=100, seed=3), mean_ci(x + shift, n_boot=100, seed=3)
    assert a.lo <= a.hi
    for u, v in ((a.value, b.value), (a.lo, b.lo), (a.hi, b.hi)):
        assert v == pytest.approx(u + shift, abs=1e-6 * (1 + abs(u) + abs(shift)))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.1, 10), st.floats(-5, 5))
def test_gap_recovered_is_invariant_to_affine_rescaling(seed, scale, shift):
    rng = np.random.default_rng(seed)
    raw = rng.normal(2.0, 0.3, 64)
    drop = raw + 0.5 + rng.normal(0, 0.05, 64)
    gist = raw + 0.1 + rng.normal(0, 0.05, 64)
    a = gap_recovered(drop, gist, raw, n_boot=100, seed=seed)
    b = gap_recovered(drop * scale + shift, gist * scale + shift, raw * scale + shift, n_boot=100, seed=seed)
    for u, v in ((a.value, b.value), (a.lo, b.lo), (a.hi, b.hi)):
        assert v == pytest.approx(u, rel=1e-6, abs=1e-9)


def test_gap_recovered_endpoints():
    rng = np.random.default_rng(0)
    raw = rng.normal(3.0, 0.5, 100)
    drop = raw + rng.uniform(0.2, 0.4, 100)
    assert gap_recovered(drop, raw, raw, n_boot=100).value == pytest.approx(1.0)
    assert gap_recovered(drop, drop, raw, n_boot=100).value == pytest.approx(0.0)
    halfway = gap_recovered(drop, (drop + raw) / 2, raw, n_boot=100)
    assert halfway.value == pytest.approx(0.5) and halfway.lo == pytest.approx(0.5) and halfway.hi == pytest.approx(0.5)


def test_undefined_ratio_replicates_are_counted_not_hidden():
    x = np.ones(10)
    est = gap_recovered(x, x, x, n_boot=40)
    assert est.n_invalid == 40 and np.isnan(est.lo) and np.isnan(est.hi)
    assert est.format() == "n/a"


def test_interval_coverage_is_near_nominal():
    rng = np.random.default_rng(123)
    trials, hits = 200, 0
    for i in range(trials):
        x = rng.exponential(1.0, 150)  # skewed, true mean 1
        est = mean_ci(x, n_boot=400, seed=i)
        hits += est.lo <= 1.0 <= est.hi
    assert 0.88 <= hits / trials <= 0.99


def test_custom_statistic_and_format():
    est = bootstrap({"a": np.array([1.0, 2.0, 3.0]), "b": np.array([2.0, 4.0, 6.0])}, lambda m: m["b"] / m["a"],
                    n_boot=50)
    assert est.value == pytest.approx(2.0) and est.lo == pytest.approx(2.0)
    assert Estimate(1.0, 0.5, 1.5, 3).format(2) == "1.00 [0.50, 1.50]"
    assert set(est.to_dict()) == {"value", "lo", "hi", "n", "n_invalid"}


@pytest.mark.parametrize("cols, kw, match", [
    ({"a": np.ones(3), "b": np.ones(4)}, {}, "sizes"),
    ({"a": np.ones(0)}, {}, "at least one unit"),
    ({}, {}, "at least one column"),
    ({"a": np.ones(3)}, {"alpha": 1.5}, "alpha=1.5"),
    ({"a": np.ones(3)}, {"n_boot": 0}, "n_boot=0"),
])
def test_bad_inputs_name_the_problem(cols, kw, match):
    with pytest.raises(ValueError, match=match):
        bootstrap(cols, lambda m: next(iter(m.values())), **kw)
