"""The compress stage on a micro family: decomposition of the DaE member, healing, and what must not change.

Oracles: parameter counts read from the saved checkpoints' tensors; held-out losses recomputed with
each member exported as a stock transformers `Qwen3ForCausalLM`; every tensor outside the DaE member
compared bit for bit between artifacts/rl and artifacts/compress.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_evaluate import (
    DAE_EXIT,
    EXITS,
    build_workspace,
    independent_blocks,
    stock_loss,
    stock_member,
    write_params,
)

DAE_PREFIX = f"exits.{DAE_EXIT}."


@pytest.fixture(scope="module")
def compressed(session_tmp, tmp_path_factory):
    from tasks.compress import main

    root = build_workspace(session_tmp, tmp_path_factory.mktemp("compress") / "ws", compressed=False)
    assert main(["--params", str(root / "params.yaml")]) == 0
    return root


def _metrics(root: Path, name: str = "compress.json") -> dict:
    return json.loads((root / "metrics" / name).read_text())


def _added(state: dict[str, torch.Tensor]) -> int:
    """DaE blocks (exits.1.layers.1 and .2; layer 0 is the branch) + the member's head, from raw tensors."""
    prefixes = (f"{DAE_PREFIX}layers.1.", f"{DAE_PREFIX}layers.2.", f"{DAE_PREFIX}lm_head.")
    return sum(t.numel() for k, t in state.items() if k.startswith(prefixes))


def test_added_parameters_and_ratio(compressed):
    root = compressed
    m = _metrics(root)
    before = load_file(root / "artifacts/rl/model.safetensors")
    after = load_file(root / "artifacts/compress/model.safetensors")
    assert m["added_params_before"] == _added(before)
    assert m["added_params_after"] == _added(after)
    assert m["added_params_reduction"] == pytest.approx(1 - _added(after) / _added(before))
    assert m["ratio"] == 0.4 and m["dae_exit"] == DAE_EXIT and m["allocation"] == "loss_aware"
    # The default ratio is the paper's target on the added parameters (blocks + head, norms included):
    # the decomposed matrices are asked for more so that the dense norms are paid for, and ranks are
    # rounded down, so the reduction is at least the target and overshoots only by rounding.
    assert m["added_params_reduction"] >= 0.4
    assert m["added_params_reduction"] < 0.45
    decomposed_before = sum(
        r["params_before"]
        for r in json.loads((root / "reports/compress/decompose_report.json").read_text())["matrices"]
    )
    assert decomposed_before < m["added_params_before"]  # the norms stay dense ...
    assert m["matrix_ratio"] == pytest.approx(0.4 * m["added_params_before"] / decomposed_before, abs=2e-6)
    assert m["matrix_ratio"] > 0.4  # ... so the matrices give up more than 40%
    assert m["calibration_tokens"] == 2 * 4 * 64
    config = json.loads((root / "artifacts/compress/config.json").read_text())
    assert config["lowrank_ranks"] and all(k.startswith(DAE_PREFIX) for k in config["lowrank_ranks"])
    assert f"{DAE_PREFIX}lm_head" in config["lowrank_ranks"]
    report = json.loads((root / "reports/compress/decompose_report.json").read_text())
    assert len(report["matrices"]) == 2 * 7 + 1
    for name in ("compress.png", "allocation.csv", "heal_loss.csv"):
        assert (root / "plots/compress" / name).stat().st_size > 0


def test_other_members_bit_identical_and_zero_change(compressed):
    root = compressed
    m = _metrics(root)
    before = load_file(root / "artifacts/rl/model.safetensors")
    after = load_file(root / "artifacts/compress/model.safetensors")
    outside = [k for k in before if not k.startswith(DAE_PREFIX)]
    assert outside and all(torch.equal(before[k], after[k]) for k in outside)
    # The DaE member's own branch layer is not touched either.
    branch = [k for k in before if k.startswith(f"{DAE_PREFIX}layers.0.")]
    assert branch and all(torch.equal(before[k], after[k]) for k in branch)
    for d in EXITS:
        entry = m[f"exit_{d}"]
        assert entry["changed"] == (d == DAE_EXIT)
        if d != DAE_EXIT:
            assert entry["relative_loss_change"] == 0.0 and entry["solution_loss_relative_change"] == 0.0
            assert entry["loss_before"] == entry["loss_after"]
    assert m[f"exit_{DAE_EXIT}"]["loss_before"] != m[f"exit_{DAE_EXIT}"]["loss_after"]


