"""The kernel benchmark scripts run end to end on CPU at a tiny shape, and their impls agree.

Timings are not checked (noisy machine); what is checked: every worker row is "ok", the chunked impl
computes what the naive one does, and a worker that cannot finish is a recorded failure, not a crash.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels"


def _run(script: str, *args: str, check: bool = True) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = subprocess.run(
        [sys.executable, str(KERNELS / script), "--device", "cpu", "--rounds", "1", "--threads", "1", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if check:
        assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("JSON ")]
    return out, (json.loads(lines[-1][5:]) if lines else None)


def test_exit_head_loss_benchmark_rows_agree():
    _, result = _run(
        "benchmark_exit_head_loss.py", "--K", "2", "--N", "48", "--D", "16", "--V", "96",
        "--impls", "naive", "chunked", "--chunk-sizes", "16",
    )  # fmt: skip
    rows = {r["impl"]: r for r in result["results"]}
    assert set(rows) == {"naive", "chunked"} and all(r["status"] == "ok" for r in rows.values())
    assert rows["chunked"]["chunk_size"] == 16
    assert rows["chunked"]["loss"] == pytest.approx(rows["naive"]["loss"], rel=1e-5)
    assert rows["chunked"]["time_vs_naive"] is not None and rows["naive"]["mem_vs_naive"] == 1.0


def test_exit_confidence_benchmark_rows_agree():
    _, result = _run("benchmark_exit_confidence.py", "--B", "40", "--D", "16", "--V", "96")
    rows = {r["impl"]: r for r in result["results"]}
    assert set(rows) == {"naive", "chunked"} and all(r["status"] == "ok" for r in rows.values())
    for key in ("mean_entropy", "mean_max_prob"):
        assert rows["chunked"][key] == pytest.approx(rows["naive"][key], rel=1e-5)


def test_a_worker_past_its_timeout_is_a_recorded_failure():
    out, result = _run(
        "benchmark_exit_confidence.py", "--B", "8", "--D", "8", "--V", "16", "--impls", "naive",
        "--worker-timeout", "0.01", check=False,
    )  # fmt: skip
    assert out.returncode != 0 and "every worker failed" in out.stderr
    (row,) = result["results"]
    assert row["status"] == "failed" and "timeout after 0.01 s" in row["error"]


def test_draw_tokens_benchmark_times_both_samplers():
    script = str(KERNELS / "draw_tokens.py")
    out = subprocess.run(
        [sys.executable, script, "--rows", "4", "--vocab", "32", "--repeats", "3"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "inverse_cdf " in out.stdout and "race " in out.stdout and "race / inverse_cdf: " in out.stdout
    bad = subprocess.run([sys.executable, script, "--rows", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--rows, --vocab, --repeats and --threads must be >= 1" in bad.stderr
