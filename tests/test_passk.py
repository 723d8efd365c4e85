"""pass@k: the product-form estimator equals the definition (brute force over all k-subsets) and fails on bad input."""

import itertools
import math

import numpy as np
import pytest

from oapl_megatron.algo.passk import mean_pass_at_k, pass_at_k


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (c of them correct) that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 10])
def test_matches_brute_force_for_every_c_and_k(n):
    for k in range(1, n + 1):
        cs = np.arange(n + 1)
        got = pass_at_k(np.full(n + 1, n), cs, k)  # vectorized over all c at once
        want = np.array([brute_force_pass_at_k(n, int(c), k) for c in cs])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=f"n={n} k={k}")


def test_mixed_n_per_problem_and_closed_form():
    n = np.array([10, 20, 4, 7])
    c = np.array([3, 0, 4, 6])
    got = pass_at_k(n, c, 3)
    want = [1 - math.comb(int(ni) - int(ci), 3) / math.comb(int(ni), 3) for ni, ci in zip(n, c)]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert got[1] == 0.0 and got[2] == 1.0


def test_pass_at_1_is_the_success_rate():
    c = np.array([0, 1, 5, 9, 10])
    np.testing.assert_allclose(pass_at_k(10, c, 1), c / 10, atol=1e-15)


def test_large_n_is_stable():
    # comb(2000, 1000) overflows float64; the product form stays finite and agrees with exact fractions.
    got = pass_at_k(2000, [1, 10, 1500], 1000)
    exact = [1 - math.comb(2000 - c, 1000) / math.comb(2000, 1000) for c in (1, 10, 1500)]  # exact ints, then /
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, exact, rtol=1e-12)


def test_mean_over_problems():
    out = mean_pass_at_k([5, 5], [1, 5], ks=[1, 5])
    assert out == {1: pytest.approx((0.2 + 1.0) / 2), 5: pytest.approx(1.0)}


@pytest.mark.parametrize(
    "n,c,k,match",
    [
        (5, 2, 6, "exceeds the number of samples"),
        ([5, 3], [1, 1], 4, "problem 1: k=4 exceeds"),
        (5, 6, 1, "c=6 must be in"),
        (5, -1, 1, "c=-1 must be in"),
        (5, 1, 0, "k must be >= 1"),
        ([5, 5], [1, 1, 1], 1, "same shape"),
        (5, 1, 1.5, "k must be an integer"),
    ],
)
def test_bad_input_is_an_error(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)
