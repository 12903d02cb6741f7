"""The deploy stage (tasks/deploy.py): publish, fetch, serve on Ray, smoke-test, metrics; and its errors.

The end-to-end test publishes to a real S3 server (SeaweedFS) and serves with real Ray Serve; the
others stop before Ray starts (bad inputs must fail fast and clearly).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from local_http import free_port, serve_app
from s3server import s3_server  # noqa: F401  (module-scoped SeaweedFS fixture)
from tiny_export import add_router, build_tiny_export, private_tmpdir

from tasks.core.files import sha256_file, write_jsonl
from tasks.core.params import load_params
from tasks.core.stage import StageError
from tasks.deploy import check_export_tiers, check_served_params, content_digest, main, publish_export, run
from tasks.release.store import LocalStore, S3Store, open_store, scan_dir

REPO = Path(__file__).resolve().parents[2]
EVAL_ROWS = [
    {
        "id": "e1",
        "question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
        "solution": "3 + 4 = 7\n#### 7",
        "answer": "7",
        "level": 1,
    },
    {
        "id": "e2",
        "question": "A train travels 60 miles in 2 hours. What is its speed?",
        "solution": "60 / 2 = 30\n#### 30",
        "answer": "30",
        "level": 1,
    },
    {
        "id": "e3",
        "question": "Not used: smoke_prompts is 2.",
        "solution": "#### 1",
        "answer": "1",
        "level": 1,
    },
]


@pytest.fixture(scope="module")
def export_src():
    # exit 2 is a decomposed DaE member: the export holds its factored copy, which tier exit_2 serves
    with private_tmpdir("ruyi-deploy-export-") as tmp:
        out = build_tiny_export(tmp / "export", dae_blocks=2)
        # the route stage's router, as export ships it. Its exit_2 (two DaE blocks) runs as many layers as
        # exit_4, so it is no cheaper and the router sends every request to exit_4.
        add_router(out, [r["question"] for r in EVAL_ROWS], [1, 0, 1], threshold=0.5)
        yield out


def eval_quality(export: Path) -> dict:
    """What evaluate writes to metrics/eval_quality.json about sizes: per exit `params`, counted by
    evaluate's own function on the exported family."""
    from ruyi_model import FamilialForCausalLM
    from tasks.training.heldout import member_params

    family = FamilialForCausalLM.from_pretrained(export / "family")
    exits = list(family.config.exit_layers)
    return {"exits": exits, **{f"exit_{d}": {"params": member_params(family, d)} for d in exits}}


SMOKE_TOKENS = 8  # deploy.smoke_max_tokens = evaluate.max_new_tokens in these workspaces


def eval_generations(export: Path, max_new_tokens: int = SMOKE_TOKENS) -> list[dict]:
    """What evaluate writes to reports/evaluate/generations.jsonl: every member's greedy completion of
    each eval question, decoded by evaluate's own function (left-padded batches) on the exported family."""
    from ruyi_model.decoding import greedy_generate
    from tasks.core.artifacts import load_family

    family, tokenizer = load_family(export / "family")
    rows = []
    for d in family.config.exit_layers:
        texts = greedy_generate(family, tokenizer, [r["question"] for r in EVAL_ROWS], d, max_new_tokens)
        rows += [{"id": r["id"], "exit": d, "completion": t} for r, t in zip(EVAL_ROWS, texts)]
    return rows


@pytest.fixture(scope="module")
def generations(export_src):
    return eval_generations(export_src)


