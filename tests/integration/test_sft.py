"""The sft stage: assistant-only labels, both scopes learn, the DaE scope leaves the other members
bit-identical, resume is exact, bad input is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from training_helpers import copy_workspace, load, make_workspace

from tasks import cpt, expand, family_sft, sft
from tasks.core.artifacts import load_family
from tasks.core.stage import StageError
from tasks.training.batches import build_sft_examples, load_tokenizer


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A micro workspace with cpt (6 steps), family_sft (4 steps) and expand (4 steps) artifacts in it."""
    path = make_workspace(tmp_path_factory.mktemp("sft"))
    cpt.run(load(path, cpt__max_steps=6))
    family_sft.run(load(path, family_sft__max_steps=4, family_sft__stage1_steps=1))
    expand.run(load(path, expand__max_steps=4))
    return path


@pytest.fixture(scope="module")
def tokenizer(workspace):
    return load_tokenizer(workspace.parent / "artifacts" / "tokenizer")


def test_labels_supervise_exactly_the_assistant_answer(tokenizer):
    rows = [
        {
            "id": "a",
            "prompt": "Tom has 3 apples and buys 4 more. How many apples?",
            "response": "3 + 4 = 7\n#### 7",
        },
        {"id": "b", "prompt": "What is 10 minus 4?", "response": "10 - 4 = 6\n#### 6"},
    ]
    ex, stats = build_sft_examples(tokenizer, rows, seq_len=96, where="test")
    assert stats.examples == 2 and stats.truncated == 0
    for k, row in enumerate(rows):
        ids, labels, mask = ex["input_ids"][k], ex["labels"][k], ex["attention_mask"][k]
        supervised = labels[labels != -100]
        assert torch.equal(supervised, ids[labels != -100])  # labels are the tokens themselves
        assert tokenizer.decode(supervised) == row["response"] + "<|im_end|>"
        n = int(mask.sum())
        prompt_part = tokenizer.decode(ids[:n][labels[:n] == -100])
        assert prompt_part == f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n\n"
        assert (ids[n:] == tokenizer.pad_token_id).all() and (labels[n:] == -100).all()


def test_truncation_is_counted_and_examples_without_targets_dropped(tokenizer):
    rows = [
        {"id": "long", "prompt": "word " * 60, "response": "#### 1"},
        {"id": "ok", "prompt": "1 + 1?", "response": "#### 2"},
    ]
    ex, stats = build_sft_examples(tokenizer, rows, seq_len=40, where="f.jsonl")
    assert stats.examples == 1 and stats.dropped_no_target == 1 and stats.truncated == 1
    with pytest.raises(StageError, match="f.jsonl: no SFT example has a supervised token"):
        build_sft_examples(tokenizer, rows[:1], seq_len=40, where="f.jsonl")


@pytest.fixture(scope="module")
def dae_run(workspace):
    params = load(workspace)
    return params, sft.run(params)


def test_sft_dae_scope_tunes_only_the_dae_member(dae_run):
    params, metrics = dae_run
    art = Path(params.paths.artifacts_dir)
    assert metrics["scope"] == "dae" and metrics["trained_members"] == [2]
    assert metrics["exit_2"]["heldout_loss_after"] < metrics["exit_2"]["heldout_loss_before"] - 0.1, metrics
    assert metrics["exit_4"]["heldout_loss_after"] == metrics["exit_4"]["heldout_loss_before"]
    assert metrics["other_members_unchanged"] is True
    before, _ = load_family(art / "expand")
    after, _ = load_family(art / "sft")
    from ruyi_model.dae import dae_trainable_parameters

    trainable = {n for n, _ in dae_trainable_parameters(after, 2)}
    for name, t in before.state_dict().items():
        assert torch.equal(after.state_dict()[name], t) == (name not in trainable), name
    assert (Path(params.paths.plots_dir) / "sft" / "loss.png").is_file()
    assert (
        json.loads((Path(params.paths.metrics_dir) / "sft.json").read_text())["exit_2"] == metrics["exit_2"]
    )


class Killed(Exception):
    pass


