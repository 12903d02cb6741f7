"""The expand (DaE) stage: only the DaE member learns, the other members stay bit-identical, resume
is exact, bad input is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from training_helpers import copy_workspace, load, make_workspace

from tasks import cpt, expand, family_sft
from tasks.core.artifacts import load_family
from tasks.core.stage import StageError


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A micro workspace with a trained cpt family (6 steps), tuned by family_sft (4 steps)."""
    path = make_workspace(tmp_path_factory.mktemp("expand"))
    cpt.run(load(path, cpt__max_steps=6))
    family_sft.run(load(path, family_sft__max_steps=4, family_sft__stage1_steps=1))
    return path


@pytest.fixture(scope="module")
def expanded(workspace):
    params = load(workspace)
    return params, expand.run(params)


def test_expand_trains_only_the_dae_member(expanded):
    params, metrics = expanded
    art = Path(params.paths.artifacts_dir)
    base, _ = load_family(art / "family_sft")
    model, _ = load_family(art / "expand")
    d = metrics["dae_exit"]
    assert d == 2 and model.config.dae_blocks == [2, 0] and metrics["other_members"] == [4]
    entry = metrics[f"exit_{d}"]
    assert entry["stem_val_loss_after"] < entry["stem_val_loss_before"] - 0.05, entry
    assert metrics["other_members_unchanged"] is True
    assert metrics["replay_share_drawn"] == pytest.approx(0.25)

    from ruyi_model.dae import dae_trainable_parameters

    trainable = {n for n, _ in dae_trainable_parameters(model, d)}
    assert metrics["trainable_params"] == sum(
        p.numel() for n, p in model.named_parameters() if n in trainable
    )
    assert metrics["added_params"] == sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in base.parameters()
    )
    # Every tensor outside the DaE trainable set is bit-identical to family_sft's, and the trainable ones
    # moved.
    new_sd, old_sd = model.state_dict(), base.state_dict()
    for name, tensor in old_sd.items():
        if name in trainable:
            assert not torch.equal(new_sd[name], tensor), f"{name} did not train"
        else:
            assert torch.equal(new_sd[name], tensor), name
    # ... so the other member computes exactly the same logits, and the DaE member does not.
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids, exit_layer=4).logits, base(ids, exit_layer=4).logits)
        assert not torch.equal(model(ids, exit_layer=2).logits, base(ids, exit_layer=2).logits)
    rows = (Path(params.paths.plots_dir) / "expand" / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,exit,split,loss" and all(r.split(",")[1] == "2" for r in rows[1:])


class Killed(Exception):
    pass


def test_expand_resume_is_bitwise_identical(expanded, workspace, tmp_path):
    params_a, metrics_a = expanded
    params_b = copy_workspace(workspace, tmp_path, artifacts=("tokenizer", "family_sft"))

    def kill(done):
        if done == 6:
            raise Killed

    with pytest.raises(Killed):
        expand.run(params_b, callbacks=[kill])
    assert not (tmp_path / "artifacts" / "expand").exists()
    metrics_b = expand.run(params_b)
    assert metrics_b["resumed_from_step"] == 4
    a, _ = load_family(Path(params_a.paths.artifacts_dir) / "expand")
    b, _ = load_family(tmp_path / "artifacts" / "expand")
    for (name, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(ta, tb), name
    assert metrics_b["exit_2"] == metrics_a["exit_2"]


def test_missing_family_sft_checkpoint_is_an_error_naming_it(workspace, tmp_path):
    params = copy_workspace(workspace, tmp_path)
    with pytest.raises(
        StageError, match=f"model checkpoint not found at {tmp_path / 'artifacts' / 'family_sft'}"
    ):
        expand.run(params)


def test_corpus_without_math_documents_is_an_error(workspace, tmp_path):
    params = copy_workspace(workspace, tmp_path, artifacts=("tokenizer", "family_sft"))
    path = tmp_path / "data" / "validated" / "corpus_train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["source"] != "math"))
    with pytest.raises(StageError, match=f"{path}: no documents with source == 'math'"):
        expand.run(params)
    assert not (tmp_path / "artifacts" / "expand").exists()


def test_dae_exit_must_be_a_member(workspace, tmp_path):
    from tasks.core.params import ParamsError

    with pytest.raises(ParamsError, match="expand.exit_layer 3 is not one of"):
        load(workspace, expand__exit_layer=3)
    # Valid params (smallest member 1), but the family on disk has members [2, 4]: named as such.
    params = copy_workspace(
        workspace, tmp_path, artifacts=("tokenizer", "family_sft"), model__exit_layers=[1, 4]
    )
    with pytest.raises(StageError, match=r"expand.exit_layer=1 is not a member of the family at .*\[2, 4\]"):
        expand.run(params)