def _workspace(root: Path, export_src: Path, generations: list[dict]) -> dict:
    """A workspace with artifacts/export, data/validated/eval.jsonl, metrics/eval_quality.json (the
    evaluated parameter counts) and reports/evaluate/generations.jsonl; returns params overrides."""
    shutil.copytree(export_src, root / "artifacts" / "export")
    write_jsonl(root / "data" / "validated" / "eval.jsonl", EVAL_ROWS)
    (root / "metrics").mkdir()
    (root / "metrics" / "eval_quality.json").write_text(json.dumps(eval_quality(export_src)))
    write_jsonl(root / "reports" / "evaluate" / "generations.jsonl", generations)
    return {
        "paths.data_dir": str(root / "data"),
        "paths.artifacts_dir": str(root / "artifacts"),
        "paths.metrics_dir": str(root / "metrics"),
        "paths.plots_dir": str(root / "plots"),
        "paths.reports_dir": str(root / "reports"),
        "deploy.store.root": str(root / "store"),
        "deploy.smoke_prompts": 2,
        "deploy.smoke_max_tokens": SMOKE_TOKENS,
        "evaluate.max_new_tokens": SMOKE_TOKENS,
    }


def test_publish_export_reuses_identical_releases(tmp_path, export_src, generations):
    overrides = _workspace(tmp_path, export_src, generations)
    params = load_params(REPO / "params.yaml", overrides)
    store = open_store(params.deploy.store)
    first, reused = publish_export(params, store)
    assert (first.version, reused) == ("v0001", False)
    assert first.metadata["content_sha256"] == content_digest(scan_dir(tmp_path / "artifacts" / "export"))
    assert first.metadata["exit_layers"] == [2, 4]
    again, reused = publish_export(params, store)  # same export: idempotent
    assert (again.version, reused) == ("v0001", True)
    fixed = load_params(REPO / "params.yaml", {**overrides, "deploy.version": "v0001"})
    assert publish_export(fixed, store)[1] is True
    export = tmp_path / "artifacts" / "export"
    (export / "NOTES.txt").write_text("a changed export\n")
    # a file the export stage did not list (or one changed since) is refused before anything is published
    with pytest.raises(StageError, match=r"NOTES\.txt: not listed in manifest\.json .*re-run the export"):
        publish_export(params, store)
    assert store.list_versions("ruyi-tiny") == ["v0001"]
    manifest = json.loads((export / "manifest.json").read_text())  # an export that lists it is a new one
    notes = export / "NOTES.txt"
    manifest["files"]["NOTES.txt"] = {"bytes": notes.stat().st_size, "sha256": sha256_file(notes)}
    (export / "manifest.json").write_text(json.dumps(manifest))
    changed, reused = publish_export(params, store)
    assert (changed.version, reused) == ("v0002", False)
    with pytest.raises(StageError, match="v0001 already exists .* with different content"):
        publish_export(fixed, store)
    assert store.list_versions("ruyi-tiny") == ["v0001", "v0002"]


def test_deploy_fails_fast_and_clearly(tmp_path, export_src, generations, capsys):
    overrides = _workspace(tmp_path, export_src, generations)
    sets = [f"--set={k}={v}" for k, v in overrides.items()]
    params_file = str(REPO / "params.yaml")

    (tmp_path / "data" / "validated" / "eval.jsonl").unlink()
    assert main(["--params", params_file, *sets]) == 2
    assert "eval.jsonl" in capsys.readouterr().err
    write_jsonl(tmp_path / "data" / "validated" / "eval.jsonl", EVAL_ROWS)

    shutil.rmtree(tmp_path / "artifacts" / "export")
    assert main(["--params", params_file, *sets]) == 2
    assert "export (run the export stage first) not found" in capsys.readouterr().err

    shutil.copytree(export_src, tmp_path / "artifacts" / "export")
    assert main(["--params", params_file, *sets, "--set", "deploy.store.backend=s3"]) == 2
    assert "store.bucket is required" in capsys.readouterr().err

    quality = tmp_path / "metrics" / "eval_quality.json"
    evaluated = json.loads(quality.read_text())
    quality.unlink()
    assert main(["--params", params_file, *sets]) == 2
    assert f"{quality} not found (run the evaluate stage first)" in capsys.readouterr().err
    quality.write_text(json.dumps({**evaluated, "exit_4": {}}))
    assert main(["--params", params_file, *sets]) == 2
    assert "no integer exit_4.params" in capsys.readouterr().err
    quality.write_text(json.dumps(evaluated))

    completions = tmp_path / "reports" / "evaluate" / "generations.jsonl"
    completions.unlink()
    assert main(["--params", params_file, *sets]) == 2
    assert f"{completions} not found (run the evaluate stage first)" in capsys.readouterr().err
    write_jsonl(completions, [*generations[:1], {**generations[1], "exit": "4"}])
    assert main(["--params", params_file, *sets]) == 2
    assert f"{completions}: row 2: `exit` must be an integer" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == ["eval_quality.json"]
    assert not (tmp_path / "store").exists()  # nothing published


