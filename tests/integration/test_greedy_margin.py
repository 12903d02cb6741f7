"""benchmarks/experiments/greedy_margin.py on a tiny exported family: per member, the greedy paths' top-2
gaps and the batched-vs-single logit difference; bad arguments name what is wrong."""

from __future__ import annotations

import json

import pytest
from tiny_export import build_tiny_export, private_tmpdir

from tasks.core.files import write_jsonl
from tests.scripts import load_script

QUESTIONS = ["Tom has 3 apples and buys 4 more. How many?", "What is 12 - 5?", "Sara has 7 pens and 2 more."]


def _script():
    return load_script("benchmarks/experiments/greedy_margin.py")


def test_greedy_margin_measures_every_member(tmp_path, capsys):
    with private_tmpdir("ruyi-margin-") as tmp:
        family = build_tiny_export(tmp / "export", dae_blocks=2) / "family"
        eval_file = tmp_path / "eval.jsonl"
        write_jsonl(eval_file, [{"question": q} for q in QUESTIONS])
        out = tmp_path / "margin.json"
        common = ["--checkpoint", str(family), "--eval-file", str(eval_file), "--max-new-tokens", "5"]
        script = _script()
        assert script.main([*common, "--num-prompts", "2", "--batch-prompts", "3", "--json", str(out)]) == 0
        rows = json.loads(out.read_text())["rows"]
        assert [r["exit"] for r in rows] == [2, 4]
        for r in rows:
            assert 1 <= r["steps"] <= 2 * 5
            assert 0 <= r["min_gap"] <= r["median_gap"]
            # float32: padding a prompt into a batch moves its logits by rounding only
            assert 0 <= r["batched_vs_single"] < 1e-4
        assert "batched vs single" in capsys.readouterr().out

        with pytest.raises(SystemExit):
            script.main([*common, "--batch-prompts", "4"])
        assert (
            f"{eval_file} has 3 questions; --num-prompts and --batch-prompts need 4"
            in capsys.readouterr().err
        )
        with pytest.raises(SystemExit):
            script.main([*common, "--num-prompts", "0"])
        assert "--num-prompts must be >= 1" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            script.main(["--checkpoint", str(tmp / "missing"), "--eval-file", str(eval_file)])
        assert "missing" in capsys.readouterr().err
