"""The bounded load test (benchmarks/experiments/serve_load.py): a small run against the real Ray Serve app.

The script runs as a user runs it (a subprocess: Ray, Serve and the tiny release are its own); the test
checks correctness, never timings: no 5xx, no error for any valid request, every invalid one answered with
its expected 4xx, every request answered within the client timeout, and p50/p95 reported per level and
tier. The percentile and request-plan helpers are checked against numpy and by counting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "experiments" / "serve_load.py"


def _load_script():
    return load_script("benchmarks/experiments/serve_load.py")


def test_percentile_matches_numpy():
    serve_load = _load_script()
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        values = rng.exponential(50.0, size=n).tolist()
        for q in (0, 50, 95, 100):
            assert serve_load.percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert serve_load.percentile([], 50) is None


def test_request_plan():
    serve_load = _load_script()
    specs = serve_load.plan_requests(["exit_2", "exit_4", "dynamic"], 30, 4, 5, 8)
    invalid = [s for s in specs if s["expect"] != 200]
    assert len(specs) == 30 and len(invalid) == 6
    assert {s["expect"] for s in invalid} == {404, 400, 422}
    valid = [s for s in specs if s["expect"] == 200]
    assert {s["tier"] for s in valid} == {"exit_2", "exit_4", "dynamic"}
    assert all(s["body"]["max_tokens"] == 4 and s["body"]["model"] == s["tier"] for s in valid)
    assert serve_load.plan_requests(["exit_2"], 10, 4, 0, 8) == serve_load.plan_requests(
        ["exit_2"], 10, 4, 0, 8
    )
    assert all(s["expect"] == 200 for s in serve_load.plan_requests(["exit_2"], 10, 4, 0, 8))


def test_bad_arguments_are_refused():
    serve_load = _load_script()
    for argv in (
        ["--concurrency", "0"],
        ["--concurrency", "a,b"],
        ["--max-tokens", "9", "--max-tokens-limit", "8"],
    ):
        with pytest.raises(SystemExit) as exc:
            serve_load.parse_args(argv)
        assert exc.value.code == 2


@pytest.mark.slow
def test_bounded_load_against_the_served_app(tmp_path):
    out = tmp_path / "load.json"
    timeout_s = 60.0
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--requests",
        "30",
        "--concurrency",
        "1,4",
        "--rounds",
        "1",
        "--max-tokens",
        "4",
        "--max-tokens-limit",
        "8",
        "--invalid-every",
        "5",
        "--timeout-s",
        str(timeout_s),
        "--out",
        str(out),
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_TMPDIR"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout[proc.stdout.index('{\n  "release"') :]) == result
    assert result["tiers"] == ["exit_2", "exit_4", "dynamic", "speculative"]
    assert set(result["concurrency"]) == {"1", "4"}
    for level in result["concurrency"].values():
        assert level["requests"] == 30 and level["server_errors_5xx"] == 0
        assert level["errors"] == {}, level["errors"]  # no timeout, no connection error, no wrong status
        assert level["ok"] == level["valid"] == 24
        assert level["invalid_answered_as_expected"] == level["invalid_sent"] == 6
        latency = level["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["max"] < 1000 * timeout_s
        assert 0 < level["completion_tokens"] <= 24 * 4
        for tier in result["tiers"]:  # 24 valid requests over 4 tiers
            per_tier = level["per_tier"][tier]
            assert per_tier["ok"] == per_tier["valid"] == 6 and per_tier["latency_ms"]["p95"] is not None
