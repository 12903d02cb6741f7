"""The privacy attacks (tasks/training/privacy.py) detect leaks and do not invent them.

Small rendered clips (tasks/data/camgen.py, 8 identities, 32x32 frames); edge features are the clips'
pixels average-pooled to 8x8 (identity clearly present). A deliberately leaky release (the features
themselves) must be re-identified far above chance, from the features and from rebuilt frames; a
constant release must give chance; a mapping trained with beta = 0 and no adversary keeps identity
and fails the re-identification target.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from tasks.data.camgen import BEHAVIOURS, make_splits
from tasks.training.privacy import (
    AttackConfig,
    AuditData,
    MappingConfig,
    accuracy,
    audit,
    clip_tensor,
    macro_f1,
    meets_targets,
    psnr,
    ssim,
    train_frame_identifier,
    train_mapping,
)
from tests.scripts import load_script

N_IDS = 8
ATTACK = AttackConfig(
    max_epochs=150, patience=6, eval_every=5, draws=2, decoder_epochs=200, decoder_width=32, decoder_lr=2e-3
)


@pytest.fixture(scope="module")
def setup() -> tuple[AuditData, torch.nn.Module]:
    torch.manual_seed(0)
    data = make_splits(160, 80, n_identities=N_IDS, n_frames=2, size=32, seed=0)
    frames_tr, frames_te = clip_tensor(data.train.frames), clip_tensor(data.test.frames)
    audit_data = AuditData(
        F.avg_pool2d(frames_tr, 4).flatten(1),
        frames_tr,
        torch.as_tensor(data.train.behaviour),
        torch.as_tensor(data.train.identity),
        F.avg_pool2d(frames_te, 4).flatten(1),
        frames_te,
        torch.as_tensor(data.test.behaviour),
        torch.as_tensor(data.test.identity),
        len(BEHAVIOURS),
        N_IDS,
    )
    identifier = train_frame_identifier(frames_tr, audit_data.train_identity, N_IDS, epochs=12)
    return audit_data, identifier


def test_raw_frame_identifier_recognises_people(setup) -> None:
    data, identifier = setup
    assert accuracy(identifier, data.test_frames, data.test_identity) > 0.7


def test_attacks_detect_a_leaky_release(setup) -> None:
    data, identifier = setup
    out = audit(lambda x, g: x, data, identifier, ATTACK)
    chance = out["reid_chance"]
    assert chance == pytest.approx(max(torch.bincount(data.test_identity)).item() / len(data.test_identity))
    assert out["reid_accuracy_mlp"] > chance + 0.3, out
    assert out["reid_accuracy_linear"] > chance + 0.3, out
    assert out["inversion_reid_accuracy"] > chance + 0.15, out
    assert out["inversion_psnr"] > 15, out
    assert not meets_targets({**out, "behaviour_f1": 1.0, "behaviour_f1_raw": 1.0})["all"]


def test_a_constant_release_gives_chance(setup) -> None:
    data, identifier = setup
    # constant input: the decoder can only learn the mean clip, a short budget suffices
    out = audit(lambda x, g: torch.zeros(len(x), 8), data, identifier, replace(ATTACK, decoder_epochs=10))
    chance = out["reid_chance"]
    assert out["reid_accuracy_mlp"] <= chance + 0.05 and out["reid_accuracy_linear"] <= chance + 0.05, out
    assert out["inversion_reid_accuracy"] <= chance + 0.05, out
    checks = meets_targets({**out, "behaviour_f1": 1.0, "behaviour_f1_raw": 1.0})
    assert checks["reid"] and checks["inversion"]


def test_beta_zero_without_adversary_leaks_and_the_adversary_removes_it(setup) -> None:
    """The same mapping trained for behaviour with beta = 0 and no adversary keeps some identity (the
    audit fails it); with beta > 0 and the identity adversary re-identification drops to chance.
    (On these clips task training alone already removes much of it: docs/choices.md#privacy.)"""
    data, _ = setup
    rows = {}
    for name, beta, adv in (("leaky", 0.0, 0.0), ("private", 0.01, 1.0)):
        cfg = MappingConfig(
            out_dim=128, hidden=128, beta=beta, adv_weight=adv, steps=100 if adv == 0 else 300
        )
        trained = train_mapping(
            data.train_features, data.train_behaviour, data.train_identity, len(BEHAVIOURS), N_IDS, cfg
        )
        rows[name] = audit(trained.release_fn(), data, None, ATTACK, inversion=False)
        rows[name]["behaviour_f1"] = trained.behaviour_f1(
            data.test_features, data.test_behaviour, len(BEHAVIOURS)
        )
        z = trained.release_fn()(data.test_features, torch.Generator().manual_seed(0))
        assert trained.mapping.contract.check(z).shape == (len(data.test_features), 128)
        assert trained.history[-1]["task"] < trained.history[0]["task"]
    leaky, private = rows["leaky"], rows["private"]
    assert not meets_targets({**leaky, "behaviour_f1_raw": 0.0})["reid"], leaky
    assert meets_targets({**private, "behaviour_f1_raw": 0.0})["reid"], private
    assert private["reid_accuracy"] < leaky["reid_accuracy"]
    assert private["behaviour_f1"] > 2 / len(BEHAVIOURS)  # well above chance F1


def test_metrics() -> None:
    x = torch.rand(3, 6, 16, 16)
    assert torch.all(ssim(x, x) > 0.999) and torch.all(psnr(x, x) > 90)
    a, b = ((x + s * torch.randn_like(x)).clamp(0, 1) for s in (0.05, 0.2))
    assert torch.all(ssim(b, x) < ssim(a, x)) and torch.all(psnr(b, x) < psnr(a, x))
    assert torch.all(psnr(a, x) < 30) and torch.all(ssim(b, x) < 0.9)
    assert torch.all(ssim(torch.full_like(x, 0.5), x).abs() < 0.05)  # no structure at all
    pred, target = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 2])
    # class 0: tp1 fp1 -> 2/3; class 1: tp1 fn1 -> 2/3; class 2: 1
    assert macro_f1(pred, target, 3) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_tradeoff_experiment_runs_end_to_end(tmp_path, capsys) -> None:
    """The experiment script on a tiny configuration: the random-init Qwen3-VL tower, the reference row,
    one beta, the JSON with the issue's keys and the curve PNG."""
    import json

    module = load_script("benchmarks/experiments/privacy_tradeoff.py")
    out = tmp_path / "curve.png"
    argv = ["--train", "42", "--test", "21", "--identities", "7", "--frames", "2", "--size", "32"]
    argv += ["--steps", "20", "--decoder-epochs", "1", "--betas", "0.01", "--quiet", "--out", str(out)]
    assert module.main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    row = report["rows"][0]
    for key in (
        "behaviour_f1",
        "behaviour_f1_raw",
        "reid_accuracy",
        "reid_chance",
        "inversion_psnr",
        "inversion_reid_accuracy",
        "beta",
    ):
        assert key in row and key in report["no_privacy"]
    assert report["no_privacy"]["adv_weight"] == 0.0 and row["beta"] == 0.01
    assert report["raw"]["behaviour_f1_raw"] == row["behaviour_f1_raw"]
    assert out.stat().st_size > 10_000
    assert "targets met" in capsys.readouterr().out
