"""The vision-language profile end to end: Prefect -> DVC (profiles/vl/dvc.yaml) -> every VL stage (slow).

A copy of this repository (git + DVC) runs `ruyi_pipeline(profile="vl")` on a micro version of
params.vl.yaml: generated VQA data through the GX image contract, alignment, joint multi-exit SFT,
GRPO, the per-exit / per-task-type evaluation, the gates and the export of stock Qwen3-VL members
(reloaded with plain transformers). The text profile's outputs and lock file must stay untouched.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_pipeline_e2e import DVC, copy_repository, git, run

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
    "evaluate.num_problems": 12,
    "evaluate.speed_new_tokens": 4,
    "evaluate.speed_repeats": 1,
    "gates.max_loss": 50.0,
    "gates.depth_tolerance": 1.0,
    "gates.min_loss_margin": 0.0,
    "gates.min_accuracy": 0.0,
    "gates.max_rl_accuracy_drop": 1.0,
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("vl") / "ws"
    ws.mkdir()
    copy_repository(ws)
    git(ws, "init", "-q")
    git(ws, "add", "-A")
    git(ws, "commit", "-qm", "snapshot")
    return ws


def test_vl_profile_runs_through_the_flow_and_leaves_the_text_run_alone(workspace, capsys):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import ruyi_pipeline
    from flows.report import print_vl_summary

    text_lock = (workspace / "dvc.lock").read_bytes()
    text_params = (workspace / "params.yaml").read_bytes()
    text_metrics = {p: p.read_bytes() for p in (workspace / "metrics").glob("*.json")}
    t0 = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=90):
        results = ruyi_pipeline(workspace=str(workspace), profile="vl", overrides=MICRO_VL, push=False)
    print(f"VL micro profile through the flow: {time.perf_counter() - t0:.1f} s")
    stages = [r["stage"] for r in results]
    assert stages == [
        "prepare_data", "validate_data", "tokenizer", "cpt", "family_sft",
        "rl", "evaluate", "gates", "export",
    ]  # fmt: skip
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
    rl = json.loads((metrics / "reproducible" / "rl.json").read_text())
    assert rl["members"] == [1, 2, 4] and rl["algorithm"] == "grpo"
    assert json.loads((metrics / "gates.json").read_text())["passed"] is True

    export = workspace / "artifacts" / "vl" / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["modality"] == "vision-language" and manifest["exit_layers"] == [1, 2, 4]
    exported = json.loads((metrics / "export.json").read_text())["members"]
    assert all(m["max_logit_diff"] <= 1e-4 for m in exported.values())
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(export / "exit_2").model_type == "qwen3_vl"

    # The text profile: its lock, params and outputs are untouched; the VL lock is its own.
    assert (workspace / "dvc.lock").read_bytes() == text_lock
    assert (workspace / "params.yaml").read_bytes() == text_params
    assert not (workspace / "data" / "raw").exists()
    assert {p: p.read_bytes() for p in (workspace / "metrics").glob("*.json")} == text_metrics
    vl_lock = yaml.safe_load((workspace / "profiles" / "vl" / "dvc.lock").read_text())
    assert set(vl_lock["stages"]) == set(stages)
    status = run([DVC, "status", "profiles/vl/dvc.yaml"], workspace).stdout
    assert "up to date" in status, status

    capsys.readouterr()
    print_vl_summary(workspace / "params.vl.yaml")
    out = capsys.readouterr().out
    assert "| exit | params | tokens/s | all |" in out and "scene_count" in out
