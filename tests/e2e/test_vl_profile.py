"""The vision-language profile end to end: Prefect -> DVC (profiles/vl/dvc.yaml) -> every VL stage (slow).

A copy of this repository (git + DVC) runs `ruyi_pipeline(profile="vl")` on a micro version of
params.vl.yaml: generated VQA data through the GX image contract, alignment, joint multi-exit SFT,
GRPO, the per-exit / per-task-type evaluation, the gates, the privacy stage (the edge-cloud camera's
mapping on this family's vision tower, audited by attacks, gated), the export of stock Qwen3-VL members
(reloaded with plain transformers) and the deploy (the export and the camera release published to a
local store, served by Ray Serve over HTTP, every tier sent images). The text profile's outputs and lock
file must stay untouched.

The first run's privacy target is strict (`reid_margin` 0) and its mapping has no privacy (beta 0, no
adversary, a 256-wide waist): the privacy gate fails, the flow stops there, nothing is exported or
deployed. The second run (`from_stage="privacy"`), with the profile's mapping and targets, passes the
gate (at this size the released features' re-identification is about 6/96 against the 0.092 limit,
behaviour F1 about 0.93 x the raw features'), exports and deploys; its camera smoke test sends clips
edge -> cloud over HTTP and checks that the cloud refuses pixels and features of another shape or
dtype.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_pipeline_e2e import DVC, copy_repository, free_port, git, run

pytestmark = pytest.mark.slow

MICRO_VL = {
    "vl.num_train": 120,
    "vl.num_select": 24,
    "vl.num_eval": 16,
    "tokenizer.vocab_size": 300,
    "cpt.max_steps": 2,
    "cpt.warmup_steps": 1,
    "cpt.batch_size": 8,
    "cpt.eval_every": 2,
    "cpt.checkpoint_every": 2,
    "cpt.eval_batches": 1,
    "family_sft.max_steps": 4,
    "family_sft.warmup_steps": 1,
    "family_sft.batch_size": 8,
    "family_sft.eval_every": 2,
    "family_sft.checkpoint_every": 2,
    "family_sft.eval_batches": 1,
    "rl.steps": 2,
    "rl.prompts_per_step": 2,
    "rl.group_size": 2,
    "rl.eval_prompts": 6,
    "rl.eval_every": 1,
    "evaluate.num_problems": 12,
    "evaluate.speed_new_tokens": 4,
    "evaluate.speed_repeats": 1,
    "gates.max_loss": 50.0,
    "gates.depth_tolerance": 1.0,
    "gates.min_loss_margin": 0.0,
    "gates.min_accuracy": 0.0,
    "gates.max_rl_accuracy_drop": 1.0,
    "privacy.train_clips": 240,
    "privacy.test_clips": 96,
    "privacy.steps": 300,
    "privacy.betas": [],
    "privacy.audit_reference": False,
    "privacy.attack_draws": 2,
    "privacy.attack_max_epochs": 150,
    # the cloud member (the micro family's deepest member) learns little in 40 steps: its QA gate is
    # loosened here; the profile's figures are the recorded run's
    "privacy.cloud_steps": 40,
    "privacy.min_qa_ratio": 0.5,
    # the micro family's tower (4 SFT steps) gives raw-feature behaviour F1 near 0.5 and the mapping's
    # ratio to it varied 0.76-0.9 between runs: the flow mechanics are tested, not the profile's target
    "privacy.min_f1_ratio": 0.5,
    # the micro tower trains at the full lr: the failing-gate run needs a tower that leaks identity
    # after 4 steps, which the profile's 0.1 x does not (re-identification at chance); the profile's
    # own multiplier is measured in its recorded run
    "vl.vision_lr_scale": 1.0,
}
#: The profile's mapping and targets (params.vl.yaml), with a cheaper inversion decoder.
PRIVATE = {
    "privacy.beta": 0.01,
    "privacy.adv_weight": 1.0,
    "privacy.out_dim": 16,
    "privacy.hidden": 128,
    "privacy.reid_margin": 0.05,
    "privacy.decoder_epochs": 5,
    "privacy.identifier_epochs": 15,
    # overrides are written into the workspace's params.vl.yaml, so the LEAKY run's False would stay
    "privacy.cloud_member": True,
}
#: No privacy (beta 0, no adversary, a wide waist) against a strict target: the gate must fail.
LEAKY = {
    "privacy.beta": 0.0,
    "privacy.adv_weight": 0.0,
    "privacy.out_dim": 256,
    "privacy.hidden": 256,
    "privacy.reid_margin": 0.0,
    "privacy.decoder_epochs": 1,
    "privacy.identifier_epochs": 2,
    "privacy.attack_draws": 1,
    "privacy.attack_max_epochs": 100,
    "privacy.cloud_member": False,  # the gate fails on re-identification; no member needed to show it
}
STAGES = [
    "prepare_data", "validate_data", "tokenizer", "cpt", "family_sft",
    "rl", "evaluate", "gates", "privacy", "export", "deploy",
]  # fmt: skip


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("vl") / "ws"
    ws.mkdir()
    copy_repository(ws)
    # the recorded VL run's metrics are committed; this workspace starts the VL profile from nothing, so
    # what a failed run leaves (no deploy.json, no privacy artifact) is what the flow wrote
    shutil.rmtree(ws / "metrics" / "vl")
    git(ws, "init", "-q")
    git(ws, "add", "-A")
    git(ws, "commit", "-qm", "snapshot")
    return ws


@pytest.fixture(scope="module")
def flow(workspace: Path) -> dict:
    """Both flow runs (the failing privacy gate, then the passing one) and what the first one left."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import StageFailed, ruyi_pipeline

    before = {
        "text_lock": (workspace / "dvc.lock").read_bytes(),
        "text_params": (workspace / "params.yaml").read_bytes(),
        "text_metrics": {p: p.read_bytes() for p in (workspace / "metrics").glob("*.json")},
    }
    store = workspace.parent / "store"
    deploy = {"deploy.port": free_port(), "deploy.store.root": str(store)}
    vl, metrics = workspace / "artifacts" / "vl", workspace / "metrics" / "vl"
    t0 = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=90):
        with pytest.raises(StageFailed) as info:
            ruyi_pipeline(
                workspace=str(workspace), profile="vl", overrides={**MICRO_VL, **LEAKY, **deploy}, push=False
            )
        failed = {
            "error": str(info.value),
            "privacy": json.loads((metrics / "privacy.json").read_text()),
            "outputs": sorted(p.name for p in vl.iterdir()),
            "deployed": (metrics / "deploy.json").exists(),
            "store": store.exists(),
        }
        t1 = time.perf_counter()
        results = ruyi_pipeline(
            workspace=str(workspace),
            profile="vl",
            from_stage="privacy",
            overrides={**MICRO_VL, **PRIVATE, **deploy},
            push=False,
        )
    print(f"VL micro flow: {t1 - t0:.1f} s to the failed privacy gate, {time.perf_counter() - t1:.1f} s more")
    return {**before, "failed": failed, "results": results}


