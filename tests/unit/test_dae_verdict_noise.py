"""benchmarks/experiments/dae_verdict_noise.py: each problem's verdict is the compress stage's own (its
mean is `member_accuracy`), the figures are `gain_retained`'s, and the interval decides a clear case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.scripts import load_script
from tests.tiny_export import build_tiny_family, tiny_tokenizer


@pytest.fixture(scope="module")
def noise():
    return load_script("benchmarks/experiments/dae_verdict_noise.py")


def test_each_problem_is_judged_as_the_compress_stage_judges_it(noise, tmp_path):
    from tasks.compress import member_accuracy

    tokenizer = tiny_tokenizer()
    family, _ = build_tiny_family(tokenizer, exit_layers=(2, 4), dae_blocks=2)
    problems = [{"id": i, "question": f"what is {i} plus {i}?", "answer": str(2 * i)} for i in range(6)]
    verdicts = noise.decode_correct(family.eval(), tokenizer, 2, problems, 8)
    assert verdicts.shape == (6,) and verdicts.dtype == bool
    assert verdicts.mean() == member_accuracy(family, tokenizer, 2, problems, 8, Path("eval.jsonl"))
    # a random family answers nothing; the judging itself, on responses as a trained member writes them
    texts = ["Ones: 2+2 = 4.\n#### 4", "Ones: 3+3 = 5.\n#### 5", "6", "#### $1,200."]
    golds = [{"answer": "4"}, {"answer": "6"}, {"answer": "6"}, {"answer": "1200"}]
    assert noise.verdicts(texts, golds).tolist() == [True, False, False, True]


def test_the_figures_are_the_stage_s_and_a_clear_case_is_decided(noise):
    rng = np.random.default_rng(0)
    n = 200
    before = rng.random(n) < 0.2
    dense = before | (rng.random(n) < 0.4)  # DaE answers about 30 more points of the problems
    decomposed = dense.copy()
    decomposed[np.flatnonzero(dense & ~before)[:2]] = False  # the decomposition loses two of them
    correct = {"before_dae": before, "dense": dense, "decomposed": decomposed}
    targets = {"gain": 0.10, "gain_retained": 0.95}
    out = noise.summarise(correct, noise.resample(correct, 1000, 0), targets)
    gain = dense.mean() - before.mean()
    assert out["gain"]["value"] == pytest.approx(gain)
    assert out["gain_retained"]["value"] == pytest.approx((decomposed.mean() - before.mean()) / gain)
    assert out["gain"]["decided"] and out["gain"]["p_below_target"] == 0.0
    lo, hi = out["gain_retained"]["ci95"]
    assert lo <= out["gain_retained"]["value"] <= hi
    assert out["answered_differently"] == {
        "before_dae vs dense": int((before != dense).sum()),
        "dense vs decomposed": 2,
    }


def test_a_gain_on_the_target_is_undecided(noise):
    rng = np.random.default_rng(1)
    n = 200
    before = rng.random(n) < 0.3
    dense = before.copy()
    flip = rng.permutation(n)
    dense[flip[:40]] = True  # some problems gained...
    dense[flip[40:60]] = False  # ... and some lost, a net gain near 10 points
    correct = {"before_dae": before, "dense": dense, "decomposed": dense.copy()}
    out = noise.summarise(correct, noise.resample(correct, 1000, 0), {"gain": 0.10, "gain_retained": 0.95})
    assert abs(out["gain"]["value"] - 0.10) < 0.05
    assert not out["gain"]["decided"] and 0.05 < out["gain"]["p_below_target"] < 0.95


def test_bad_arguments_are_refused_naming_what_is_wrong(noise, tmp_path, capsys):
    for argv, message in (
        (["--params", str(tmp_path / "nope.yaml")], "params file not found"),
        (["--params", "params.vl.yaml"], "model.modality is 'vl'; DaE is text-only"),
        (["--boot", "5"], "at least 100 resamples"),
    ):
        with pytest.raises(SystemExit) as e:
            noise.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