def test_deploy_refuses_tiers_that_are_not_the_evaluated_members(tmp_path, export_src, generations, capsys):
    """Before anything is published: a tier whose parameter count is not the evaluated member's, or a
    factored tier whose logits are not the family's, is a StageError naming the tier."""
    import torch

    from ruyi_model import FamilialForCausalLM, LowRankLinear

    overrides = _workspace(tmp_path, export_src, generations)
    sets = [f"--set={k}={v}" for k, v in overrides.items()]
    params_file = str(REPO / "params.yaml")
    quality = tmp_path / "metrics" / "eval_quality.json"
    evaluated = json.loads(quality.read_text())
    manifest = json.loads((export_src / "manifest.json").read_text())

    # The evaluated member 2 ran its dense weights (e.g. another checkpoint was evaluated).
    dense = manifest["members"]["2"]["num_parameters"]
    quality.write_text(json.dumps({**evaluated, "exit_2": {"params": dense}}))
    assert main(["--params", params_file, *sets]) == 2
    err = capsys.readouterr().err
    assert f"tier exit_2 would serve {evaluated['exit_2']['params']} parameters (factored)" in err
    assert f"the evaluated member runs {dense}" in err
    quality.write_text(json.dumps(evaluated))

    # The factored copy's weights are not the family's (same shapes, the head's factor changed).
    factored = tmp_path / "artifacts" / "export" / "exit_2_factored"
    one = FamilialForCausalLM.from_pretrained(factored)
    assert isinstance(one.exits["2"].lm_head, LowRankLinear)
    with torch.no_grad():
        one.exits["2"].lm_head.weight_a.mul_(1.5)
    one.save_pretrained(factored)
    assert main(["--params", params_file, *sets]) == 2
    err = capsys.readouterr().err
    assert "tier exit_2: the factored weights" in err and "differ from the family's at exit 2" in err
    assert not (tmp_path / "store").exists() and not (tmp_path / "metrics" / "deploy.json").exists()


def test_a_release_that_fails_to_serve_is_published_but_never_served_by_default(
    tmp_path, export_src, generations
):
    """deploy publishes before it serves: when serving or the smoke test fails, the release exists but is
    not validated, so `ruyi serve` without --version (and a serve config with version null) keeps
    following the last validated release instead of the failed one."""
    from tasks.deploy import serve_release
    from tasks.release.store import StoreError

    params = load_params(
        REPO / "params.yaml", {**_workspace(tmp_path, export_src, generations), "deploy.port": free_port()}
    )
    store = open_store(params.deploy.store)
    with socket.socket() as busy:  # serving cannot start: its port is taken (checked before Ray starts)
        busy.bind(("127.0.0.1", params.deploy.port))
        busy.listen()
        with pytest.raises(StageError, match=f"cannot serve on 127.0.0.1:{params.deploy.port}"):
            run(params)
    assert store.list_versions("ruyi-tiny") == ["v0001"] and store.validation("ruyi-tiny", "v0001") is None
    assert not (tmp_path / "metrics" / "deploy.json").exists()
    with pytest.raises(
        StoreError, match=r"has passed the deploy smoke test \(published, not validated: v0001\)"
    ):
        serve_release(params)
    # the same content validated by an earlier deploy, then a new release that failed: the old one is served
    store.mark_validated("ruyi-tiny", "v0001", {"stage": "test"})
    newer = tmp_path / "newer"
    shutil.copytree(export_src, newer)
    (newer / "NOTES.txt").write_text("another release\n")
    assert store.publish("ruyi-tiny", newer).version == "v0002"
    assert store.latest_version("ruyi-tiny") == "v0002"
    assert store.latest_version("ruyi-tiny", validated=True) == "v0001"
    assert store.get_release("ruyi-tiny", validated=True).version == "v0001"