def test_a_failing_privacy_gate_stops_the_flow_before_export_and_deploy(flow) -> None:
    failed = flow["failed"]
    assert "privacy" in failed["error"], failed["error"]
    m = failed["privacy"]
    assert m["passed"] is False and "reid_accuracy" in [f["check"] for f in m["failures"]]
    assert m["reid_accuracy"] > m["reid_chance"] and m["tower"] == "vision tower of artifacts/vl/rl (frozen)"
    assert (
        "rl" in failed["outputs"] and "privacy" not in failed["outputs"] and "export" not in failed["outputs"]
    )
    assert not failed["deployed"] and not failed["store"]


def test_vl_profile_runs_through_the_flow_and_leaves_the_text_run_alone(workspace, flow, capsys, tmp_path):
    from flows.report import print_vl_summary

    results = flow["results"]
    assert [r["stage"] for r in results] == ["privacy", "export", "deploy"]
    assert not any(r["skipped"] for r in results)
    metrics = workspace / "metrics" / "vl"
    validated = json.loads((metrics / "validate_data.json").read_text())["files"]
    assert validated["eval"]["kept"] == 16 and validated["train"]["kept"] == 120
    ev = json.loads((metrics / "eval.json").read_text())
    for d in (1, 2, 4):
        entry = ev[f"exit_{d}"]
        assert entry["n"] == 12 and 0.0 <= entry["accuracy"] <= 1.0
        assert set(entry["by_task"]) <= {"scene_count", "scene_colour", "scene_position", "scene_relation"}
        assert sum(t["n"] for t in entry["by_task"].values()) == 12
        assert entry["tokens_per_s"] > 0 and entry["num_parameters"] > 0
    assert ev["exit_1"]["num_parameters"] < ev["exit_2"]["num_parameters"] < ev["exit_4"]["num_parameters"]
    # evaluate's answers, one row per (member, problem): what the deploy stage's served members must answer
    gens = [
        json.loads(x) for x in (workspace / "reports/vl/evaluate/generations.jsonl").read_text().splitlines()
    ]
    assert len(gens) == 3 * 12 and {g["exit"] for g in gens} == {1, 2, 4}
    for d in (1, 2, 4):
        assert sum(g["correct"] for g in gens if g["exit"] == d) == round(ev[f"exit_{d}"]["accuracy"] * 12)
        assert [g["completion"] for g in gens if g["exit"] == d][:3] == [
            s["got"] for s in ev[f"exit_{d}"]["samples"]
        ]
    rl = json.loads((metrics / "reproducible" / "rl.json").read_text())
    assert rl["members"] == [1, 2, 4] and rl["algorithm"] == "grpo"
    for d in (1, 2, 4):  # the held-out curve: before rl, after step 1 (rl.eval_every 1), after rl
        entry = rl[f"exit_{d}"]
        assert entry["held_out_curve"]["step"] == [0, 1, 2]
        acc = entry["held_out_curve"]["accuracy"]
        assert (acc[0], acc[-1]) == (entry["accuracy_start"], entry["accuracy_end"])
    sft, p = (
        json.loads((metrics / "family_sft.json").read_text()),
        yaml.safe_load((workspace / "params.vl.yaml").read_text()),
    )
    assert sft["vision_lr"] == pytest.approx(p["family_sft"]["lr"] * p["vl"]["vision_lr_scale"])
    rl_all = json.loads((metrics / "rl.json").read_text())  # rl trains the tower at the same multiplier
    assert rl_all["vision_lr"] == pytest.approx(p["rl"]["lr"] * p["vl"]["vision_lr_scale"])
    gates = json.loads((metrics / "gates.json").read_text())
    assert gates["passed"] is True
    # rl's per-prompt verdicts (before rl, after it) gave each trained member's accuracy change its interval
    from data_contracts.items import read_rl_items

    verdicts = read_rl_items(workspace / "reports" / "vl" / "rl" / "items.jsonl")
    assert verdicts.exits == (1, 2, 4) and gates["intervals"]["rl_prompts"] == len(verdicts.items)
    for k, d in enumerate((1, 2, 4)):
        row = gates["exits"][f"exit_{d}"]
        assert row["rl_accuracy_change"] == pytest.approx(verdicts.changes()[k], abs=1e-6)
        assert row["rl_accuracy_change_low"] <= row["rl_accuracy_change"] <= row["rl_accuracy_change_high"]
    from flows.pipeline import missing_local_effects

    for stage in ("gates", "deploy"):  # the reports dvc.yaml names as their effects on this machine
        assert missing_local_effects(workspace, stage, "profiles/vl/dvc.yaml") == [], stage

    export = workspace / "artifacts" / "vl" / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["modality"] == "vision-language" and manifest["exit_layers"] == [1, 2, 4]
    exported = json.loads((metrics / "export.json").read_text())["members"]
    assert all(m["max_logit_diff"] <= 1e-4 for m in exported.values())
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(export / "exit_2").model_type == "qwen3_vl"

    # privacy: the gate passed on this family's tower; the camera release is what deploy published
    p = json.loads((metrics / "privacy.json").read_text())
    assert (
        p["passed"] is True
        and p["failures"] == []
        and p["tower"].startswith("vision tower of artifacts/vl/rl")
    )
    assert (
        p["reid_accuracy"] <= p["reid_chance"] + 0.05
        and p["inversion_reid_accuracy"] <= p["reid_chance"] + 0.05
    )
    # the gate's own behaviour rule at the micro ratio (0.9 here failed on a machine whose kernels gave
    # the micro tower other bits: 0.43 of 0.52, inside the 0.76-0.9 range noted at MICRO_VL)
    assert (
        p["behaviour_f1"] >= MICRO_VL["privacy.min_f1_ratio"] * p["behaviour_f1_raw"]
        and p["reid_accuracy_raw_features"] > p["reid_accuracy"]
    )
    assert json.loads((workspace / "artifacts/vl/privacy/cloud/contract.json").read_text())["dim"] == 16
    # the cloud is the family's deepest member answering in text from the released features
    member = json.loads((workspace / "artifacts/vl/privacy/cloud/member.json").read_text())
    assert member["exit_layer"] == 4 and member["in_dim"] == 16
    assert p["cloud_member"]["exit_layer"] == 4 and 0.0 <= p["qa_accuracy_member"] <= 1.0
    assert p["qa_accuracy_member"] >= 0.5 * p["qa_accuracy_member_raw"]
    assert not (workspace / "artifacts/vl/privacy/cloud/member/vision_config.json").exists()

    # deploy: both releases in the store, every tier served over HTTP answered images as its stock member
    d = json.loads((metrics / "deploy.json").read_text())
    store = workspace.parent / "store"
    assert d["release_uri"] == (store / "ruyi-vl-tiny" / "v0001").as_uri() and not d["reused_release"]
    assert d["camera_release_uri"] == (store / "ruyi-vl-tiny-camera" / "v0001").as_uri()
    assert (store / "ruyi-vl-tiny-camera" / "v0001" / "edge" / "tower.safetensors").is_file()
    assert set(d["tiers"]) == {"exit_1", "exit_2", "exit_4"}
    for d_, tier in ((1, "exit_1"), (2, "exit_2"), (4, "exit_4")):
        entry = d["tiers"][tier]
        assert entry["requests"] == 4 and entry["answers_match_export"] is True and len(entry["answers"]) == 4
        # served over HTTP = evaluate's answers (float32: a difference would have failed the stage)
        assert (entry["exit_layer"], entry["same_as_evaluate"], entry["compared"]) == (d_, 1.0, 4)
        assert entry["answers"] == [g["completion"] for g in gens if g["exit"] == d_][:4]
        assert entry["params"] == ev[f"exit_{d_}"]["num_parameters"] and 0.0 <= entry["accuracy"] <= 1.0
    assert d["camera"]["clips"] == 4 and d["camera"]["released_dim"] == 16
    # the served cloud's answers are its member's greedy answers on the edge's bytes (checked by deploy)
    assert d["camera"]["answered_by"] == "member" and 0.0 <= d["camera"]["qa_accuracy"] <= 1.0
    # the served cloud refused the clips' pixels (any form) and features of another shape or dtype
    refused = d["camera"]["cloud_refused"]
    assert refused == {
        **dict.fromkeys(("pixels", "float_pixels", "frames", "wrong_width", "float64"), 422),
        "raw_bytes": 400,
    }
    assert (
        json.loads((metrics / "deploy_smoke.json").read_text())["tiers"]["exit_4"]["answers"]
        == d["tiers"]["exit_4"]["answers"]
    )

    # The text profile: its lock, params and outputs are untouched; the VL lock is its own.
    assert (workspace / "dvc.lock").read_bytes() == flow["text_lock"]
    assert (workspace / "params.yaml").read_bytes() == flow["text_params"]
    assert not (workspace / "data" / "raw").exists()
    assert {p: p.read_bytes() for p in (workspace / "metrics").glob("*.json")} == flow["text_metrics"]
    vl_lock = yaml.safe_load((workspace / "profiles" / "vl" / "dvc.lock").read_text())
    assert set(vl_lock["stages"]) == set(STAGES)  # the first run's stages before privacy are recorded
    status = run([DVC, "status", "profiles/vl/dvc.yaml"], workspace).stdout
    assert "up to date" in status, status
    # the profile's figures: written by the stages, and rendered by `dvc plots show` without an error
    from flows.report import VL_PLOTS

    cmd = [DVC, "plots", "show", "--json", "-o", str(tmp_path / "dvc_plots"), "profiles/vl/dvc.yaml"]
    shown = json.loads(run(cmd, workspace).stdout)
    assert "errors" not in shown, shown["errors"]
    images = {k for k, v in shown["data"].items() if any(r["type"] == "image" for r in v)}
    assert images == {f"plots/vl/{p}" for p in VL_PLOTS}  # (the target itself is listed too, as no image)
    loss = (workspace / "plots/vl/family_sft/loss.csv").read_text().splitlines()
    assert loss[0] == "step,exit,split,loss" and {line.split(",")[2] for line in loss[1:]} == {"train", "val"}

    capsys.readouterr()
    print_vl_summary(workspace / "params.vl.yaml")
    out = capsys.readouterr().out
    assert "| exit | params | tokens/s | all |" in out and "scene_count" in out
    assert "privacy gate passed" in out and "camera release: file://" in out
    assert "family_sft/loss.png" in out and "evaluate/tradeoff.png" in out
    assert "not from this run" not in out  # no run named: a plain summary
    # as `ruyi run --profile vl --to-stage gates` prints it: the later stages' figures are named, with
    # DVC's word on them (a real `dvc status`; here they are this family's)
    print_vl_summary(workspace / "params.vl.yaml", ran=STAGES[: STAGES.index("gates") + 1])
    lines = capsys.readouterr().out.splitlines()
    privacy_line = next(line for line in lines if line.startswith("privacy gate"))
    assert "privacy.json [not from this run: up to date]): " in privacy_line
    cloud_line = next(line for line in lines if line.startswith("cloud member"))
    assert cloud_line.endswith(" [not from this run: up to date]")  # privacy.json's figures too
    assert lines[-1].startswith("release: ") and lines[-1].endswith(" [not from this run: up to date]")
    assert not lines[0].endswith("[not from this run: up to date]:")  # evaluate ran in it