def test_losses_match_stock_qwen3_before_and_after(compressed):
    from tasks.core.artifacts import load_family

    root = compressed
    m = _metrics(root)
    texts = [
        json.loads(line)["text"]
        for line in (root / "data/validated/corpus_val.jsonl").read_text().splitlines()
    ]
    for stage, when in (("rl", "before"), ("compress", "after")):
        model, tokenizer = load_family(root / "artifacts" / stage)
        blocks = independent_blocks(tokenizer, texts, 64, 2 * 4)
        for d in EXITS:
            assert m[f"exit_{d}"][f"loss_{when}"] == pytest.approx(
                stock_loss(stock_member(model, d), blocks), rel=1e-5
            )
    entry = m[f"exit_{DAE_EXIT}"]
    rel = (entry["loss_after"] - entry["loss_before"]) / entry["loss_before"]
    sol_rel = (entry["solution_loss_after"] - entry["solution_loss_before"]) / entry["solution_loss_before"]
    assert entry["loss_relative_change"] == pytest.approx(rel)
    assert entry["relative_loss_change"] == pytest.approx(max(rel, sol_rel))
    assert m["max_relative_loss_change"] == max(m[f"exit_{d}"]["relative_loss_change"] for d in EXITS)
    assert m["within_budget"] == (m["max_relative_loss_change"] <= m["max_relative_loss_increase"])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_heal_decision_set_is_the_select_split(compressed):
    """The decision set is the first rows of the validated select files (enough documents for the blocks,
    not more); calibration and healing read the whole training files."""
    root = compressed
    val = root / "data/validated"
    sel = json.loads((root / "reports/compress/heal_selection.json").read_text())
    m = _metrics(root)["heal_selection"]
    assert m["corpus_blocks"] == 2 * 4 and m["sft_rows"] == 10  # loss_batches x batch_size; solution_rows
    select = [r["id"] for r in _rows(val / "select.jsonl")]
    assert sel["select_ids"] == select[:10] and len(select) > 10
    eval_rows = len(_rows(val / "eval.jsonl"))
    assert _metrics(root)["eval_solution_rows"] == min(10, eval_rows)  # the select rows: sft_rows above
    docs = _rows(val / "select_corpus.jsonl")
    k = len(sel["select_corpus_ids"])
    assert 0 < k < len(docs) and sel["select_corpus_ids"] == [r["id"] for r in docs[:k]]
    from tasks.core.artifacts import load_family

    _, tokenizer = load_family(root / "artifacts/rl")
    tokens = [len(tokenizer.encode(r["text"], add_special_tokens=False)) + 1 for r in docs[:k]]
    assert sum(tokens) >= 8 * 64 > sum(tokens[:-1])  # the packed documents: just enough for 8 blocks
    assert sel["healing_sft_rows"] == len(_rows(val / "sft.jsonl"))
    assert sel["calibration_corpus_documents"] == len(_rows(val / "corpus_train.jsonl"))
    training = {
        r["id"] for f in ("corpus_train", "corpus_val", "sft", "eval") for r in _rows(val / f"{f}.jsonl")
    }
    assert not training & {*sel["select_ids"], *sel["select_corpus_ids"]}


