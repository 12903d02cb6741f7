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
    # Integer ranks and a few dense norms: close to, not exactly, the requested 40%.
    assert 0.3 < m["added_params_reduction"] < 0.45
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
    from tasks.common import load_family

    root = compressed
    m = _metrics(root)
    texts = [json.loads(line)["text"] for line in (root / "data/validated/corpus_val.jsonl").read_text().splitlines()]
    for stage, when in (("rl", "before"), ("compress", "after")):
        model, tokenizer = load_family(root / "artifacts" / stage)
        blocks = independent_blocks(tokenizer, texts, 64, 2 * 4)
        for d in EXITS:
            assert m[f"exit_{d}"][f"loss_{when}"] == pytest.approx(stock_loss(stock_member(model, d), blocks), rel=1e-5)
    entry = m[f"exit_{DAE_EXIT}"]
    rel = (entry["loss_after"] - entry["loss_before"]) / entry["loss_before"]
    sol_rel = (entry["solution_loss_after"] - entry["solution_loss_before"]) / entry["solution_loss_before"]
    assert entry["loss_relative_change"] == pytest.approx(rel)
    assert entry["relative_loss_change"] == pytest.approx(max(rel, sol_rel))
    assert m["max_relative_loss_change"] == max(m[f"exit_{d}"]["relative_loss_change"] for d in EXITS)
    assert m["within_budget"] == (m["max_relative_loss_change"] <= m["max_relative_loss_increase"])


def test_healing_trains_only_factors_and_member_norm(compressed, tmp_path):
    from tasks.compress import main

    root = compressed
    m = _metrics(root)
    assert m["heal_steps"] == 3 and m["heal_loss_first"] > 0
    # The same stage without healing: only the factors and the member's final norm may differ.
    other = tmp_path / "noheal"
    shutil.copytree(root / "artifacts/rl", other / "rl")
    assert main(["--params", str(root / "params.yaml"), "--set", "compress.heal_steps=0",
                 "--set", f"paths.artifacts_dir={other}", "--set", f"paths.metrics_dir={tmp_path / 'm'}",
                 "--set", f"paths.plots_dir={tmp_path / 'p'}", "--set", f"paths.reports_dir={tmp_path / 'r'}"]) == 0
    healed = load_file(root / "artifacts/compress/model.safetensors")
    unhealed = load_file(other / "compress/model.safetensors")
    differ = {k for k in healed if not torch.equal(healed[k], unhealed[k])}
    noheal = json.loads((tmp_path / "m/compress.json").read_text())
    assert noheal["heal_loss_first"] is None and noheal["heal_kept"] is None
    # Same (deterministic) decomposition in both runs; healing comes after it.
    entry, healed_entry = noheal[f"exit_{DAE_EXIT}"], m[f"exit_{DAE_EXIT}"]
    assert entry["loss_decomposed"] == entry["loss_after"] == healed_entry["loss_decomposed"]
    assert entry["solution_loss_decomposed"] == healed_entry["solution_loss_decomposed"]
    if m["heal_kept"]:
        # kept: only the factors and the member's final norm changed, and the member did not get worse
        assert differ, "healing changed nothing"
        assert all(k.endswith((".weight_a", ".weight_b")) or k == f"{DAE_PREFIX}norm.weight" for k in differ), differ
        assert healed_entry["loss_after"] <= healed_entry["loss_decomposed"]
        assert healed_entry["solution_loss_after"] <= healed_entry["solution_loss_decomposed"]
    else:
        # discarded: exactly the decomposed weights are published
        assert m["heal_kept"] is False and not differ, differ
        assert healed_entry["loss_after"] == healed_entry["loss_decomposed"]


def test_bad_inputs_are_named(compressed, tmp_path, capsys):
    from tasks.common import load_family, save_family
    from tasks.compress import main

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

    # Too little calibration text.
    ws = tmp_path / "ws"
    shutil.copytree(compressed / "data", ws / "data")
    shutil.copytree(compressed / "artifacts/rl", ws / "artifacts/rl")
    (ws / "data/validated/corpus_train.jsonl").write_text('{"id": "x", "text": "tiny", "source": "t"}\n')
    assert main(["--params", str(write_params(ws))]) == 2
    assert str(ws / "data/validated/corpus_train.jsonl") in capsys.readouterr().err