def _uvicorn(release: Path):
    """The serving app of `release` (CompletionService, no Ray) on a free port: a context yielding its URL."""
    from tasks.release.serving import CompletionService, create_app

    return serve_app(create_app(CompletionService(release, model_name="tiny")))


def test_served_parameter_counts_are_checked_over_http(tmp_path, export_src):
    """`check_served_params` reads /v1/models of a running app (uvicorn, no Ray): a release whose DaE tier
    serves its dense weights is refused, naming the tier."""
    release = tmp_path / "release"
    shutil.copytree(export_src, release)
    evaluated = eval_quality(export_src)
    eval_params = {d: evaluated[f"exit_{d}"]["params"] for d in evaluated["exits"]}
    expected = check_export_tiers(release, eval_params, EVAL_ROWS[0]["question"])
    assert expected["exit_2"]["weights"] == "factored" and expected["exit_4"]["weights"] == "dense"
    assert expected["exit_2"]["max_abs_logit_diff"] <= 1e-5 and "max_abs_logit_diff" not in expected["exit_4"]

    with _uvicorn(release) as url:
        check_served_params(url, eval_params, expected)  # the factored tier: passes
    shutil.rmtree(release / "exit_2_factored")  # an app serving exit_2 dense
    with _uvicorn(release) as url:
        with pytest.raises(
            StageError, match=r"tier exit_2 serves \d+ parameters \(dense\), but the evaluated"
        ):
            check_served_params(url, eval_params, expected)