def _selection_losses(root: Path, model_dir: Path) -> dict[str, float]:
    """The DaE member's losses on the healing-decision set listed in heal_selection.json, recomputed with
    the member exported as a stock Qwen3 model."""
    from tasks.core.artifacts import load_family

    sel = json.loads((root / "reports/compress/heal_selection.json").read_text())
    corpus = {r["id"]: r["text"] for r in _rows(root / "data/validated/select_corpus.jsonl")}
    sft = {r["id"]: r for r in _rows(root / "data/validated/select.jsonl")}
    model, tokenizer = load_family(model_dir)
    q = stock_member(model, DAE_EXIT)
    blocks = independent_blocks(tokenizer, [corpus[i] for i in sel["select_corpus_ids"]], 64, 2 * 4)
    assert blocks.shape == (8, 64)
    total, count = 0.0, 0
    for i in sel["select_ids"]:
        prompt = f"<|im_start|>user\n{sft[i]['prompt']}<|im_end|>\n<|im_start|>assistant\n"
        p_ids = tokenizer.encode(prompt, add_special_tokens=False)
        a_ids = tokenizer.encode(f"{sft[i]['response']}<|im_end|>", add_special_tokens=False)
        with torch.no_grad():
            loss = q(
                input_ids=torch.tensor([p_ids + a_ids]), labels=torch.tensor([[-100] * len(p_ids) + a_ids])
            ).loss
        total, count = total + float(loss) * len(a_ids), count + len(a_ids)
    return {"loss": stock_loss(q, blocks), "solution_loss": total / count}


def _run_elsewhere(root: Path, out: Path, *extra: str) -> tuple[dict, Path]:
    """The compress stage on a copy of `root`'s inputs with `extra` overrides; (metrics, artifacts dir)."""
    from tasks.compress import main

    shutil.copytree(root / "artifacts/rl", out / "a/rl")
    shutil.copytree(root / "artifacts/family_sft", out / "a/family_sft")
    paths = [f"paths.{k}_dir={out / k}" for k in ("metrics", "plots", "reports")]
    args = ["--params", str(root / "params.yaml"), *extra, "--set", f"paths.artifacts_dir={out / 'a'}"]
    for p in paths:
        args += ["--set", p]
    assert main(args) == 0
    return json.loads((out / "metrics/compress.json").read_text()), out / "a/compress"


def _run_without_healing(root: Path, tmp_path: Path, *extra: str) -> tuple[dict, Path]:
    return _run_elsewhere(root, tmp_path / "noheal", "--set", "compress.heal_steps=0", *extra)


def _check_decision(m: dict) -> bool:
    """The decision recorded in the metrics follows from the recorded selection-set losses."""
    sel = m["heal_selection"]
    worst = max(sel["healed"][k] / sel["decomposed"][k] for k in ("loss", "solution_loss"))
    assert sel["worst_ratio"] == pytest.approx(worst, rel=1e-12)
    assert m["heal_kept"] == (worst <= 1.0)
    return m["heal_kept"]


def test_healing_distils_toward_the_dense_member_and_is_kept_when_it_helps(compressed, tmp_path):
    """Healing is distillation toward the dense DaE member: its KL falls over the steps, it helps on the
    decision set here (kept), and only the factors and the member's final norm differ from the unhealed
    stage; the published member's decision-set losses are the recorded "healed" ones."""
    root = compressed
    m = _metrics(root)
    kl = m["heal_selection"]["calibration_kl"]
    assert m["heal_steps"] == 3 and 0 < kl["healed"] < kl["decomposed"], kl
    assert _check_decision(m) is True
    noheal, unhealed_dir = _run_without_healing(root, tmp_path)
    assert noheal["heal_loss_first"] is None and noheal["heal_kept"] is None
    assert noheal["heal_selection"]["healed"] is None and noheal["heal_selection"]["calibration_kl"] is None
    # Same (deterministic) decomposition in both runs; healing comes after it.
    entry, healed_entry = noheal[f"exit_{DAE_EXIT}"], m[f"exit_{DAE_EXIT}"]
    assert entry["loss_decomposed"] == entry["loss_after"] == healed_entry["loss_decomposed"]
    assert entry["solution_loss_decomposed"] == healed_entry["solution_loss_decomposed"]
    assert noheal["heal_selection"]["decomposed"] == m["heal_selection"]["decomposed"]
    # The decision set's losses are what a stock export of the decomposed / healed member gives.
    before = _selection_losses(root, unhealed_dir)
    after = _selection_losses(root, root / "artifacts/compress")
    for k in ("loss", "solution_loss"):
        assert m["heal_selection"]["decomposed"][k] == pytest.approx(before[k], rel=1e-5)
        assert m["heal_selection"]["healed"][k] == pytest.approx(after[k], rel=1e-5)
        assert m["heal_selection"]["healed"][k] <= m["heal_selection"]["decomposed"][k]
    healed = load_file(root / "artifacts/compress/model.safetensors")
    unhealed = load_file(unhealed_dir / "model.safetensors")
    differ = {k for k in healed if not torch.equal(healed[k], unhealed[k])}
    assert differ, "healing changed nothing"
    assert all(k.endswith((".weight_a", ".weight_b")) or k == f"{DAE_PREFIX}norm.weight" for k in differ), (
        differ
    )
    assert healed_entry["loss_after"] != healed_entry["loss_decomposed"]  # reported: the healed member


