"""The command-line set-up the verdict-noise scripts share (`vl_depth_gate_noise.py`,
`dae_verdict_noise.py`); the resampling itself lives in `data_contracts.bootstrap`, beside the gates
stage that uses it too."""

from __future__ import annotations

import argparse

from data_contracts.bootstrap import MIN_RESAMPLES


def add_arguments(ap: argparse.ArgumentParser, boot: int, items: str) -> None:
    """`--boot` (default `boot`), `--seed` and `--threads`; `items` names what is resampled."""
    ap.add_argument("--boot", type=int, default=boot, help=f"bootstrap resamples of the {items}")
    ap.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")


def check_arguments(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.boot < MIN_RESAMPLES:
        ap.error(f"--boot {args.boot}: at least {MIN_RESAMPLES} resamples are needed for a 95% interval")
