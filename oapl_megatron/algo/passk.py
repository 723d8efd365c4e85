"""Unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1).

For a problem with ``n`` samples of which ``c`` are correct, the probability that at least one of ``k`` samples
drawn without replacement from the ``n`` is correct is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

The product form avoids the huge binomials (n = 200, k = 100 overflows float64 through ``comb``) and is the
numerically stable form of the paper's reference implementation. Pure numpy: no torch, no distributed imports.

Usage::

    from oapl_megatron.algo.passk import pass_at_k, mean_pass_at_k
    per_problem = pass_at_k(n=[10, 10], c=[3, 0], k=5)    # array of shape [P]
    overall = mean_pass_at_k([10, 10], [3, 0], ks=[1, 5])  # {1: ..., 5: ...}
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def _as_int_array(x: int | Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim > 1:
        raise ValueError(f"{name} must be a scalar or 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{name} must hold integers, got {arr!r}")
        arr = arr.astype(np.int64)
    return np.atleast_1d(arr).astype(np.int64)


def pass_at_k(n: int | Sequence[int] | np.ndarray, c: int | Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """Unbiased pass@k for each problem.

    Args:
        n: samples per problem, shape [P] (or a scalar broadcast over ``c``).
        c: correct samples per problem, shape [P]; 0 <= c <= n.
        k: the k of pass@k; 1 <= k <= min(n).

    Returns:
        float64 array of shape [P] with values in [0, 1].

    Raises:
        ValueError: k < 1, k > n for some problem, c < 0 or c > n, or mismatched shapes.
    """
    if isinstance(k, bool) or int(k) != k:
        raise ValueError(f"k must be an integer, got {k!r}")
    k = int(k)
    n_arr = _as_int_array(n, "n")
    c_arr = _as_int_array(c, "c")
    if n_arr.size == 1 and c_arr.size != 1:
        n_arr = np.full_like(c_arr, n_arr[0])
    if n_arr.shape != c_arr.shape:
        raise ValueError(f"n and c must have the same shape, got {n_arr.shape} and {c_arr.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if np.any(c_arr < 0) or np.any(c_arr > n_arr):
        bad = int(np.flatnonzero((c_arr < 0) | (c_arr > n_arr))[0])
        raise ValueError(f"problem {bad}: c={c_arr[bad]} must be in [0, n={n_arr[bad]}]")
    if np.any(k > n_arr):
        bad = int(np.flatnonzero(k > n_arr)[0])
        raise ValueError(f"problem {bad}: k={k} exceeds the number of samples n={n_arr[bad]}; draw more samples")

    out = np.empty(n_arr.shape, dtype=np.float64)
    # n - c < k: every k-subset contains a correct sample.
    certain = (n_arr - c_arr) < k
    out[certain] = 1.0
    # Product over i in (n-c, n] of (1 - k/i), vectorized by padding each problem's factors to max(c) with ones.
    idx = np.flatnonzero(~certain)
    if idx.size:
        nn, cc = n_arr[idx], c_arr[idx]
        width = int(cc.max()) if cc.size else 0
        j = np.arange(width)[None, :]  # [1, W]
        i = (nn - cc)[:, None] + 1 + j  # [p, W]: n-c+1, ..., n (valid where j < c)
        factors = np.where(j < cc[:, None], 1.0 - k / np.maximum(i, 1).astype(np.float64), 1.0)  # [p, W]
        out[idx] = 1.0 - np.prod(factors, axis=1)
    return out


def mean_pass_at_k(
    n: int | Sequence[int] | np.ndarray, c: Sequence[int] | np.ndarray, ks: Iterable[int]
) -> dict[int, float]:
    """Mean of :func:`pass_at_k` over problems for each k in ``ks``: ``{k: mean over P}``."""
    c_arr = _as_int_array(c, "c")
    if c_arr.size == 0:
        raise ValueError("no problems: c is empty")
    return {int(k): float(pass_at_k(n, c_arr, int(k)).mean()) for k in ks}
