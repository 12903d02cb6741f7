"""The family_sft stage: Stage I chats come from general text only, Stage I then Stage II batches,
every member learns under the joint loss, bad parameters are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from training_helpers import load, make_workspace

from tasks import cpt, family_sft
from tasks.core.artifacts import load_family
from tasks.core.params import ParamsError
from tasks.core.stage import StageError
from tasks.training import family


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    path = make_workspace(tmp_path_factory.mktemp("family_sft"))
    cpt.run(load(path, cpt__max_steps=6))
    return path


def test_stage1_rows_use_general_text_only_and_both_instructions():
    docs = [
        {"id": "m1", "source": "math", "text": "Tom has 3 apples. " * 20},
        {"id": "g1", "source": "docs", "text": "alpha beta gamma delta " * 20},
        {"id": "g2", "source": "docs", "text": "one two three four five " * 20},
        {"id": "g3", "source": "docs", "text": "short"},
    ]
    rows = family_sft.stage1_rows(docs, limit=10)
    assert [r["id"] for r in rows] == ["stage1-g1", "stage1-g2"]  # no math; g3 has no continuation
    cont, rep = rows
    assert cont["prompt"].startswith(family_sft.CONTINUE) and rep["prompt"].startswith(family_sft.REPEAT)
    head = cont["prompt"][len(family_sft.CONTINUE) :]
    full = " ".join(docs[1]["text"].split())
    assert full.startswith(head) and full[len(head) :].strip().startswith(cont["response"])
    assert rep["prompt"] == family_sft.REPEAT + rep["response"]
    assert len(family_sft.stage1_rows(docs, limit=1)) == 1


def test_staged_stream_switches_from_stage1_to_stage2():
    from tasks.training.batches import BlockStream, MixedStream

    g = {"input_ids": torch.zeros(5, 4, dtype=torch.long)}
    m = {"input_ids": torch.ones(7, 4, dtype=torch.long)}
    stream = family_sft.StagedStream(
        BlockStream(g, 1, "g"), MixedStream(BlockStream(m, 1, "m"), None, 0.0), 6
    )
    assert stream.batch(0, 3)["input_ids"].sum() == 0 and stream.batch(3, 3)["input_ids"].sum() == 0
    assert (stream.batch(6, 3)["input_ids"] == 1).all()
    with pytest.raises(StageError, match="straddles"):
        stream.batch(5, 3)


def test_family_sft_trains_every_member(workspace):
    params = load(workspace)
    metrics = family_sft.run(params)
    art = Path(params.paths.artifacts_dir)
    before, _ = load_family(art / "cpt")
    after, _ = load_family(art / "family_sft")
    old = before.state_dict()
    moved = [n for n, t in after.state_dict().items() if not torch.equal(t, old[n])]
    assert metrics["trainable_params"] == sum(p.numel() for p in after.parameters())
    # every member's own parameters (branch layers, norms, heads) and the shared ones train
    for d in (2, 4):
        assert metrics[f"exit_{d}"]["heldout_loss_after"] < metrics[f"exit_{d}"]["heldout_loss_before"] - 0.1
    assert any("embed" in n for n in moved) and len(moved) > len(old) // 2
    assert metrics["stage1_steps"] == 3 and metrics["stage2_steps"] == 5 and metrics["steps"] == 8
    assert metrics["stage1_examples"]["examples"] > 0
    saved = json.loads((Path(params.paths.metrics_dir) / "family_sft.json").read_text())
    assert saved["exit_4"] == metrics["exit_4"]
    assert (Path(params.paths.plots_dir) / "family_sft" / "loss.csv").is_file()


def test_text_replay_feeds_plain_corpus_blocks_into_stage_two(workspace, monkeypatch):
    """With text_replay_fraction, that share of the Stage II rows are packed corpus_train blocks whose
    every token is a label (the pre-training stream), the rest the math chats and chat replay."""
    seen = []
    original = family.train_family

    def spy(**kwargs):
        stream = kwargs["stream"]
        switch = stream.switch
        for position in range(switch, switch + 40, 8):
            seen.append(stream.batch(position, 8))
        return original(**kwargs)

    monkeypatch.setattr(family, "train_family", spy)
    params = load(workspace, family_sft__text_replay_fraction=0.25, family_sft__replay_fraction=0.0)
    metrics = family_sft.run(params)
    assert metrics["text_replay_fraction"] == 0.25
    assert metrics["text_replay_seq_len"] == params.family_sft.seq_len  # null: blocks of seq_len
    rows = [(b["labels"][i], b["input_ids"][i]) for b in seen for i in range(b["input_ids"].shape[0])]
    text_rows = [(lab, ids) for lab, ids in rows if bool((lab != -100).all())]
    assert len(text_rows) == 10 and len(rows) == 40  # exactly a quarter of 40 rows
    assert all(torch.equal(lab, ids) for lab, ids in text_rows)
    with pytest.raises(ParamsError, match="text_replay_fraction"):
        load(workspace, family_sft__text_replay_fraction=1.0)


def test_short_text_replay_blocks_are_padded_and_never_widen_a_batch(workspace, monkeypatch):
    """text_replay_seq_len packs the replayed text in shorter blocks: each replay row holds exactly that
    many attended, labelled tokens and then padding, so a batch is as wide as its longest chat."""
    seen = []
    original = family.train_family

    def spy(**kwargs):
        stream = kwargs["stream"]
        for position in range(stream.switch, stream.switch + 40, 8):
            untrimmed = stream.stage2.rows_at(range(position - stream.switch, position - stream.switch + 8))
            seen.append((untrimmed, stream.batch(position, 8)))
        return original(**kwargs)

    monkeypatch.setattr(family, "train_family", spy)
    params = load(
        workspace,
        family_sft__text_replay_fraction=0.25,
        family_sft__replay_fraction=0.0,
        family_sft__text_replay_seq_len=12,
    )
    metrics = family_sft.run(params)
    assert (metrics["text_replay_fraction"], metrics["text_replay_seq_len"]) == (0.25, 12)
    text_rows = 0
    for untrimmed, batch in seen:
        mask, labels = untrimmed["attention_mask"], untrimmed["labels"]
        is_text = [bool((labels[i, :12] != -100).all()) and int(mask[i].sum()) == 12 for i in range(8)]
        text_rows += sum(is_text)
        chats = [int(mask[i].sum()) for i in range(8) if not is_text[i]]
        assert batch["input_ids"].shape[1] == max(chats)  # the text rows (12 tokens) never set the width
        for i in (i for i in range(8) if is_text[i]):
            assert torch.equal(labels[i, :12], untrimmed["input_ids"][i, :12])
            assert bool((labels[i, 12:] == -100).all()) and int(mask[i, 12:].sum()) == 0
    assert text_rows == 10  # a quarter of 40 rows, as with full-width blocks
    with pytest.raises(ParamsError, match=r"text_replay_seq_len \(99\) must be <= seq_len"):
        load(workspace, family_sft__text_replay_seq_len=99, family_sft__seq_len=64)


def test_stage1_steps_must_leave_stage2_steps(workspace):
    with pytest.raises(ParamsError, match=r"stage1_steps \(8\) must be < max_steps \(8\)"):
        load(workspace, family_sft__stage1_steps=8)


def test_the_tiny_profile_keeps_the_dae_member_cheaper_than_the_next_member():
    from tasks.core.params import load_params

    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    exits = list(params.model.exit_layers)
    d = params.dae_exit
    deeper = [e for e in exits if e > d]
    assert deeper and d + params.expand.num_blocks < min(deeper), (exits, d, params.expand.num_blocks)
    assert params.data.math_levels == [1] and params.family_sft.stage1_steps < params.family_sft.max_steps
