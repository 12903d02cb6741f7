"""The privacy stage's gate (tasks/privacy.py), the camera wire contract (tasks/release/camera.py, no
Ray here), the answers the cloud derives, and the camera release's edge/cloud split on the real tiny
Qwen3-VL tower (irreversibility on the real edge feature dimension, save/load round trip) and on a saved
vision-language family's tower (`privacy.family_dir`)."""

from __future__ import annotations

import pytest
import torch

from ruyi_model.camera import EdgeEncoder, build_tiny_tower, load_cloud, load_edge, save_camera_artifact
from ruyi_model.privacy import FeatureContract
from tasks.core.stage import USER_ERROR_EXIT_CODE, ContractViolation, StageError, stage_main
from tasks.data.camgen import BEHAVIOURS, answers_for, make_splits
from tasks.privacy import check_gate, gate_failures
from tasks.release.camera import WireError, cloud_features, encode_tensors
from tasks.training.privacy import MappingConfig, qa_accuracy, train_mapping

GOOD = {
    "behaviour_f1": 0.8,
    "behaviour_f1_raw": 0.85,
    "reid_accuracy": 0.06,
    "reid_chance": 0.042,
    "inversion_reid_accuracy": 0.05,
}


def test_gate_passes_when_every_target_is_met() -> None:
    assert gate_failures(GOOD, 0.9, 0.05) == []
    check_gate(GOOD, 0.9, 0.05)


@pytest.mark.parametrize(
    "change, check",
    [
        ({"behaviour_f1": 0.7}, "utility"),  # 0.7 < 0.9 x 0.85
        ({"reid_accuracy": 0.1}, "reid_accuracy"),  # > 0.042 + 0.05
        ({"inversion_reid_accuracy": 0.2}, "inversion_reid_accuracy"),
    ],
)
def test_gate_names_each_failed_check(change, check) -> None:
    metrics = {**GOOD, **change}
    failures = gate_failures(metrics, 0.9, 0.05)
    assert [f["check"] for f in failures] == [check]
    with pytest.raises(ContractViolation, match="privacy gate failed") as e:
        check_gate(metrics, 0.9, 0.05)
    assert e.value.failures == failures
    assert isinstance(e.value, StageError)  # the stage exits with the user-error (contract) code


def test_a_gate_failure_exits_with_the_contract_code(capsys) -> None:
    def run(params):
        check_gate({**GOOD, "reid_accuracy": 0.5}, params.privacy.min_f1_ratio, params.privacy.reid_margin)

    assert stage_main("privacy", "", run, ["--set", "threads=1"]) == USER_ERROR_EXIT_CODE
    assert "re-identification from released features" in capsys.readouterr().err


def test_cloud_accepts_only_released_features() -> None:
    contract = FeatureContract(16)
    z = torch.randn(3, 16)
    assert torch.equal(cloud_features(encode_tensors({"features": z}), contract), z)
    pixels = torch.randint(0, 255, (3, 3, 32, 32, 3), dtype=torch.uint8)
    bad = [
        ({"features": pixels}, "raw pixels"),
        ({"features": pixels.float()}, "raw pixels"),
        ({"frames": pixels}, "exactly one tensor"),
        ({"features": z, "extra": z.clone()}, "exactly one tensor"),
        ({"features": torch.randn(3, 8)}, "expected 16 features"),
        ({"features": z.double()}, "dtype"),
        ({"features": torch.full((3, 16), float("nan"))}, "NaN"),
    ]
    for tensors, match in bad:
        with pytest.raises(WireError, match=match) as e:
            cloud_features(encode_tensors(tensors), contract)
        assert e.value.status == 422
    for body in (b"", b"hello", pixels.numpy().tobytes()):
        with pytest.raises(WireError, match="not a safetensors") as e:
            cloud_features(body, contract)
        assert e.value.status == 400