def test_healing_discarded_when_it_hurts_the_decision_set(compressed, tmp_path):
    """A learning rate far too large wrecks the factors (the KL rises): the decision set's losses rise, so
    healing is discarded and exactly the decomposed weights are published."""
    root = compressed
    hurt, hurt_dir = _run_elsewhere(root, tmp_path / "hurt", "--set", "compress.heal_lr=0.5")
    kl = hurt["heal_selection"]["calibration_kl"]
    assert kl["healed"] > kl["decomposed"], kl
    assert _check_decision(hurt) is False
    assert hurt["heal_selection"]["worst_ratio"] > 1.0
    _, unhealed_dir = _run_without_healing(root, tmp_path)
    published = load_file(hurt_dir / "model.safetensors")
    unhealed = load_file(unhealed_dir / "model.safetensors")
    assert published.keys() == unhealed.keys()
    assert all(torch.equal(published[k], unhealed[k]) for k in published)
    entry = hurt[f"exit_{DAE_EXIT}"]
    assert entry["loss_after"] == entry["loss_decomposed"]
    assert entry["solution_loss_after"] == entry["solution_loss_decomposed"]


def test_bad_inputs_are_named(compressed, tmp_path, capsys):
    from tasks.compress import main
    from tasks.core.artifacts import load_family, save_family

    # No artifacts/rl.
    empty = tmp_path / "empty"
    assert main(["--params", str(compressed / "params.yaml"), "--set", f"paths.artifacts_dir={empty}"]) == 2
    assert str(empty / "rl") in capsys.readouterr().err

    # A family without DaE blocks.
    model, tokenizer = load_family(compressed / "artifacts/rl")
    from ruyi_model import FamilialConfig, FamilialForCausalLM

    cfg = FamilialConfig(**{**model.config.to_dict(), "dae_blocks": None})
    plain = tmp_path / "plain"
    save_family(FamilialForCausalLM(cfg), tokenizer, plain / "rl")
    assert main(["--params", str(compressed / "params.yaml"), "--set", f"paths.artifacts_dir={plain}"]) == 2
    err = capsys.readouterr().err
    assert str(plain / "rl") in err and "no DaE blocks" in err

    # A ratio past what the decomposable matrices can give (the head dense): named, with its fix, and
    # nothing published.
    over = tmp_path / "over"
    shutil.copytree(compressed / "artifacts/rl", over / "a/rl")
    shutil.copytree(compressed / "artifacts/family_sft", over / "a/family_sft")
    args = ["--params", str(compressed / "params.yaml"), "--set", "compress.ratio=0.99"]
    for k in ("metrics", "plots", "reports"):
        args += ["--set", f"paths.{k}_dir={over / k}"]
    assert main([*args, "--set", f"paths.artifacts_dir={over / 'a'}"]) == 2
    err = capsys.readouterr().err
    assert "compress.ratio=0.99: removing that share of member" in err and "lower compress.ratio" in err, err
    assert "budget search" not in err  # the first ratio tried is compress.ratio itself
    assert not (over / "a/compress").exists() and not (over / "metrics/compress.json").exists()

    # Too little calibration text.
    ws = tmp_path / "ws"
    shutil.copytree(compressed / "data", ws / "data")
    shutil.copytree(compressed / "artifacts/rl", ws / "artifacts/rl")
    (ws / "data/validated/corpus_train.jsonl").write_text('{"id": "x", "text": "tiny", "source": "t"}\n')
    assert main(["--params", str(write_params(ws))]) == 2
    assert str(ws / "data/validated/corpus_train.jsonl") in capsys.readouterr().err

    # Healing-decision files too small: select.jsonl for compress.solution_rows (= 10), select_corpus.jsonl
    # for compress.loss_batches x compress.batch_size (= 8) blocks.
    shutil.copytree(compressed / "data", ws / "data", dirs_exist_ok=True)
    select = ws / "data/validated/select.jsonl"
    select.write_text("".join(select.read_text().splitlines(keepends=True)[:9]))
    assert main(["--params", str(write_params(ws))]) == 2
    err = capsys.readouterr().err
    assert f"{select}: 9 rows; the healing decision needs 10 (compress.solution_rows)" in err
    assert "data.num_select" in err
    shutil.copytree(compressed / "data", ws / "data", dirs_exist_ok=True)
    select_corpus = ws / "data/validated/select_corpus.jsonl"
    select_corpus.write_text("".join(select_corpus.read_text().splitlines(keepends=True)[:2]))
    assert main(["--params", str(write_params(ws))]) == 2
    err = capsys.readouterr().err
    assert f"{select_corpus}: its 2 documents make" in err and "data.select_corpus_chars" in err


