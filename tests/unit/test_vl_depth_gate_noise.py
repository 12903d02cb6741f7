"""benchmarks/experiments/vl_depth_gate_noise.py: per-item answer losses add up to the evaluate stage's
figure on a real VL family (and equal the per-item losses the stage now writes for the gates), the ratio
is the gate's own (`gates_frame`), and the bootstrap interval narrows with the items as it should."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.scripts import load_script

EXITS = [1, 2, 4]


@pytest.fixture(scope="module")
def noise():
    return load_script("benchmarks/experiments/vl_depth_gate_noise.py")


@pytest.fixture(scope="module")
def vl_family():
    """A real familial VL model (members 1, 2, 4 of a tiny stock Qwen3-VL), its processor and six eval
    rows as the evaluate stage reads them."""
    from ruyi_model import FamilialVLForConditionalGeneration
    from tasks.data.vlgen import generate_vqa
    from tests.tiny_vl import tiny_qwen3_vl, tiny_vl_processor

    src = tiny_qwen3_vl(seed=0)
    model = FamilialVLForConditionalGeneration.from_qwen3_vl(src, EXITS).eval()
    processor = tiny_vl_processor(src.config)
    processor.tokenizer.padding_side = "left"
    items = generate_vqa(6, seed=0, split="heldout", tasks=["scene_count", "scene_position"], size=32)
    rows = [
        {
            "id": i,
            "question": it.question,
            "answer": it.answer,
            "image": "data:image/png;base64," + base64.b64encode(it.png_bytes()).decode(),
        }
        for i, it in enumerate(items)
    ]
    return model, processor, rows


def test_item_losses_add_up_to_the_batched_figure_of_a_real_family(noise, vl_family):
    import torch

    from tasks.training.vl_pipeline import encode_sft, vl_multi_exit_eval

    model, processor, rows = vl_family
    with torch.no_grad():
        sums, tokens = noise.item_losses(
            lambda b: vl_multi_exit_eval(model, encode_sft(processor, b)), rows, EXITS
        )
        batched = vl_multi_exit_eval(model, encode_sft(processor, rows))  # what the evaluate stage sums
    assert sums.shape == (6, 3) and tokens.sum() == batched[EXITS[0]][1]
    for k, d in enumerate(EXITS):
        assert sums[:, k].sum() / tokens.sum() == pytest.approx(batched[d][0] / batched[d][1], rel=1e-5)
    with pytest.raises(ValueError, match=r"eval item 0 \(0\): no loss for exits \[4\]"):
        noise.item_losses(lambda b: {1: (1.0, 2), 2: (1.0, 2)}, rows[:1], EXITS)


def test_the_stages_per_item_losses_are_each_items_own_and_add_up_to_its_figure(noise, vl_family):
    # the VL evaluate stage reports each member's answer loss from one multi-exit pass and writes the
    # per-item losses the gates resample from one pass per member (`vl_member_row_losses`): the same
    # figure up to float rounding, and item by item the loss this script computes alone
    import torch

    from tasks.training.vl_pipeline import encode_sft, vl_member_row_losses, vl_multi_exit_eval

    model, processor, rows = vl_family
    batch = encode_sft(processor, rows)
    per_row = vl_member_row_losses(model, batch, EXITS)
    with torch.no_grad():
        batched = vl_multi_exit_eval(model, batch)
        sums, tokens = noise.item_losses(
            lambda b: vl_multi_exit_eval(model, encode_sft(processor, b)), rows, EXITS
        )
    for k, d in enumerate(EXITS):
        assert [n for _, n in per_row[d]] == tokens.tolist() and sum(tokens) == batched[d][1]
        assert [s for s, _ in per_row[d]] == pytest.approx(sums[:, k].tolist(), rel=1e-4)
        total = sum(s for s, _ in per_row[d])
        assert total / batched[d][1] == pytest.approx(batched[d][0] / batched[d][1], rel=1e-5)


def test_the_ratio_is_the_gates_own_loss_over_the_best_shallower_member(noise):
    tokens = np.array([2.0, 3.0, 5.0])
    means = {1: 0.20, 2: 0.30, 4: 0.25}  # exit 4 against exit 1, the best shallower member, not exit 2
    sums = np.column_stack([means[d] * tokens for d in EXITS])
    ratios = noise.gate_ratios(sums, tokens, EXITS)
    assert ratios == pytest.approx({2: 0.30 / 0.20, 4: 0.25 / 0.20})


def test_the_interval_decides_far_from_the_bar_and_narrows_with_the_items(noise):
    rng = np.random.default_rng(1)
    n = 160
    tokens = rng.integers(2, 5, n).astype(float)
    base = rng.gamma(2.0, 0.1, n) * tokens
    # exit 2 about 0.5x exit 1 (far below the bar); exit 4 about 1.05x exit 2 (on it), noisy per item
    sums = np.column_stack(
        [base, 0.5 * base * rng.lognormal(0, 0.3, n), 0.525 * base * rng.lognormal(0, 0.3, n)]
    )
    point = noise.gate_ratios(sums, tokens, EXITS)
    draws = noise.bootstrap(sums, tokens, EXITS, boots=400, seed=0)
    rows = {r["exit"]: r for r in noise.summarise(point, draws, tolerance=0.05, items=n)}
    assert rows[2]["passes"] and rows[2]["decided"] and rows[2]["p_over_bar"] == 0.0
    lo, hi = rows[4]["ci95"]
    assert lo < point[4] < hi and not rows[4]["decided"] and rows[4]["items_to_decide"] > n
    # four copies of the items: the interval's half-width halves (1/sqrt(items)), within resampling noise
    four = noise.bootstrap(np.tile(sums, (4, 1)), np.tile(tokens, 4), EXITS, boots=400, seed=0)
    wide = np.subtract(*np.quantile(draws[4], [0.975, 0.025]))
    narrow = np.subtract(*np.quantile(four[4], [0.975, 0.025]))
    assert narrow / wide == pytest.approx(0.5, abs=0.12)


def test_an_item_set_without_spread_gives_the_point_itself(noise):
    tokens = np.full(20, 3.0)
    sums = np.column_stack([np.full(20, 0.9), np.full(20, 0.6), np.full(20, 0.66)])
    draws = noise.bootstrap(sums, tokens, EXITS, boots=100, seed=0)
    (row2, row4) = noise.summarise(noise.gate_ratios(sums, tokens, EXITS), draws, 0.05, 20)
    assert row4["ci95"] == pytest.approx([1.1, 1.1]) and not row4["passes"] and row4["decided"]
    assert row4["items_to_decide"] == 0 and row2["p_over_bar"] == 0.0


def test_bad_arguments_are_refused_naming_what_is_wrong(noise, tmp_path, capsys):
    for argv, message in (
        (["--params", str(tmp_path / "nope.yaml")], "params file not found"),
        (["--params", "params.yaml"], "model.modality is 'text', not 'vl'"),
        (["--params", "params.vl.yaml", "--family", str(tmp_path)], f"no VL family at {tmp_path}"),
        (["--boot", "5"], "at least 100 resamples"),
    ):
        with pytest.raises(SystemExit) as e:
            noise.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