def test_served_answers_are_compared_with_evaluates(tmp_path, export_src, generations, caplog):
    """Each exit tier's smoke answer over HTTP must be evaluate's greedy completion (its own batched
    decoding of the family). A release whose member ships another chat template passes the logit probe
    and the parameter counts, and is caught here; in float32 that is a StageError naming the tier, the
    question and the file; otherwise a warning."""
    from tasks.deploy import smoke_test
    from tasks.release.smoke import check_same_as_evaluate, compare_with_evaluate

    evaluated = {(r["exit"], r["id"]): r["completion"] for r in generations}
    questions = EVAL_ROWS[:2]
    release = tmp_path / "release"
    shutil.copytree(export_src, release)
    with _uvicorn(release) as url:
        _, rows = smoke_test(url, questions, SMOKE_TOKENS)
    # each row names the member it was served by, as /v1/models lists it (None for composite tiers)
    assert {(r["tier"], r["exit_layer"]) for r in rows if r["exit_layer"] is not None} == {
        ("exit_2", 2),
        ("exit_4", 4),
    }
    assert all(r["tier"] in ("dynamic", "speculative", "auto") for r in rows if r["exit_layer"] is None)
    same = compare_with_evaluate(rows, evaluated, same_budget=True)
    assert {t: (c["same_as_evaluate"], c["compared"]) for t, c in same.items()} == {
        "exit_2": (1.0, 2),
        "exit_4": (1.0, 2),
    }
    assert all("first_difference" not in c for c in same.values())
    # a shorter budget: each served answer is the start of evaluate's (one greedy decoding, cut earlier)
    with _uvicorn(release) as url:
        _, short = smoke_test(url, questions, 3)
    assert all(r["completion_tokens"] <= 3 for r in short)
    cut = compare_with_evaluate(short, evaluated, same_budget=False)
    assert [c["same_as_evaluate"] for c in cut.values()] == [1.0, 1.0]
    assert compare_with_evaluate(short, evaluated, same_budget=True)["exit_4"]["same_as_evaluate"] < 1
    # a question evaluate did not decode is not compared
    assert compare_with_evaluate(rows, {}, same_budget=True)["exit_4"] == {
        "same_as_evaluate": None,
        "compared": 0,
    }

    templates = sorted(release.glob("*/chat_template.jinja"))  # every member's and the family's
    assert len(templates) >= 3
    for template in templates:
        template.write_text("<|im_start|>system\nAnswer in French.<|im_end|>\n" + template.read_text())
    with _uvicorn(release) as url:
        _, rows = smoke_test(url, questions, SMOKE_TOKENS)
    same = compare_with_evaluate(rows, evaluated, same_budget=True)
    assert same["exit_2"]["same_as_evaluate"] < 1.0 and same["exit_4"]["same_as_evaluate"] < 1.0
    diff = same["exit_4"]["first_difference"]
    assert diff["served"] != diff["evaluated"] == evaluated[(4, diff["id"])]
    path = tmp_path / "generations.jsonl"
    with pytest.raises(
        StageError, match=rf"tier exit_4 answered question {diff['id']} .*{path}.*not marked validated"
    ):
        check_same_as_evaluate("exit_4", same["exit_4"], path, strict=True)
    check_same_as_evaluate("exit_4", {"same_as_evaluate": 1.0, "compared": 2}, path, strict=True)
    with caplog.at_level("WARNING", logger="ruyi.deploy"):
        check_same_as_evaluate("exit_4", same["exit_4"], path, strict=False)
    assert "tier exit_4 answered question" in caplog.text and "near tie" in caplog.text