def test_gain_retained_formula():
    from tasks.compress import gain_retained

    assert gain_retained(0.2, 0.6, 0.6) == 1.0
    assert gain_retained(0.2, 0.6, 0.2) == 0.0
    assert gain_retained(3.0, 2.0, 2.5) == pytest.approx(0.5)  # losses: a gain is a decrease
    assert gain_retained(0.2, 0.2, 0.3) is None and gain_retained(None, 0.6, 0.5) is None


def test_gain_retained_is_one_lossless_and_zero_with_the_blocks_zeroed(compressed):
    """On the real models: the dense member as its own 'decomposition' keeps all of DaE's gain; zeroing the
    blocks' residual outputs (o_proj, down_proj) gives back exactly the member before DaE: none of it."""
    from tasks.compress import dae_control, heldout_sets, member_state
    from tasks.core.artifacts import load_family
    from tasks.core.params import load_params

    root = compressed
    params = load_params(root / "params.yaml")
    dense, tokenizer = load_family(root / "artifacts/rl")
    before, _ = load_family(root / "artifacts/family_sft")
    held = heldout_sets(params, tokenizer)
    where = root / "data/validated/eval.jsonl"
    states = {
        name: member_state(m.eval(), tokenizer, DAE_EXIT, held, params.compress, where)
        for name, m in (("before_dae", before), ("dense", dense))
    }
    lossless = dae_control({**states, "decomposed": states["dense"]})["gain_retained"]
    assert lossless["loss"] == 1.0 and lossless["solution_loss"] == 1.0
    with torch.no_grad():
        for i in range(1, 1 + dense.config.num_dae_blocks(DAE_EXIT)):
            block = dense.exits[str(DAE_EXIT)].layers[i]
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    # the member's norm and head are the same tensors in both micro models, so this is the member before DaE
    zeroed = member_state(dense, tokenizer, DAE_EXIT, held, params.compress, where)
    none = dae_control({**states, "decomposed": zeroed})["gain_retained"]
    assert none["loss"] == 0.0 and none["solution_loss"] == 0.0
    if states["dense"].accuracy != states["before_dae"].accuracy:
        assert lossless["accuracy"] == 1.0 and none["accuracy"] == 0.0


def test_control_states_and_removed_fractions_are_reported(compressed):
    m = _metrics(compressed)
    control = m["dae_control"]
    assert set(control) >= {"before_dae", "dense", "decomposed", "gain", "gain_retained", "accuracy_problems"}
    for state in ("before_dae", "dense", "decomposed"):
        assert set(control[state]) == {"loss", "solution_loss", "accuracy"}
    assert control["dense"]["loss"] == m[f"exit_{DAE_EXIT}"]["loss_before"]
    assert control["decomposed"]["loss"] == m[f"exit_{DAE_EXIT}"]["loss_after"]
    assert control["before_dae"]["loss"] != control["dense"]["loss"]
    parts_b, parts_a, removed = m["added_parts_before"], m["added_parts_after"], m["removed_fraction"]
    assert (
        sum(parts_b.values()) == m["added_params_before"] and sum(parts_a.values()) == m["added_params_after"]
    )
    assert removed["blocks"] == pytest.approx(1 - parts_a["blocks"] / parts_b["blocks"])
    assert removed["head"] == pytest.approx(1 - parts_a["head"] / parts_b["head"])
    assert removed["blocks_and_head"] == pytest.approx(m["added_params_reduction"])


