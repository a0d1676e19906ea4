"""How good a length predictor is: mean absolute error and Spearman rank correlation.

A shortest-job-first scheduler only needs the *order* of jobs to be right, so rank correlation (Spearman) is the
figure that predicts the scheduler's gain; MAE in tokens says how far off single predictions are. Written with
numpy alone so the core does not need scipy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rank(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks starting at 1, ties given the mean of the ranks they span (as Spearman's rho needs)."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(predicted: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation in [-1, 1]; NaN when either side is constant or shorter than 2."""
    p, a = np.asarray(predicted, dtype=float), np.asarray(actual, dtype=float)
    if p.shape != a.shape:
        raise ValueError(f"predicted has {p.shape} values and actual {a.shape}: pass one prediction per actual")
    if len(p) < 2:
        return float("nan")
    rp, ra = rank(p), rank(a)
    if rp.std() == 0 or ra.std() == 0:
        return float("nan")
    return float(np.corrcoef(rp, ra)[0, 1])


def length_errors(predicted: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray) -> dict[str, float]:
    """MAE (tokens), median absolute error, mean absolute log2 ratio and Spearman of predictions vs actual lengths."""
    p, a = np.asarray(predicted, dtype=float), np.asarray(actual, dtype=float)
    if p.shape != a.shape or len(p) == 0:
        raise ValueError(f"need one prediction per actual length; got {p.shape} and {a.shape}")
    err = np.abs(p - a)
    return {
        "n": float(len(p)),
        "mae": float(err.mean()),
        "median_ae": float(np.median(err)),
        "mean_abs_log2_ratio": float(np.mean(np.abs(np.log2((1 + p) / (1 + a))))),
        "spearman": spearman(p, a),
    }
