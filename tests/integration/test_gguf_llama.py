"""benchmarks/experiments/gguf_llama.py: exported GGUF members run by llama.cpp (`llama-cpp-python`, the
optional extra `llama`) against the HF members.

The run itself is skipped when llama_cpp is not installed (`make llama`); the command line is tested
either way. A tiny export (tests/tiny_export.py) gets f32 and q8_0 GGUF files from the real
`export_gguf`; llama.cpp must load every one, encode the prompts to the HF ids with the GGUF's own
tokenizer, and decode greedily like the HF member from the f32 file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "experiments" / "gguf_llama.py"
QUESTIONS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have now?",
    "A train travels 60 miles in 2 hours. What is its speed in miles per hour?",
    "The quick brown fox jumps over the lazy dog.",
]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, env=env
    )


def test_command_line():
    out = _run("--help")
    assert out.returncode == 0 and "--export" in out.stdout and "--num-prompts" in out.stdout
    bad = _run("--dtypes", "q4_k")
    assert bad.returncode == 2 and "q4_k" in bad.stderr


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="llama_cpp is installed")
def test_without_llama_cpp_it_says_how_to_get_it():
    out = _run("--num-prompts", "1")
    assert out.returncode == 2 and "make llama" in out.stderr


def test_llama_cpp_runs_every_member_like_transformers(tmp_path):
    pytest.importorskip("llama_cpp")
    from ruyi_model import export_gguf
    from tests.tiny_export import build_tiny_export

    export = build_tiny_export(tmp_path / "export")
    for d in (2, 4):
        for dtype in ("f32", "q8_0"):
            export_gguf(export / f"exit_{d}", None, export / f"exit_{d}" / f"model-{dtype}.gguf", dtype=dtype)
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"question": q, "answer": "1"}) + "\n" for q in QUESTIONS))
    out = _run(
        "--export", str(export), "--eval-file", str(eval_file), "--num-prompts", "3", "--max-new-tokens", "8",
        "--json", str(tmp_path / "rows.json"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["member"], r["dtype"]) for r in rows] == [
        ("exit_2", "f32"),
        ("exit_2", "q8_0"),
        ("exit_4", "f32"),
        ("exit_4", "q8_0"),
    ]
    for r in rows:
        assert r["prompts"] == 3 and r["tokenizer_ids_equal"] == 1.0, r
        assert r["hf_tok_s"] > 0 and r["llama_tok_s"] > 0 and r["llama_new_tokens"] > 0, r
        if r["dtype"] == "f32":  # same weights, other kernels: greedy decoding agrees
            assert r["agree"] == 1.0, r
    assert "| exit_2 | f32 |" in out.stdout
