"""The privacy stage end to end with params.yaml (`python -m tasks.privacy`, small params): the tiny
Qwen3-VL tower built and trained by the stage (`privacy.family_dir: null`), the audit, the gate, the
camera release it publishes.

Small params (about 10 s of stage time): 120 training / 48 held-out clips of 24 identities, the tiny
tower trained 60 steps, no beta sweep, a small attack budget. At this size the private head's F1 is
about 0.84 x the raw one, so the run sets `min_f1_ratio=0.7` (the tiny defaults' figures are in
benchmarks/RESULTS.md). The same stage body on a vision-language family's tower, the failing gate
stopping the flow, and the camera release published and served by the deploy (edge -> cloud, the
cloud's wire contract) are tests/e2e/test_vl_profile.py's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "threads=1",
    "privacy.train_clips=120",
    "privacy.test_clips=48",
    "privacy.tower_steps=60",
    "privacy.steps=150",
    "privacy.betas=[]",
    "privacy.decoder_epochs=1",
    "privacy.identifier_epochs=2",
    "privacy.audit_reference=false",
    "privacy.attack_draws=1",
    "privacy.attack_max_epochs=60",
]
#: Held-out clips of the served-edge attack (the figure's standard error at chance is 0.013).
HELD_OUT_ATTACK_CLIPS = 240
#: One-sided 99% normal quantile of the served attack's test (`accuracy_lower_bound`).
Z_99 = 2.326


def accuracy_lower_bound(accuracy: float, n: int, z: float = Z_99) -> float:
    """Wilson score lower bound of a proportion `accuracy` measured on `n` trials.

    The served attack's accuracy is a random draw (fresh releases, a fresh attacker): over three runs of one
    published mapping it measured 0.054, 0.071 and 0.100 on 240 clips against a target of 0.092. The
    test fails when the attack is *significantly* above the target (this bound over it), so one unlucky
    draw does not fail it and a mapping that leaks does (the raw features score 0.3+).
    """
    centre = accuracy + z * z / (2 * n)
    spread = z * (accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) ** 0.5
    return (centre - spread) / (1 + z * z / n)


KEYS = (
    "behaviour_f1",
    "behaviour_f1_raw",
    "reid_accuracy",
    "reid_chance",
    "inversion_psnr",
    "inversion_reid_accuracy",
    "beta",
    "qa_accuracy",
    "qa_accuracy_raw",
    "inversion_ssim",
)


def run_stage(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    sets = [a for o in [*SMALL, *overrides] for a in ("--set", o)]
    return subprocess.run(
        [sys.executable, "-m", "tasks.privacy", "--params", str(REPO / "params.yaml"), *sets],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """A workspace where the stage ran with SMALL params and published its camera release."""
    workspace = tmp_path_factory.mktemp("privacy")
    proc = run_stage(workspace, "privacy.min_f1_ratio=0.7")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workspace


def test_the_stage_trains_its_tower_audits_gates_and_publishes(published: Path) -> None:
    workspace = published
    m = json.loads((workspace / "metrics/privacy.json").read_text())
    assert all(isinstance(m[k], float) for k in KEYS), {k: m.get(k) for k in KEYS}
    assert m["passed"] is True and m["failures"] == []
    assert m["reid_chance"] == pytest.approx(1 / 24, abs=0.02)
    # the trained tower's raw features do carry identity; the released ones do not
    assert m["reid_accuracy_raw_features"] > m["reid_chance"] + 0.05, m
    assert m["reid_accuracy"] <= m["reid_chance"] + 0.05
    assert m["behaviour_f1_raw"] > 0.4 and m["behaviour_f1"] >= 0.7 * m["behaviour_f1_raw"]
    assert m["tower"].startswith("tiny Qwen3-VL tower trained") and m["tower_loss"] < 1.0
    assert m["deepstack_features"] == 3 and m["edge_feature_dim"] == 3 * 4 * 64 * 4
    assert json.loads((workspace / "metrics/reproducible/privacy.json").read_text())["beta"] == m["beta"]
    art = workspace / "artifacts/privacy"
    assert json.loads((art / "cloud/contract.json").read_text())["dim"] == 16
    assert (art / "edge/tower.safetensors").is_file() and (art / "manifest.json").is_file()


def test_what_the_served_edge_sends_the_cloud_re_identifies_no_one(published: Path) -> None:
    """The attacker of the audit, trained and tested on the bytes that actually cross from the served
    edge to the cloud (every training clip sent `draws` times: a fresh release each), stays within the
    target (not significantly above it: `accuracy_lower_bound`); every body is one float tensor
    `features` [N, k] and never pixels."""
    import torch
    import yaml
    from safetensors.torch import load

    from tasks.core.params import load_params
    from tasks.data.camgen import make_splits
    from tasks.release.camera import encode_tensors, post_bytes, start_camera
    from tasks.training.privacy import AttackConfig, reid_attack
    from tests.e2e.test_pipeline_e2e import free_port

    params = load_params(
        REPO / "params.yaml", {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in SMALL)}
    )
    pp = params.privacy
    # 240 held-out clips for this attack, not the stage's 48: at 48 one re-identification in either
    # direction moves the accuracy by 0.021, and an attacker at exactly chance (1/24) scores 5 of 48
    # (0.104 > chance + 0.05) one run in twenty; at 240 the margin is about 4 standard errors.
    data = make_splits(
        pp.train_clips,
        HELD_OUT_ATTACK_CLIPS,
        n_identities=pp.identities,
        n_frames=pp.frames,
        size=pp.size,
        seed=params.seed,
    )
    bodies: list[bytes] = []
    with start_camera(published / "artifacts/privacy", port=free_port(), ray_num_cpus=1) as session:

        def served(frames: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            status, body = post_bytes(f"{session.url}/edge", encode_tensors({"frames": frames}))
            assert status == 200, body[:300]
            bodies.append(body)
            return load(body)["features"]

        cfg = AttackConfig(max_epochs=pp.attack_max_epochs, patience=pp.attack_patience, draws=2, seed=0)
        train, test = torch.as_tensor(data.train.frames), torch.as_tensor(data.test.frames)
        results = {
            kind: reid_attack(
                served,
                train,
                torch.as_tensor(data.train.identity),
                test,
                torch.as_tensor(data.test.identity),
                pp.identities,
                kind,
                cfg,
            )
            for kind in ("mlp", "linear")
        }
    for body in bodies:
        tensors = load(body)
        assert list(tensors) == ["features"]
        z = tensors["features"]
        assert z.dtype == torch.float32 and z.dim() == 2 and z.shape[1] == pp.out_dim
    n = HELD_OUT_ATTACK_CLIPS
    for kind, r in results.items():
        assert accuracy_lower_bound(r["accuracy"], n) <= r["chance"] + pp.reid_margin, (kind, r)
    # the criterion fails a release that leaks: an attack at 0.14 (1.5x the target) on these clips
    assert accuracy_lower_bound(0.14, n) > results["mlp"]["chance"] + pp.reid_margin