def test_deploy_stage_s3_end_to_end(tmp_path, export_src, generations, s3_server, monkeypatch):  # noqa: F811
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    s3_server.create_bucket("releases")
    overrides = {
        **_workspace(tmp_path, export_src, generations),
        "deploy.store.backend": "s3",
        "deploy.store.bucket": "releases",
        "deploy.store.endpoint_url": s3_server.endpoint,
        "deploy.store.connect_timeout_s": 2,
        "deploy.store.max_attempts": 2,
        "deploy.port": free_port(),
    }
    params = load_params(REPO / "params.yaml", overrides)

    # Wrong credentials: a clear error, before Ray is started.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StageError, match="credentials were rejected"):
        run(params)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)

    metrics = run(params)
    assert metrics["version"] == "v0001" and metrics["reused_release"] is False
    assert (
        metrics["store_uri"] == "s3://releases/ruyi"
        and metrics["release_uri"] == "s3://releases/ruyi/ruyi-tiny/v0001"
    )
    assert metrics["serving_url"] == f"http://127.0.0.1:{params.deploy.port}"
    tiers = metrics["tiers"]
    for tier in ("exit_2", "exit_4"):
        assert tiers[tier]["requests"] == tiers[tier]["ok"] == 2
        assert 0 <= tiers[tier]["accuracy"] <= 1 and tiers[tier]["latency_ms_p50"] > 0
        assert tiers[tier]["completion_tokens_mean"] <= 8
    assert tiers["dynamic"]["ok"] == 2 and 2 <= tiers["dynamic"]["mean_exit_layer"] <= 4
    # speculative: the deepest member's greedy output; auto: each answer by the member the router picked
    assert tiers["speculative"]["ok"] == 2 and tiers["speculative"]["same_as_deepest"] == 1.0
    spec = tiers["speculative"]
    assert 0 <= spec["acceptance_rate"] <= 1 and spec["verifications"] >= 2 and spec["drafts_per_token"] > 0
    assert tiers["auto"]["ok"] == 2 and tiers["auto"]["members"] == {"exit_4": 2}
    # Every member tier ran the evaluated parameter count; the DaE tier its factored weights.
    evaluated = eval_quality(export_src)
    for d, weights in ((2, "factored"), (4, "dense")):
        assert tiers[f"exit_{d}"]["params"] == evaluated[f"exit_{d}"]["params"]
        assert tiers[f"exit_{d}"]["weights"] == weights
    assert tiers["exit_2"]["max_abs_logit_diff"] <= 1e-5
    # each member tier answered as evaluate decoded that member (whole texts: the same budget)
    for tier in ("exit_2", "exit_4"):
        assert (tiers[tier]["same_as_evaluate"], tiers[tier]["compared"]) == (1.0, 2)
    on_disk = json.loads((tmp_path / "metrics" / "deploy.json").read_text())
    assert on_disk["version"] == "v0001" and on_disk["tiers"] == json.loads(json.dumps(tiers))
    smoke = json.loads((tmp_path / "metrics" / "deploy_smoke.json").read_text())
    assert smoke["content_sha256"] == content_digest(scan_dir(tmp_path / "artifacts" / "export"))
    assert "version" not in smoke and all("latency_ms_p50" not in t for t in smoke["tiers"].values())
    assert smoke["tiers"]["exit_2"]["params"] == evaluated["exit_2"]["params"]
    assert smoke["tiers"]["exit_2"]["weights"] == "factored"
    rows = [
        json.loads(line)
        for line in (tmp_path / "reports" / "deploy" / "smoke.jsonl").read_text().splitlines()
    ]
    assert {(r["tier"], r["id"]) for r in rows} >= {("exit_2", "e1"), ("exit_4", "e2")}
    assert (tmp_path / "plots" / "deploy" / "latency.png").stat().st_size > 0
    assert (tmp_path / "plots" / "deploy" / "latency.csv").read_text().startswith("tier,")

    # The release is in S3 and complete; what was served is the verified copy fetched back.
    store = open_store(params.deploy.store)
    assert isinstance(store, S3Store) and store.list_versions("ruyi-tiny") == ["v0001"]
    # it passed: validated in the store, which is what serving "the latest" follows
    record = store.validation("ruyi-tiny", "v0001")
    assert record is not None and record["validated"] == metrics["validated"]
    assert record["content_sha256"] == smoke["content_sha256"]
    assert record["evidence"]["smoke_prompts"] == 2 and "auto" in record["evidence"]["tiers"]
    assert store.latest_version("ruyi-tiny", validated=True) == "v0001"
    served = tmp_path / "artifacts" / "releases" / "ruyi-tiny" / "v0001"
    assert (served / "MANIFEST.json").is_file() and (served / "exit_2" / "model.safetensors").is_file()
    # Nothing of Ray is left (its processes carry this session's RAY_TMPDIR in their command lines).
    out = subprocess.run(["pgrep", "-af", os.environ["RAY_TMPDIR"]], capture_output=True, text=True).stdout
    assert [line for line in out.splitlines() if "pgrep" not in line] == []


def test_local_store_is_the_default(tmp_path):
    params = load_params(REPO / "params.yaml")
    assert params.deploy.store.backend == "local"
    assert isinstance(open_store(params.deploy.store), LocalStore)


def test_ruyi_serve_command_reports_store_errors(tmp_path):
    """`ruyi serve` wiring: options reach serve_release; a store without the release is a clear error."""
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(
        app,
        [
            "serve",
            "--params",
            str(REPO / "params.yaml"),
            "--version",
            "v0003",
            "--set",
            f"deploy.store.root={tmp_path / 'empty-store'}",
        ],
    )
    assert result.exit_code == 2
    assert "release ruyi-tiny/v0003 not found" in result.output
    result = CliRunner().invoke(app, ["serve", "--params", str(REPO / "params.yaml"), "--port", "15000"])
    assert result.exit_code == 2 and "worker port range" in result.output  # checked before anything starts