def test_sft_resume_is_bitwise_identical(dae_run, workspace, tmp_path):
    params_a, metrics_a = dae_run
    params_b = copy_workspace(workspace, tmp_path, artifacts=("tokenizer", "expand"))

    def kill(done):
        if done == 7:
            raise Killed

    with pytest.raises(Killed):
        sft.run(params_b, callbacks=[kill])
    assert not (tmp_path / "artifacts" / "sft").exists()
    metrics_b = sft.run(params_b)
    assert metrics_b["resumed_from_step"] == 4
    a, _ = load_family(Path(params_a.paths.artifacts_dir) / "sft")
    b, _ = load_family(tmp_path / "artifacts" / "sft")
    for (name, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(ta, tb), name
    assert metrics_b["exit_2"] == metrics_a["exit_2"]


def test_sft_corrupt_latest_checkpoint_is_skipped_for_the_previous_one(dae_run, workspace, tmp_path, caplog):
    params_a, metrics_a = dae_run
    params_b = copy_workspace(workspace, tmp_path, artifacts=("tokenizer", "expand"))

    def kill(done):
        if done == 9:
            raise Killed

    with pytest.raises(Killed):
        sft.run(params_b, callbacks=[kill])
    ckpt = tmp_path / "artifacts" / "checkpoints" / "sft"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_4", "step_8"]
    optimizer = ckpt / "step_8" / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer.write_bytes(bytes(data))
    metrics_b = sft.run(params_b)
    assert metrics_b["resumed_from_step"] == 4
    assert [(s["step"], s["reason"]) for s in metrics_b["skipped_checkpoints"]] == [
        (8, "optimizer.pt does not match its sha256 in checksums.json (corrupt)")
    ]
    assert f"{ckpt / 'step_8'} fails verification: optimizer.pt" in caplog.text
    a, _ = load_family(Path(params_a.paths.artifacts_dir) / "sft")
    b, _ = load_family(tmp_path / "artifacts" / "sft")
    for (name, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(ta, tb), name
    assert metrics_b["exit_2"] == metrics_a["exit_2"]


def test_sft_family_scope_trains_every_member(workspace, tmp_path):
    params = copy_workspace(workspace, tmp_path, artifacts=("tokenizer", "expand"), sft__scope="family")
    metrics = sft.run(params)
    assert metrics["trained_members"] == [2, 4] and metrics["trainable_params"] == metrics["total_params"]
    for d in (2, 4):
        m = metrics[f"exit_{d}"]
        assert m["heldout_loss_after"] < m["heldout_loss_before"] - 0.1, m
    assert "other_members_unchanged" not in metrics


def test_dae_scope_without_dae_blocks_is_an_error(workspace, tmp_path):
    params = copy_workspace(workspace, tmp_path, artifacts=("tokenizer",))
    shutil.copytree(workspace.parent / "artifacts" / "cpt", tmp_path / "artifacts" / "expand")  # not expanded
    with pytest.raises(StageError, match="no DaE blocks on member 2"):
        sft.run(params)


def test_malformed_sft_rows_are_errors_naming_the_file(workspace, tmp_path):
    params = copy_workspace(workspace, tmp_path, artifacts=("tokenizer", "expand"))
    path = tmp_path / "data" / "validated" / "sft.jsonl"
    lines = path.read_text().splitlines()
    row = json.loads(lines[4])
    del row["response"]
    path.write_text("\n".join(lines[:4] + [json.dumps(row)] + lines[5:]) + "\n")
    with pytest.raises(StageError, match=rf"{path}:5: missing field\(s\) \['response'\]"):
        sft.run(params)
    row["response"] = ""
    path.write_text("\n".join(lines[:4] + [json.dumps(row)] + lines[5:]) + "\n")
    with pytest.raises(StageError, match=f"{path}: row 5 .*'response' must be a non-empty string"):
        sft.run(params)
    path.write_text("")
    with pytest.raises(StageError, match=f"{path}: no rows"):
        sft.run(params)
    assert not (tmp_path / "artifacts" / "sft").exists()


def test_missing_expand_checkpoint_is_an_error(workspace, tmp_path):
    params = copy_workspace(workspace, tmp_path)
    assert (
        sft.main(["--params", str(workspace), "--set", f"paths.artifacts_dir={tmp_path / 'artifacts'}"]) == 2
    )
    with pytest.raises(
        StageError, match=f"model checkpoint not found at {tmp_path / 'artifacts' / 'expand'}"
    ):
        sft.run(params)
