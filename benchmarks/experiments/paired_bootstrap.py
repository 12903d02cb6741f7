"""The paired bootstrap the verdict-noise scripts share (`vl_depth_gate_noise.py`,
`dae_verdict_noise.py`): resamples of the eval items with replacement, every member or state scored on
the same items, a 95% percentile interval, and the command-line options that set it up."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import numpy as np

MIN_BOOT = 100  # fewer resamples give no usable 2.5% / 97.5% quantiles


def resamples(n: int, boots: int, seed: int) -> Iterator[np.ndarray]:
    """`boots` index arrays of `n` items drawn with replacement from `range(n)` (seeded)."""
    rng = np.random.default_rng(seed)
    for _ in range(boots):
        yield rng.integers(0, n, n)


def interval95(draws: np.ndarray) -> tuple[float, float]:
    """The 2.5% and 97.5% quantiles of `draws`."""
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return float(lo), float(hi)


def add_arguments(ap: argparse.ArgumentParser, boot: int, items: str) -> None:
    """`--boot` (default `boot`), `--seed` and `--threads`; `items` names what is resampled."""
    ap.add_argument("--boot", type=int, default=boot, help=f"bootstrap resamples of the {items}")
    ap.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")


def check_arguments(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.boot < MIN_BOOT:
        ap.error(f"--boot {args.boot}: at least {MIN_BOOT} resamples are needed for a 95% interval")
