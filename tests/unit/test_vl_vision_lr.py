"""benchmarks/experiments/vl_vision_lr.py: the shape share of a feature's spread is 1 when the label alone
places the features, near 0 when the label is unrelated to them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.scripts import load_script

EXPERIMENTS = Path(__file__).resolve().parents[2] / "benchmarks/experiments"


@pytest.fixture(scope="module")
def module():
    sys.path.insert(0, str(EXPERIMENTS))
    return load_script("benchmarks/experiments/vl_vision_lr.py")


def test_shape_share_is_one_when_the_label_places_the_features_and_small_when_unrelated(module):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    centres = torch.randn(3, 16, generator=g) * 5
    norm, share = module.shape_share(centres[labels], labels)
    assert share == pytest.approx(1.0) and norm == pytest.approx(float(centres[labels].norm(dim=-1).mean()))
    noise = torch.randn(300, 16, generator=g)
    _, unrelated = module.shape_share(noise, labels)
    assert unrelated < 0.15
    _, mixed = module.shape_share(centres[labels] * 0.2 + noise, labels)
    assert unrelated < mixed < 1.0
