"""The whole pipeline end to end on a micro profile: Prefect -> DVC -> every stage (slow).

One workspace (a copy of this repository, made a git + DVC repo) is shared by the tests of this
module, in order: the full run; `dvc status` up to date and a fast second run; a parameter change
that reruns only what depends on it; a rerun from `compress` created through a real Prefect
server's REST API; the audit (clean clone + dvc pull + forced repro reproduces weights and quality
metrics exactly); a failed quality gate that stops the flow before export and deploy; malformed raw
rows that stop the flow at validate_data; last, the flow from cpt to export with
`training.backend=megatron` (2 ranks, pp=2): the exported members load in stock transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 50000:  # keep port + 10000 free-able and clear of Ray's 10002-19999 worker range
            if not 10002 <= port <= 19999:
                return port


MICRO = {
    "model.hidden_size": 32,
    "model.intermediate_size": 64,
    "model.num_hidden_layers": 4,
    "model.num_attention_heads": 2,
    "model.num_key_value_heads": 1,
    "model.head_dim": 16,
    "model.exit_layers": [2, 4],
    "data.max_corpus_docs": 150,
    "data.num_sft": 60,
    "data.num_rl": 24,
    "data.num_eval": 12,
    "data.num_select": 20,  # compress decides on compress.solution_rows = 16 of them
    "data.select_corpus_chars": 20000,  # ... and 16 blocks of 256 tokens
    "tokenizer.vocab_size": 400,
    "cpt.max_steps": 6,
    "cpt.seq_len": 64,
    "cpt.batch_size": 4,
    "cpt.checkpoint_every": 3,
    "cpt.eval_every": 3,
    "cpt.eval_batches": 1,
    "cpt.warmup_steps": 1,
    "family_sft.max_steps": 4,
    "family_sft.stage1_steps": 1,
    "family_sft.stage1_examples": 40,
    "family_sft.seq_len": 96,
    "family_sft.batch_size": 4,
    "family_sft.checkpoint_every": 2,
    "family_sft.eval_every": 2,
    "family_sft.eval_batches": 1,
    "family_sft.warmup_steps": 1,
    "expand.max_steps": 4,
    "expand.num_blocks": 1,
    "expand.seq_len": 64,
    "expand.batch_size": 4,
    "expand.checkpoint_every": 2,
    "expand.eval_every": 2,
    "expand.eval_batches": 1,
    "expand.warmup_steps": 1,
    "sft.max_steps": 4,
    "sft.seq_len": 96,
    "sft.batch_size": 4,
    "sft.checkpoint_every": 2,
    "sft.eval_every": 2,
    "sft.eval_batches": 1,
    "sft.warmup_steps": 1,
    "rl.steps": 2,
    "rl.prompts_per_step": 2,
    "rl.group_size": 4,
    "rl.max_new_tokens": 12,
    "rl.eval_prompts": 6,
    "rl.select_prompts": 10,  # of data.num_select's 20 (params.yaml's 200 is refused when the params load)
    "compress.calibration_batches": 2,
    "compress.solution_rows": 16,  # of data.num_select's 20 (as rl.select_prompts)
    "compress.heal_steps": 2,
    "evaluate.num_problems": 6,
    "evaluate.max_new_tokens": 12,
    "evaluate.loss_batches": 2,
    "evaluate.speed_new_tokens": 4,
    "route.num_select": 10,
    "route.num_problems": 6,
    "route.max_new_tokens": 12,
    "gates.max_loss": 50.0,
    "gates.depth_tolerance": 1.0,
    "gates.min_loss_margin": 0.0,
    "gates.min_accuracy": 0.0,
    "gates.max_rl_accuracy_drop": 1.0,
    "compress.max_relative_loss_increase": 1.0,
    "deploy.smoke_prompts": 2,
}
MICRO["deploy.smoke_max_tokens"] = MICRO["evaluate.max_new_tokens"]  # served answers compared whole


def run(
    cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def git(ws: Path, *args: str) -> str:
    return run(["git", "-c", "user.email=ci@ruyi", "-c", "user.name=ci", *args], ws).stdout


def copy_repository(dest: Path) -> None:
    """The repository as a clean clone would have it (tracked + untracked-not-ignored files)."""
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], REPO).stdout.split(
        "\0"
    )
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("e2e") / "ws"
    ws.mkdir()
    copy_repository(ws)
    git(ws, "init", "-q")
    git(ws, "add", "-A")
    git(ws, "commit", "-qm", "snapshot")
    remote = ws.parent / "dvc-remote"
    run([DVC, "remote", "add", "-f", "-d", "local", str(remote)], ws)
    overrides = dict(MICRO, **{"deploy.port": free_port(), "deploy.store.root": str(ws.parent / "store")})
    from flows.pipeline import apply_param_overrides

    apply_param_overrides(ws, overrides)
    git(ws, "commit", "-qam", "micro profile")
    return ws


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def first_run(workspace, prefect_api):
    from flows.pipeline import ruyi_pipeline

    t0 = time.perf_counter()
    results = ruyi_pipeline(workspace=str(workspace), push=True)
    return results, time.perf_counter() - t0


def store_versions(ws: Path) -> list[str]:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    root = Path(params["deploy"]["store"]["root"]) / params["deploy"]["model_name"]
    return (
        sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if root.exists()
        else []
    )


def test_full_pipeline_runs_every_stage(workspace, first_run):
    results, seconds = first_run
    stages = [r["stage"] for r in results]
    assert stages == [
        "prepare_data",
        "validate_data",
        "tokenizer",
        "cpt",
        "family_sft",
        "expand",
        "sft",
        "rl",
        "compress",
        "evaluate",
        "route",
        "gates",
        "export",
        "deploy",
    ]
    assert not any(r["skipped"] for r in results)
    # what gates and deploy leave outside DVC's outputs is where dvc.yaml says (flows.pipeline)
    from flows.pipeline import missing_local_effects

    assert all(missing_local_effects(workspace, s) == [] for s in stages)
    ev = json.loads((workspace / "metrics/eval.json").read_text())
    for d in (2, 4):
        assert {"loss", "accuracy", "tokens_per_s", "params"} <= set(ev[f"exit_{d}"])
    comp = json.loads((workspace / "metrics/compress.json").read_text())
    assert comp["added_params_after"] < comp["added_params_before"]
    rl = json.loads((workspace / "metrics/rl.json").read_text())
    assert rl["algorithm"] in ("grpo", "bppo")
    assert {"steps_with_gradient", "steps_with_gradient_fraction", "accuracy_start", "accuracy_end"} <= set(
        rl
    )
    # checkpoint selection: candidates at steps 0 and 2 (eval_every 10 > steps), the kept one is the best
    sel = rl["selection"]
    assert sel["prompts"] == 10 and sel["curve"]["step"] == [0, 2]
    assert sel["kept_accuracy"] == max(sel["curve"]["accuracy"]) and rl["kept_step"] == sel["kept_step"]
    assert_other_members_are_the_family_sft_ones(workspace, comp["dae_exit"])
    # rl's per-prompt verdicts at step 0 and at the kept step: the gates' interval of its accuracy change
    from data_contracts.items import read_rl_items

    verdicts = read_rl_items(workspace / "reports/rl/items.jsonl")
    gates = json.loads((workspace / "metrics/gates.json").read_text())
    assert list(verdicts.exits) == rl["members"] and gates["intervals"]["rl_prompts"] == len(verdicts.items)
    for k, d in enumerate(verdicts.exits):
        assert verdicts.changes()[k] == pytest.approx(
            rl[f"exit_{d}"]["accuracy_end"] - rl[f"exit_{d}"]["accuracy_start"]
        )
        low, high = (gates["exits"][f"exit_{d}"][f"rl_accuracy_change_{s}"] for s in ("low", "high"))
        assert low <= verdicts.changes()[k] <= high

    assert len(store_versions(workspace)) == 1
    smoke = json.loads((workspace / "metrics/deploy_smoke.json").read_text())
    for d in (2, 4):
        assert (workspace / f"artifacts/export/exit_{d}/model.safetensors").is_file()
        # the released member answered the smoke questions as evaluate's batched decoding did
        tier = smoke["tiers"][f"exit_{d}"]
        assert (tier["same_as_evaluate"], tier["compared"]) == (1.0, 2)
    print(f"micro pipeline: {seconds:.0f} s")


def assert_other_members_are_the_family_sft_ones(ws: Path, dae_exit: int) -> None:
    """After compress, every tensor outside the DaE member's own trainable set (its added blocks, norm and
    head) is bit-identical to family_sft's output, and so are the other members' logits."""
    import torch
    from safetensors.torch import load_file

    from tasks.core.artifacts import load_family

    tuned = load_file(ws / "artifacts/family_sft/model.safetensors")
    final = load_file(ws / "artifacts/compress/model.safetensors")
    owned = (f"exits.{dae_exit}.norm.", f"exits.{dae_exit}.lm_head.")
    checked = 0
    for name, tensor in tuned.items():
        if name.startswith(owned):
            continue
        assert name in final and torch.equal(final[name], tensor), name
        checked += 1
    assert checked > len(tuned) // 2
    a, _ = load_family(ws / "artifacts/family_sft")
    b, _ = load_family(ws / "artifacts/compress")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for d in a.config.exit_layers:
            if d != dae_exit:
                assert torch.equal(a(ids, exit_layer=d).logits, b(ids, exit_layer=d).logits), d


def test_status_up_to_date_and_second_run_is_fast(workspace, first_run, prefect_api):
    from flows.pipeline import ruyi_pipeline

    status = run([DVC, "status", "dvc.yaml"], workspace).stdout
    assert "up to date" in status, status
    t0 = time.perf_counter()
    again = ruyi_pipeline(workspace=str(workspace), push=False)
    assert all(r["skipped"] for r in again)
    assert time.perf_counter() - t0 < 120
    assert len(store_versions(workspace)) == 1  # nothing redeployed


def test_changing_one_parameter_reruns_only_that_stage_and_downstream(workspace, first_run, prefect_api):
    from flows.pipeline import ruyi_pipeline

    before = (workspace / "artifacts/compress/model.safetensors").stat().st_mtime_ns
    results = ruyi_pipeline(workspace=str(workspace), overrides={"evaluate.num_problems": 5}, push=False)
    ran = [r["stage"] for r in results if not r["skipped"]]
    # evaluate reruns, and gates since evaluate's quality metrics (its input) changed; export reruns only
    # if the gates' verdict file changed, which fewer problems need not do; deploy reads those metrics
    # too (the evaluated parameter counts its tiers must serve), so it reruns, reusing the same release
    assert ran[:2] == ["evaluate", "gates"], ran
    assert set(ran) <= {"evaluate", "gates", "export", "deploy"}
    assert (workspace / "artifacts/compress/model.safetensors").stat().st_mtime_ns == before
    git(workspace, "commit", "-qam", "evaluate.num_problems=5")


def _http(method: str, url: str, body: dict | None = None, attempts: int = 20) -> dict | list:
    """One REST call; 503 (the server's SQLite busy under load, which Prefect's own client retries) is
    retried with a short pause, every other error is raised."""
    for attempt in range(attempts):
        req = urllib.request.Request(
            url,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code != 503 or attempt == attempts - 1:
                raise
            time.sleep(1.0)
    raise AssertionError("unreachable")


def test_rerun_from_compress_through_a_real_prefect_server(workspace, first_run, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(
        os.environ,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    env.pop("PREFECT_API_KEY", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    served = None
    try:
        for _ in range(240):
            try:
                _http("GET", f"{api}/health")
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("prefect server did not become healthy")
        served = subprocess.Popen(
            [str(BIN / "ruyi"), "deployments"],
            cwd=workspace,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        dep = None
        for _ in range(240):
            try:
                dep = _http("GET", f"{api}/deployments/name/ruyi-pipeline/rerun")
                break
            except OSError:
                time.sleep(0.5)
        assert dep, "rerun deployment never registered"
        rl_mtime = (workspace / "artifacts/rl/model.safetensors").stat().st_mtime_ns
        compress_metrics = (workspace / "metrics/compress.json").read_text()
        # as a person would in the dashboard: rerun from compress with one of its parameters changed
        run_ = _http(
            "POST",
            f"{api}/deployments/{dep['id']}/create_flow_run",
            {
                "parameters": {
                    "from_stage": "compress",
                    "overrides": {"compress.heal_steps": 3},
                    "push": False,
                }
            },
        )
        state = None
        for _ in range(1200):
            state = _http("GET", f"{api}/flow_runs/{run_['id']}")["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(0.5)
        assert state == "COMPLETED", state
        tasks = _http(
            "POST", f"{api}/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [run_["id"]]}}}
        )
        names = sorted(t["name"] for t in tasks)
        assert names == sorted(["compress", "evaluate", "route", "gates", "export", "deploy"]), names
        assert (
            workspace / "artifacts/rl/model.safetensors"
        ).stat().st_mtime_ns == rl_mtime  # upstream untouched
        assert json.loads((workspace / "metrics/compress.json").read_text()) != json.loads(
            compress_metrics
        )  # reran
        assert yaml.safe_load((workspace / "params.yaml").read_text())["compress"]["heal_steps"] == 3
        assert (
            "compress:" not in run([DVC, "status", "dvc.yaml"], workspace).stdout
        )  # and dvc.lock records what ran
        artifacts = _http(
            "POST", f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_["id"]]}}}
        )
        keys = {a["key"] for a in artifacts}
        assert "lineage" in keys and "metrics-compress" in keys, keys
        lineage = next(a for a in artifacts if a["key"] == "lineage")
        assert run_["id"] in lineage["data"] and "| compress | yes |" in lineage["data"]
        git(workspace, "commit", "-qam", "compress.heal_steps=3 (rerun from the dashboard)")
    finally:
        for proc in (served, server):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)


def _task_runs(flow_run_id) -> list[tuple[str, int]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted((t.name, t.run_count) for t in runs)


def test_a_failed_quality_gate_stops_the_flow_before_export_and_deploy(workspace, first_run, prefect_api):
    from flows.pipeline import StageFailed, apply_param_overrides, ruyi_pipeline

    versions = store_versions(workspace)
    exported = (workspace / "artifacts/export/manifest.json").read_bytes()
    before = yaml.safe_load((workspace / "params.yaml").read_text())["gates"]["max_loss"]
    try:
        state = ruyi_pipeline(
            workspace=str(workspace),
            from_stage="gates",
            overrides={"gates.max_loss": 0.01},
            push=False,
            return_state=True,
        )
        assert state.is_failed()
        with pytest.raises(StageFailed) as info:
            state.result()
        message = str(info.value)
        assert "stage gates failed (not retried)" in message and "gates.max_loss" in message, message
        assert _task_runs(state.state_details.flow_run_id) == [
            ("gates", 1)
        ]  # no retry, export/deploy never ran
        assert (workspace / "artifacts/export/manifest.json").read_bytes() == exported
        assert store_versions(workspace) == versions
    finally:
        apply_param_overrides(workspace, {"gates.max_loss": before})
        ruyi_pipeline(workspace=str(workspace), from_stage="gates", to_stage="gates", push=False)
    assert "up to date" in run([DVC, "status", "dvc.yaml"], workspace).stdout


def test_audit_clean_clone_pull_and_forced_repro_reproduce_every_output(workspace, first_run, tmp_path):
    from flows.audit import audit

    run([DVC, "push"], workspace)
    git(workspace, "add", "-A")
    git(workspace, "commit", "-qm", "results", "--allow-empty")
    # a clean clone pulls everything the remote holds: dvc status is clean before any repro
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(workspace), str(clone)], tmp_path)
    run([DVC, "pull", "dvc.yaml"], clone)  # the text pipeline (the VL profile's outputs were never pushed)
    status = run([DVC, "status", "dvc.yaml"], clone).stdout
    assert "up to date" in status, status
    # `ruyi audit`: every output of every stage reproduced bitwise, nothing stale or corrupt
    report = audit(workspace, workdir=tmp_path, log=lambda _: None)
    assert report.pulled and report.ok, report.to_dict()
    verdicts = {c.path: c.status for c in report.checks}
    assert set(verdicts.values()) == {"reproduced"}, verdicts
    for path in (
        "artifacts/compress",
        "artifacts/export",
        "metrics/eval_quality.json",
        "metrics/reproducible/cpt.json",
        "metrics/reproducible/rl.json",
    ):
        assert verdicts[path] == "reproduced", path


def test_malformed_raw_rows_stop_the_flow_at_validate_data(workspace, first_run, prefect_api):
    from flows.pipeline import StageFailed, ruyi_pipeline

    versions = store_versions(workspace)
    tok_metrics = (workspace / "metrics/tokenizer.json").stat().st_mtime_ns
    raw = workspace / "data/raw/sft.jsonl"
    rows = raw.read_text().splitlines()
    bad = json.loads(rows[0])
    bad.update(
        id="bad-email",
        prompt="Write to leak.me@example.com and compute 2+2.",
        response="2+2=4\n#### 4",
        answer="4",
    )
    bad2 = dict(json.loads(rows[1]), id="bad-answer", answer="four")
    manifest_path = workspace / "data/raw/manifest.json"
    kept = (
        raw,
        manifest_path,
        workspace / "metrics/reproducible/validate_data.json",
    )  # the last: cache: false
    originals = {p: p.read_bytes() for p in kept}
    try:
        raw.chmod(0o644)
        raw.write_text("\n".join(rows + [json.dumps(bad), json.dumps(bad2)]) + "\n")
        # as if an upstream producer wrote the bad rows: the manifest agrees with the files, the contracts
        # do not
        import hashlib

        manifest = json.loads(manifest_path.read_text())
        manifest["files"]["sft.jsonl"].update(
            rows=len(rows) + 2, sha256=hashlib.sha256(raw.read_bytes()).hexdigest()
        )
        manifest_path.chmod(0o644)
        manifest_path.write_text(json.dumps(manifest, indent=2))
        state = ruyi_pipeline(
            workspace=str(workspace), from_stage="validate_data", push=False, return_state=True
        )
        assert state.is_failed()
        with pytest.raises(StageFailed) as info:
            state.result()
        message = str(info.value)
        print(message)
        assert "stage validate_data failed (not retried)" in message and "data contract violated" in message
        assert "Data Docs:" in message and "sft.jsonl" in message  # where to look, and which file
        assert "expect_" in message  # the expectation that failed
        assert "leak.me@example.com" in message and "four" in message  # sample rows, both of them
        # one attempt (contract failures are never retried) and no later stage ran
        assert _task_runs(state.state_details.flow_run_id) == [("validate_data", 1)]
        assert store_versions(workspace) == versions
        assert (workspace / "metrics/tokenizer.json").stat().st_mtime_ns == tok_metrics
        docs = "\n".join(
            p.read_text(errors="replace") for p in (workspace / "reports/contracts").rglob("*.html")
        )
        assert "leak.me@example.com" in docs and "four" in docs  # the Data Docs list both bad rows
    finally:  # the raw data as recorded, and the validated data its lock entry names (the later tests)
        for path, data in originals.items():
            if path.exists():  # the metrics file is gone (DVC removes a stage's outputs before it runs)
                path.chmod(0o644)
            path.write_bytes(data)
        run([DVC, "checkout", "--force", "dvc.yaml"], workspace)
    assert "up to date" in run([DVC, "status", "dvc.yaml"], workspace).stdout


def test_the_whole_flow_on_the_megatron_backend_exports_stock_qwen3_members(
    workspace, first_run, prefect_api, tmp_path
):
    """`training.backend=megatron` with pp=2 (2 gloo ranks, member 2 on pipeline stage 0, member 4 on
    stage 1) through the whole flow from cpt to export (Prefect -> `dvc repro` -> the stage subprocess
    -> its spawned ranks): cpt and family_sft train on megatron-core, every later stage runs on the
    family they write, DVC records every stage, and the export stage's members load in stock
    transformers with the exported family's logits; the members that DaE leaves alone equal the
    megatron-trained family_sft output bit for bit. Last in the module: it reuses the micro workspace."""
    import torch
    from transformers import AutoModelForCausalLM

    from flows.pipeline import ruyi_pipeline
    from tasks.core.artifacts import load_family

    t0 = time.perf_counter()
    results = ruyi_pipeline(
        workspace=str(workspace),
        from_stage="cpt",
        to_stage="export",
        overrides={"training.backend": "megatron", "training.megatron.pp": 2},
        push=False,
    )
    seconds = time.perf_counter() - t0
    ran = [r["stage"] for r in results if not r["skipped"]]
    assert ran[:2] == ["cpt", "family_sft"] and ran[-1] == "export", ran
    for stage in ("cpt", "family_sft"):
        metrics = json.loads((workspace / f"metrics/{stage}.json").read_text())
        assert metrics["megatron"] == {"tp": 1, "pp": 2, "dp": 1, "recompute": False}, stage
        assert metrics["steps"] == MICRO[f"{stage}.max_steps"], stage
    status = run([DVC, "status", "dvc.yaml"], workspace).stdout.splitlines()
    assert not any(f"{stage}:" in status for stage in ran), status  # dvc.lock records every stage run
    sft_family, _ = load_family(workspace / "artifacts/family_sft")
    exported, _ = load_family(workspace / "artifacts/compress")
    manifest = json.loads((workspace / "artifacts/export/manifest.json").read_text())
    others = json.loads((workspace / "metrics/expand.json").read_text())["other_members"]
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    for d in exported.config.exit_layers:
        stock = AutoModelForCausalLM.from_pretrained(
            workspace / "artifacts/export" / manifest["members"][str(d)]["dir"]
        )
        assert type(stock).__name__ == "Qwen3ForCausalLM"
        with torch.no_grad():
            logits = stock.eval()(ids).logits
            diff = (logits - exported.eval()(ids, exit_layer=d).logits).abs().max().item()
            assert diff <= 1e-4, (d, diff)
            if d in others:  # untouched by DaE: the megatron-trained family_sft member itself
                assert torch.equal(
                    exported(ids, exit_layer=d).logits, sft_family.eval()(ids, exit_layer=d).logits
                ), d
    print(f"micro flow cpt -> export with cpt and family_sft on megatron pp=2: {seconds:.0f} s")