def test_budget_search_publishes_the_largest_ratio_within_the_budget(compressed, tmp_path):
    """Over the budget on the healing-decision set at `ratio`, the stage retries `ratio_step` lower and
    publishes the first ratio that fits: exactly the weights of a plain run at that ratio. The budget is
    set between two measured increases, so which ratio fits is known before the run."""
    root = compressed
    sweep = [
        "--set",
        "compress.ratio=0.5",
        "--set",
        "compress.ratio_step=0.1",
        "--set",
        "compress.min_ratio=0.3",
    ]
    none_fit, smallest_dir = _run_elsewhere(
        root, tmp_path / "none", *sweep, "--set", "compress.max_relative_loss_increase=0"
    )
    search = none_fit["budget_search"]
    tried = [t["ratio"] for t in search["tried"]]
    increases = [t["relative_increase"] for t in search["tried"]]
    assert tried == [0.5, 0.4, 0.3], tried
    assert all(t["fits"] is (t["relative_increase"] <= 0) for t in search["tried"])
    assert increases[0] > increases[1] > 0, f"the test needs 0.5 to cost more than 0.4 here: {increases}"
    # none fits: the smallest ratio tried is published, and the gates judge it
    assert search["fits"] is False and search["ratio_used"] == none_fit["ratio_used"] == 0.3
    assert none_fit["ratio"] == 0.5 and none_fit["added_params_reduction"] >= 0.3
    # each increase is the larger relative change of the two decision-set losses over the dense member
    dense = search["selection_dense"]
    for t in search["tried"]:
        sel = t["selection"]
        expected = max((sel[k] - dense[k]) / dense[k] for k in ("loss", "solution_loss"))
        assert t["relative_increase"] == pytest.approx(expected, rel=1e-12)

    budget = (increases[0] + increases[1]) / 2
    fit, fit_dir = _run_elsewhere(
        root, tmp_path / "fit", *sweep, "--set", f"compress.max_relative_loss_increase={budget}"
    )
    assert [t["ratio"] for t in fit["budget_search"]["tried"]] == [0.5, 0.4]
    assert fit["budget_search"]["fits"] is True and fit["ratio_used"] == 0.4
    assert 0.4 <= fit["added_params_reduction"] < 0.45

    plain, plain_dir = _run_elsewhere(
        root, tmp_path / "plain", "--set", "compress.ratio=0.4", "--set", "compress.fit_budget=false"
    )
    assert [t["ratio"] for t in plain["budget_search"]["tried"]] == [0.4] and plain["ratio_used"] == 0.4
    published, reference = (
        load_file(fit_dir / "model.safetensors"),
        load_file(plain_dir / "model.safetensors"),
    )
    assert published.keys() == reference.keys()
    assert all(torch.equal(published[k], reference[k]) for k in published)
    smallest = load_file(smallest_dir / "model.safetensors")  # the control: another ratio, other weights
    assert any(k not in smallest or not torch.equal(smallest[k], published[k]) for k in published)


def test_budget_ratios_and_their_parameters():
    from tasks.compress import budget_ratios
    from tasks.core.params import CompressParams

    assert budget_ratios(CompressParams(ratio=0.31, ratio_step=0.02, min_ratio=0.25)) == [
        0.31,
        0.29,
        0.27,
        0.25,
    ]
    assert budget_ratios(CompressParams(ratio=0.4, ratio_step=0.1, min_ratio=0.1)) == [0.4, 0.3, 0.2, 0.1]
    assert budget_ratios(CompressParams(ratio=0.3, min_ratio=0.3)) == [0.3]
    assert budget_ratios(CompressParams(ratio=0.3, fit_budget=False, min_ratio=0.5)) == [0.3]
    with pytest.raises(
        ValueError, match=r"compress.min_ratio \(0.5\) must not exceed compress.ratio \(0.3\)"
    ):
        CompressParams(ratio=0.3, min_ratio=0.5)
