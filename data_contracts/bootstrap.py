"""Paired bootstrap over eval items: the one home of the resampling that the gates stage
(`data_contracts.gates.gate_intervals`) and the verdict-noise scripts of `benchmarks/experiments/`
share. Items are drawn with replacement; every member (or state) is scored on the same draw, so a
comparison between members keeps their pairing. No GX import.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

MIN_RESAMPLES = 100  # fewer give no usable tail quantiles of a 95% interval


def resamples(n: int, boots: int, seed: int) -> Iterator[np.ndarray]:
    """`boots` index arrays of `n` items drawn with replacement from `range(n)` (seeded)."""
    rng = np.random.default_rng(seed)
    for _ in range(boots):
        yield rng.integers(0, n, n)


def resample_matrix(n: int, boots: int, seed: int) -> np.ndarray:
    """`resamples` as one `boots x n` index array (the same draws, row by row)."""
    if n < 1:
        raise ValueError("no items to resample")
    return np.stack(list(resamples(n, boots, seed)))


def interval(draws: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The central `confidence` percentile interval of `draws`; NaN if any draw is NaN (a statistic
    undefined on some resamples has no interval)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    draws = np.asarray(draws, dtype=float)
    if draws.size == 0 or np.isnan(draws).any():
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2
    lo, hi = np.quantile(draws, [tail, 1.0 - tail])
    return float(lo), float(hi)


def interval95(draws: np.ndarray) -> tuple[float, float]:
    """The 2.5% and 97.5% quantiles of `draws`."""
    return interval(draws, 0.95)
