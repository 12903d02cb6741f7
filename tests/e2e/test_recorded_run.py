"""The run recorded on this branch (the last commit of dvc.lock) reproduces in a clean clone (slow).

`ruyi audit --rev <that commit> --no-pull --to-stage tokenizer`: the data and tokenizer stages are
forced in a clean clone and compared with the recording bitwise (the whole chain is audited the same
way without `--to-stage`; its figures are in benchmarks/RESULTS.md). Nothing is pulled: a fresh clone
has no remote, so every compared output is rebuilt from code, params and seeds.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from flows.audit import audit, upstream_stages

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _recorded_revision() -> str:
    out = subprocess.run(
        ["git", "log", "-1", "--format=%H", "--", "dvc.lock"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out, "no recorded run: dvc.lock was never committed (make run, then commit dvc.lock and metrics/)"
    return out


def test_upstream_of_a_stage_follows_the_data():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert upstream_stages(spec, "tokenizer") == {"prepare_data", "validate_data", "tokenizer"}
    assert {"cpt", "family_sft", "expand", "sft", "rl", "compress"} <= upstream_stages(spec, "export")
    assert "deploy" not in upstream_stages(spec, "export")


def test_the_recorded_run_reproduces_in_a_clean_clone(tmp_path):
    rev = _recorded_revision()
    report = audit(REPO, rev=rev, pull=False, to_stage="tokenizer", workdir=tmp_path, log=lambda _: None)
    assert report.ok, report.to_dict()
    verdicts = {c.path: c.status for c in report.checks}
    for path in ("data/raw", "data/validated", "artifacts/tokenizer", "metrics/reproducible/tokenizer.json"):
        assert verdicts[path] == "reproduced", verdicts