def test_answers_from_the_true_behaviour_are_the_clips_answers() -> None:
    data = make_splits(28, 14, n_identities=4, n_frames=2, size=32, seed=3)
    clips = data.train.clips + data.test.clips
    truth = torch.tensor([BEHAVIOURS.index(c.behaviour) for c in clips])
    assert qa_accuracy(truth, [c.questions for c in clips]) == 1.0
    assert dict(answers_for("fight"))["How many people are in the scene?"] == "2"
    wrong = (truth + 1) % len(BEHAVIOURS)
    assert qa_accuracy(wrong, [c.questions for c in clips]) < 1.0


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    data = make_splits(48, 8, n_identities=4, n_frames=2, size=32, seed=0)
    encoder = EdgeEncoder(build_tiny_tower(0), 2, 32)
    feats = encoder(data.train.frames)
    cfg = MappingConfig(out_dim=8, hidden=32, steps=20, adv_weight=1.0)
    trained = train_mapping(
        feats, torch.as_tensor(data.train.behaviour), torch.as_tensor(data.train.identity), 7, 4, cfg
    )
    out = tmp_path_factory.mktemp("camera") / "release"
    out.mkdir()
    save_camera_artifact(out, encoder, trained.mapping, trained.head, 32, BEHAVIOURS, {"beta": cfg.beta})
    return data, encoder, trained, feats, out


def test_edge_features_include_every_deepstack_feature(release) -> None:
    data, encoder, _, feats, _ = release
    # 2 frames x (32/8/2)^2 = 4 merged tokens x 64 wide x (merger + 3 deepstack mergers)
    assert encoder.n_deepstack == 3
    assert feats.shape == (len(data.train), 2 * 4 * 64 * 4)
    with pytest.raises(ValueError, match=r"expected uint8 \[N >= 1, 2, 32, 32, 3\]"):
        encoder(torch.zeros(1, 2, 32, 32, 3))
    with pytest.raises(ValueError, match=r"got torch.uint8 \[0, 2, 32, 32, 3\]"):  # no clip: was a 500
        encoder(torch.zeros(0, 2, 32, 32, 3, dtype=torch.uint8))


def test_the_real_edge_features_have_no_left_inverse(release) -> None:
    """On the tower's real feature dimension (2048 -> 8): inputs differing along the waist's kernel
    (dimension >= 2040) give identical released distributions."""
    _, _, trained, feats, _ = release
    m = trained.mapping
    assert m.kernel_basis().shape[0] >= feats.shape[1] - m.out_dim
    x = feats[:5]
    other = m.collision(x, scale=float(x.norm(dim=1).mean()))
    assert (other - x).norm(dim=1).min() > 1.0
    (mu1, lv1), (mu2, lv2) = m.encode(x), m.encode(other)
    assert torch.allclose(mu1, mu2, atol=1e-4) and torch.allclose(lv1, lv2, atol=1e-4)


def test_release_round_trip_and_the_cloud_part_holds_nothing_of_the_edge(release) -> None:
    data, encoder, trained, feats, out = release
    encoder2, mapping2 = load_edge(out)
    head2, contract, behaviours = load_cloud(out)
    x = encoder2(data.test.frames)
    assert torch.allclose(x, encoder(data.test.frames), atol=1e-5)
    assert torch.allclose(mapping2.encode(x)[0], trained.mapping.encode(x)[0], atol=1e-5)
    z = mapping2.release(x, generator=torch.Generator().manual_seed(0))
    assert contract.check(z).shape == (len(x), 8) and behaviours == BEHAVIOURS
    assert torch.equal(head2(z), trained.head(z))
    assert sorted(p.name for p in (out / "cloud").iterdir()) == [
        "contract.json",
        "head.json",
        "head.safetensors",
    ]


def test_the_edge_runs_a_family_checkpoints_vision_tower_frozen(tmp_path) -> None:
    from ruyi_model.vl import FamilialVLForConditionalGeneration
    from tasks.core.params import PrivacyParams
    from tasks.privacy import edge_encoder
    from tests.tiny_vl import tiny_qwen3_vl

    src = tiny_qwen3_vl(seed=0)
    fam = FamilialVLForConditionalGeneration.from_qwen3_vl(src, [2, 4]).eval()
    fam.save_pretrained(tmp_path / "fam")
    encoder, desc = edge_encoder(PrivacyParams(family_dir=str(tmp_path / "fam"), frames=2), 0)
    assert "frozen" in desc and not any(p.requires_grad for p in encoder.tower.parameters())
    frames = make_splits(4, 2, n_identities=2, n_frames=2, size=32, seed=0).train.frames
    feats = encoder(frames)
    assert feats.shape == (4, 2 * 4 * fam.config.vision_config.out_hidden_size * 4)
    assert torch.allclose(feats, EdgeEncoder(fam.model.visual, 2, 32)(frames), atol=1e-5)  # the saved tower
    with pytest.raises(StageError, match="privacy.family_dir"):
        edge_encoder(PrivacyParams(family_dir=str(tmp_path / "missing")), 0)
