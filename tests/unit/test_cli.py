"""The `ruyi` command line: help everywhere, stage dispatch, errors that name what is wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import STAGES

REPO = Path(__file__).resolve().parents[2]
RUYI = str(Path(sys.executable).parent / "ruyi")


def ruyi(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    environ = {**os.environ, **(env or {})}
    return subprocess.run([RUYI, *args], cwd=REPO, capture_output=True, text=True, timeout=120, env=environ)


def test_stage_help_lists_the_stages():
    proc = ruyi("stage", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "ruyi stage NAME" in proc.stdout and ", ".join(STAGES) in proc.stdout


def test_unknown_stage_names_the_stages():
    proc = ruyi("stage", "nope")
    assert proc.returncode == 2 and "unknown stage 'nope'" in proc.stderr and "prepare_data" in proc.stderr


def test_cli_stages_match_the_dvc_pipeline():
    import yaml

    assert STAGES == list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_has_help_through_ruyi(name):
    proc = ruyi("stage", name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"python -m tasks.{name}" in proc.stdout and "--set KEY=VALUE" in proc.stdout


def test_a_bad_override_is_an_error_naming_the_key():
    proc = ruyi("stage", "tokenizer", "--set", "tokenizer.vocab_sise=10")
    assert proc.returncode == 2 and "tokenizer.vocab_sise" in proc.stderr


@pytest.mark.parametrize("command", ["run", "serve", "server", "deployments"])
def test_commands_have_help(command):
    proc = ruyi(command, "--help")
    assert proc.returncode == 0 and "Usage: ruyi " + command in proc.stdout, proc.stderr


def test_deployments_without_a_prefect_server_is_a_clear_error(tmp_path):
    """Without PREFECT_API_URL Prefect would serve the deployments on a throwaway API with no scheduler."""
    proc = ruyi("deployments", env={"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path)})
    assert (
        proc.returncode == 2 and "PREFECT_API_URL is not set" in proc.stderr and "ruyi server" in proc.stderr
    )


def test_a_flow_mapping_without_the_space_after_the_colon_is_refused_with_the_spelling_that_works():
    before = (REPO / "params.yaml").read_bytes()
    proc = ruyi("run", "--no-push", "--set", "gates.min_accuracy={2:0.1}")
    assert proc.returncode == 2, proc.stderr
    assert "'2:0.1' reads as a mapping key without a value" in proc.stderr
    assert "e.g. gates.min_accuracy={2: 0.1}" in proc.stderr
    assert (REPO / "params.yaml").read_bytes() == before  # refused before anything is written
