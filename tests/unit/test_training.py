"""Unit tests of the shared training library (tasks/training/): packing, streams, schedules,
checkpoint fingerprints and the train loop on a micro family (real model, real optimizer)."""

from __future__ import annotations

import math

import pytest
import torch
from training_helpers import sft_like_rows

from tasks.core.params import CPTParams, ExitWeightSchedule, ParamsError, TrainParams
from tasks.core.stage import StageError
from tasks.training.batches import (
    BlockStream,
    MixedStream,
    pack_documents,
    padded_blocks,
    sft_holdout_split,
    trim_batch,
)
from tasks.training.checkpoint import Checkpointer, fingerprint_info
from tasks.training.curves import write_loss_curves
from tasks.training.loop import (
    _targets,
    build_optimizer,
    exit_weights_at,
    lr_factor,
    lr_scale_of,
    multi_exit_loss_fn,
    param_groups,
    train_loop,
)


def test_pack_documents_joins_with_eos_and_drops_the_partial_block():
    blocks = pack_documents([[1, 2, 3], [4], [5, 6, 7, 8, 9]], eos_id=0, seq_len=4)
    # stream: 1 2 3 0 | 4 0 5 6 | 7 8 9 0  -> 3 full blocks, nothing left over
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 0, 5, 6], [7, 8, 9, 0]]
    blocks = pack_documents([[1, 2, 3], [4, 5]], eos_id=0, seq_len=4)
    assert blocks.tolist() == [[1, 2, 3, 0]]  # "4 5 0" is dropped
    assert pack_documents([[1]], eos_id=0, seq_len=4).shape == (0, 4)


def test_lr_schedule_warmup_then_cosine_to_the_floor():
    f = lambda s: lr_factor(s, warmup_steps=4, max_steps=20, min_lr_ratio=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(12) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert f(20) == pytest.approx(0.1)
    values = [f(s) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_lr_scales_give_prefixed_parameters_their_own_groups_on_the_same_schedule():
    torch.manual_seed(0)
    net = torch.nn.ModuleDict(
        {
            "text": torch.nn.Linear(3, 3),
            "visual": torch.nn.ModuleDict({"blocks": torch.nn.Linear(3, 3), "merger": torch.nn.Linear(3, 3)}),
        }
    )
    named = list(net.named_parameters())
    cfg = TrainParams(seq_len=8, batch_size=2, max_steps=10, lr=1e-2, warmup_steps=2, weight_decay=0.1)
    scales = {"visual.": 0.1, "visual.merger.": 0.5}
    assert lr_scale_of("visual.merger.weight", scales) == 0.5  # the longest prefix wins
    assert lr_scale_of("visual.blocks.bias", scales) == 0.1 and lr_scale_of("text.weight", scales) == 1.0
    opt, sched = build_optimizer(named, cfg, scales)
    by_id = {id(p): n for n, p in named}
    groups = {
        (g["weight_decay"], g["initial_lr"]): sorted(by_id[id(p)] for p in g["params"])
        for g in opt.param_groups
    }
    assert groups == {
        (0.1, 1e-2): ["text.weight"],
        (0.1, 5e-3): ["visual.merger.weight"],
        (0.1, 1e-3): ["visual.blocks.weight"],
        (0.0, 1e-2): ["text.bias"],
        (0.0, 5e-3): ["visual.merger.bias"],
        (0.0, 1e-3): ["visual.blocks.bias"],
    }
    for _ in range(4):
        opt.step()
        sched.step()
    factor = lr_factor(4, 2, 10, cfg.min_lr_ratio)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [g["initial_lr"] * factor for g in opt.param_groups]
    )

    # without scales: the two weight-decay groups of before, at cfg.lr
    plain, _ = build_optimizer(named, cfg)
    assert [(g["weight_decay"], g["initial_lr"], len(g["params"])) for g in plain.param_groups] == [
        (0.1, 1e-2, 3),
        (0.0, 1e-2, 3),
    ]

    # a scaled parameter moves less: one step from the same gradient, Adam's first step is lr-sized
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    before = {n: p.detach().clone() for n, p in named}
    opt, _ = build_optimizer(named, cfg, {"visual.": 0.1})
    opt.step()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in named}
    assert moved["visual.blocks.bias"] == pytest.approx(0.1 * moved["text.bias"], rel=1e-4)

    # the groups alone (the VL rl stage's AdamW: its own lr, no weight decay); frozen parameters left out
    net["text"].bias.requires_grad_(False)
    groups = param_groups(named, 1e-4, 0.0, {"visual.": 0.03})
    assert [(g["weight_decay"], g["lr"], sorted(by_id[id(p)] for p in g["params"])) for g in groups] == [
        (0.0, pytest.approx(1e-4), ["text.weight"]),
        (0.0, pytest.approx(3e-6), ["visual.blocks.weight", "visual.merger.weight"]),
        (0.0, pytest.approx(3e-6), ["visual.blocks.bias", "visual.merger.bias"]),
    ]


@pytest.mark.parametrize(
    ("scales", "message"),
    [({"visual.": 0.0}, "must be > 0"), ({"vision.": 0.1}, "none starts with \\['vision.'\\]")],
)
def test_lr_scales_reject_a_zero_multiplier_and_a_prefix_that_names_nothing(scales, message):
    net = torch.nn.ModuleDict({"text": torch.nn.Linear(2, 2), "visual": torch.nn.Linear(2, 2)})
    cfg = TrainParams(seq_len=8, batch_size=2, max_steps=4, lr=1e-2, warmup_steps=1)
    with pytest.raises(StageError, match=message):
        build_optimizer(list(net.named_parameters()), cfg, scales)


@pytest.mark.parametrize("kind,mid", [("constant", 1.0), ("linear", 0.6), ("cosine", 0.6)])
def test_exit_weight_schedule_values(kind, mid):
    sched = ExitWeightSchedule(kind=kind, start=1.0, floor=0.2, deepest=2.0)
    exits = [2, 4, 8]
    first = exit_weights_at(sched, exits, 0, 11)
    middle = exit_weights_at(sched, exits, 5, 11)
    last = exit_weights_at(sched, exits, 10, 11)
    assert first == [1.0, 1.0, 2.0]
    assert middle == pytest.approx([mid, mid, 2.0])
    assert last == pytest.approx([1.0 if kind == "constant" else 0.2] * 2 + [2.0])
    if kind == "cosine":  # cosine stays above linear in the first half
        assert exit_weights_at(sched, exits, 2, 11)[0] > 1.0 - 0.8 * 0.2


def test_exit_weight_schedule_rejects_a_rising_floor_and_long_warmup():
    with pytest.raises(ParamsError, match="floor"):
        _validate({"cpt": {"exit_weights": {"kind": "linear", "start": 0.5, "floor": 0.9}}})
    with pytest.raises(ParamsError, match="warmup_steps"):
        _validate({"sft": {"warmup_steps": 50, "max_steps": 50}})


def _validate(raw):
    import tempfile
    from pathlib import Path

    import yaml

    from tasks.core.params import load_params

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.yaml"
        path.write_text(yaml.safe_dump(raw))
        return load_params(path)


def test_block_stream_is_a_pure_function_of_the_position_and_covers_each_epoch():
    rows = torch.arange(10).view(10, 1)
    a = BlockStream({"input_ids": rows}, seed=1, name="x")
    b = BlockStream({"input_ids": rows}, seed=1, name="x")
    epoch0 = torch.cat([a.batch(p, 2)["input_ids"] for p in range(0, 10, 2)]).flatten().tolist()
    assert sorted(epoch0) == list(range(10))  # a permutation
    epoch1 = a.batch(10, 10)["input_ids"].flatten().tolist()
    assert sorted(epoch1) == list(range(10)) and epoch1 != epoch0  # reshuffled
    # Random access equals sequential access (what makes resume exact without iterator state).
    assert b.batch(13, 4)["input_ids"].tolist() == a.batch(13, 4)["input_ids"].tolist()
    other = BlockStream({"input_ids": rows}, seed=2, name="x")
    assert other.batch(0, 10)["input_ids"].flatten().tolist() != epoch0


def test_mixed_stream_has_the_exact_replay_share():
    main = BlockStream({"input_ids": torch.zeros(7, 2, dtype=torch.long)}, 0, "main")
    replay = BlockStream({"input_ids": torch.ones(5, 2, dtype=torch.long)}, 0, "replay")
    mixed = MixedStream(main, replay, 0.1)
    rows = torch.cat([mixed.batch(p, 8)["input_ids"][:, 0] for p in range(0, 800, 8)])
    assert int(rows.sum()) == 80  # exactly 10% of 800 samples
    assert sum(mixed.replay_count(p, 8) for p in range(0, 800, 8)) == 80
    only_main = MixedStream(main, None, 0.0)
    assert int(only_main.batch(0, 50)["input_ids"].sum()) == 0
    with pytest.raises(ValueError):
        MixedStream(main, None, 0.1)
    # three-way (family_sft's text replay): 20% text (2) outside, 10% of the rest chats (1)
    text = BlockStream({"input_ids": torch.full((3, 2), 2, dtype=torch.long)}, 0, "text")
    three = MixedStream(mixed, text, 0.2)
    rows = torch.cat([three.batch(p, 8)["input_ids"][:, 0] for p in range(0, 1000, 8)])
    assert [int((rows == v).sum()) for v in (0, 1, 2)] == [720, 80, 200]
    # and the two-way stream's rows are those it gave before it could nest (the same order)
    assert torch.equal(mixed.rows_at(range(16))["input_ids"], mixed.batch(0, 16)["input_ids"])


def test_trim_batch_cuts_common_right_padding():
    batch = {
        "input_ids": torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]),
    }
    out = trim_batch(batch)
    assert out["input_ids"].tolist() == [[5, 6], [7, 0]]


def test_padded_blocks_pad_like_sft_rows_and_full_width_blocks_are_unchanged():
    blocks = torch.tensor([[5, 6, 7], [8, 9, 10]])
    rows = padded_blocks(blocks, seq_len=5, pad_id=0)
    assert rows["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 0, 0]]
    assert rows["attention_mask"].tolist() == [[1, 1, 1, 0, 0]] * 2
    assert rows["labels"].tolist() == [[5, 6, 7, -100, -100], [8, 9, 10, -100, -100]]
    assert trim_batch(rows)["input_ids"].shape == (2, 3)
    full = padded_blocks(blocks, seq_len=3, pad_id=0)  # the width of the rows: the blocks as they are
    assert torch.equal(full["input_ids"], blocks) and torch.equal(full["labels"], blocks)
    assert bool((full["attention_mask"] == 1).all())
    with pytest.raises(ValueError, match="do not fit"):
        padded_blocks(blocks, seq_len=2, pad_id=0)


def test_sft_holdout_split_is_stable_and_disjoint():
    rows = [{"id": f"r{i}"} for i in range(200)]
    train, held = sft_holdout_split(rows, 0.1)
    assert 5 <= len(held) <= 40 and len(train) + len(held) == 200
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    _, held_rev = sft_holdout_split(list(reversed(rows)), 0.1)
    assert {r["id"] for r in held_rev} == {r["id"] for r in held}  # order-independent
    _, tiny = sft_holdout_split(rows[:3], 0.01)
    assert len(tiny) == 1


# --- the loop and checkpoints on a micro family -------------------------------------------------------
def _micro_family(seed=0):
    from ruyi_model import FamilialConfig, FamilialForCausalLM

    torch.manual_seed(seed)
    cfg = FamilialConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=32,
        exit_layers=[1, 3],
        tie_word_embeddings=False,
        loss_impl="chunked",
    )
    return FamilialForCausalLM(cfg)


def _loop(tmp_path, max_steps=8, callbacks=(), ckpt=True, lr=1e-2, **info_extra):
    model = _micro_family()
    cfg = TrainParams(
        seq_len=8,
        batch_size=2,
        max_steps=max_steps,
        lr=lr,
        warmup_steps=1,
        checkpoint_every=3,
        eval_every=4,
        eval_batches=1,
    )
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 64, (20, 8), generator=g)
    stream = BlockStream({"input_ids": blocks}, 0, "t")
    info = fingerprint_info("cpt", cfg, seed=0, inputs={"data": "x", **info_extra})
    ckpt_obj = Checkpointer(tmp_path / "ckpt", info) if ckpt else None
    weights = lambda step: exit_weights_at(CPTParams().exit_weights, [1, 3], step, max_steps)  # noqa: E731
    result = train_loop(
        stage="t",
        model=model,
        cfg=cfg,
        named_params=list(model.named_parameters()),
        stream=stream,
        loss_fn=multi_exit_loss_fn(weights),
        val_batches=[{"input_ids": blocks[:2]}],
        checkpointer=ckpt_obj,
        callbacks=callbacks,
    )
    return model, result, ckpt_obj


class Kill(Exception):
    pass


def _kill_at(step):
    def cb(done):
        if done == step:
            raise Kill(done)

    return cb


def test_train_loop_resume_is_bitwise_identical(tmp_path):
    straight, res_straight, _ = _loop(tmp_path / "a", ckpt=False)
    with pytest.raises(Kill):
        _loop(tmp_path / "b", callbacks=[_kill_at(5)])
    assert sorted(p.name for p in (tmp_path / "b" / "ckpt").iterdir()) == ["step_3"]
    torch.manual_seed(999)  # the RNG state is restored from the checkpoint, whatever it is now
    resumed, res_resumed, _ = _loop(tmp_path / "b")
    assert res_resumed.resumed_from_step == 3
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert res_resumed.history == res_straight.history  # the curves survive the resume too
    assert sorted(p.name for p in (tmp_path / "b" / "ckpt").iterdir()) == ["step_6", "step_8"]  # keep 2


def test_stale_checkpoint_is_set_aside_naming_the_difference(tmp_path):
    _loop(tmp_path, max_steps=3)
    _, result, ckpt = _loop(tmp_path, max_steps=3, lr=5e-3)
    assert result.resumed_from_step is None
    assert any("params.lr: 0.01 -> 0.005" in d for d in result.stale_checkpoint["differences"])
    assert (tmp_path / "ckpt.stale" / "step_3").is_dir()
    # Same configuration again: resumes from the finished run (nothing left to train).
    _, again, _ = _loop(tmp_path, max_steps=3, lr=5e-3)
    assert again.resumed_from_step == 3 and again.stale_checkpoint is None


def test_an_intact_checkpoint_of_the_other_backend_is_stale_not_corrupt(tmp_path, caplog):
    """Switching `training.backend` leaves the other layout's checkpoints behind: they verify against
    their own manifest, so they are set aside as stale (naming the difference), never as corrupt."""
    from tasks.training.megatron_backend import CHECKPOINT_FILES as MEGATRON_FILES

    _loop(tmp_path, max_steps=3)  # an hf-layout checkpoint at step_3
    cfg = TrainParams(seq_len=8, batch_size=2, max_steps=3, lr=1e-2, warmup_steps=1, checkpoint_every=3)
    info = fingerprint_info("cpt", cfg, seed=0, inputs={"data": "x"}, extra={"backend": "megatron"})
    ckpt = Checkpointer(tmp_path / "ckpt", info, required=MEGATRON_FILES)
    assert ckpt.find_resumable() is None
    assert ckpt.skipped == [] and "fails verification" not in caplog.text
    assert ckpt.stale is not None and any("backend" in d for d in ckpt.stale["differences"])
    assert (tmp_path / "ckpt.stale" / "step_3" / "model.safetensors").is_file()
    assert not (tmp_path / "ckpt.corrupt").exists()


def flip_byte(path, offset=None):
    """Flips every bit of one byte of `path` (default: the middle one) in place."""
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _assert_same_weights(a, b):
    for (name, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(ta, tb), name


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "rng.pt"])
def test_corrupt_latest_checkpoint_is_skipped_for_the_previous_one(tmp_path, caplog, name):
    caplog.set_level("INFO", logger="ruyi")
    straight, res_straight, _ = _loop(tmp_path / "a", ckpt=False)
    with pytest.raises(Kill):
        _loop(tmp_path / "b", callbacks=[_kill_at(7)])
    ckpt = tmp_path / "b" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_3", "step_6"]
    flip_byte(ckpt / "step_6" / name)
    resumed, res_resumed, _ = _loop(tmp_path / "b")
    assert res_resumed.resumed_from_step == 3
    [skipped] = res_resumed.skipped_checkpoints
    assert skipped["path"] == str(ckpt / "step_6") and skipped["reason"].startswith(f"{name} does not match")
    assert f"{ckpt / 'step_6'} fails verification: {name} does not match its sha256" in caplog.text
    assert (tmp_path / "b" / "ckpt.corrupt" / "step_6" / name).is_file()  # kept aside, not resumed
    assert "cpt: resumed from step_3" in caplog.text
    _assert_same_weights(straight, resumed)  # = the uninterrupted run, as a resume from step 3 is
    assert res_resumed.history == res_straight.history
    assert res_resumed.summary()["skipped_checkpoints"] == [skipped]


def test_all_checkpoints_corrupt_start_from_scratch(tmp_path, caplog):
    straight, res_straight, _ = _loop(tmp_path / "a", ckpt=False)
    with pytest.raises(Kill):
        _loop(tmp_path / "b", callbacks=[_kill_at(7)])
    ckpt = tmp_path / "b" / "ckpt"
    flip_byte(ckpt / "step_6" / "model.safetensors")
    flip_byte(ckpt / "step_3" / "rng.pt", offset=-1)
    resumed, result, _ = _loop(tmp_path / "b")
    assert result.resumed_from_step is None
    assert [(s["step"], s["reason"].split()[0]) for s in result.skipped_checkpoints] == [
        (6, "model.safetensors"),
        (3, "rng.pt"),
    ]
    assert "no checkpoint in" in caplog.text and "training starts from scratch" in caplog.text
    _assert_same_weights(straight, resumed)
    assert result.history == res_straight.history
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_6", "step_8"]


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("manifest missing", "checksums.json is missing"),
        ("manifest truncated", "checksums.json is unreadable"),
        ("manifest without a file", "checksums.json does not list optimizer.pt"),
        ("file missing", "optimizer.pt is missing"),
        ("file truncated", "model.safetensors has"),
    ],
)
def test_checkpoint_without_a_valid_manifest_or_file_is_skipped(tmp_path, caplog, damage, reason):
    import json

    _loop(tmp_path, max_steps=6)
    step = tmp_path / "ckpt" / "step_6"
    manifest = step / "checksums.json"
    if damage == "manifest missing":
        manifest.unlink()
    elif damage == "manifest truncated":
        manifest.write_bytes(manifest.read_bytes()[:40])
    elif damage == "manifest without a file":
        entries = json.loads(manifest.read_text())
        del entries["files"]["optimizer.pt"]
        manifest.write_text(json.dumps(entries))
    elif damage == "file missing":
        (step / "optimizer.pt").unlink()
    else:
        model_file = step / "model.safetensors"
        model_file.write_bytes(model_file.read_bytes()[:-10])
    _, result, _ = _loop(tmp_path, max_steps=6)
    assert result.resumed_from_step == 3
    assert result.skipped_checkpoints[0]["reason"].startswith(reason)
    assert f"{step} fails verification: {reason}" in caplog.text


def test_checkpoints_record_checksums_of_every_file_and_keep_at_least_two(tmp_path):
    import json

    from tasks.core.files import sha256_file

    _loop(tmp_path, max_steps=3)
    step = tmp_path / "ckpt" / "step_3"
    files = json.loads((step / "checksums.json").read_text())["files"]
    assert sorted(files) == [
        "model.safetensors",
        "optimizer.pt",
        "rng.pt",
        "scheduler.pt",
        "trainer_state.json",
    ]
    for name, entry in files.items():
        assert entry == {"sha256": sha256_file(step / name), "bytes": (step / name).stat().st_size}
    with pytest.raises(ValueError, match="keep at least 2"):
        Checkpointer(tmp_path / "x", {}, keep=1)


def test_a_pruning_cut_short_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """A kill while the oldest checkpoint is deleted (here: the deletion stops after one file) leaves
    only complete step directories; the next run removes the leftover and resumes from the newest."""
    from types import SimpleNamespace

    from tasks.training import checkpoint
    from tasks.training.checkpoint import verify_checkpoint

    def cut_short(path, ignore_errors=False):
        min(path.iterdir()).unlink()  # checksums.json first, as a real deletion may
        raise Kill(path)

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "shutil", SimpleNamespace(rmtree=cut_short))
        with pytest.raises(Kill):
            _loop(tmp_path, max_steps=8)  # saves step 3, 6, 8; pruning step_3 is cut short
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_6", "step_8"]
    assert all(verify_checkpoint(p) is None for p in ckpt.glob("step_*"))
    [leftover] = ckpt.glob(".step_3.tmp-*")
    _, result, _ = _loop(tmp_path, max_steps=8)
    assert result.resumed_from_step == 8 and result.skipped_checkpoints == []
    assert not leftover.exists()


def test_non_finite_loss_stops_with_an_error(tmp_path):
    with pytest.raises(StageError, match="loss is"):
        _loop(tmp_path, max_steps=3, lr=1e30, ckpt=False)


def _accum_run(tensors, batch_size, grad_accum, steps=2, bf16=False, lr=1e-2):
    """`train_loop` without checkpoints; returns (model, result). grad_clip/weight decay off, so the
    gradient left in `.grad` after the run is exactly the last step's accumulated gradient."""
    model = _micro_family()
    cfg = TrainParams(
        seq_len=12,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_steps=steps,
        lr=lr,
        warmup_steps=0,
        weight_decay=0.0,
        grad_clip=0.0,
        bf16=bf16,
        eval_every=1000,
        eval_batches=1,
    )
    stream = BlockStream(tensors, 0, "accum")
    weights = lambda step: [0.5, 1.0]  # noqa: E731
    result = train_loop(
        stage="t",
        model=model,
        cfg=cfg,
        named_params=list(model.named_parameters()),
        stream=stream,
        loss_fn=multi_exit_loss_fn(weights),
        val_batches=[trim_batch({k: v[:4] for k, v in tensors.items()})],
    )
    return model, result, stream


@pytest.mark.parametrize("data", ["packed", "sft"])
def test_grad_accumulation_equals_one_full_batch(data):
    """grad_accum=2 over micro-batches of 2 rows = grad_accum=1 over the same 4 rows: the same gradient
    (the token mean over the effective batch), the same weights after two steps, the same losses."""
    if data == "packed":
        tensors = {"input_ids": torch.randint(0, 64, (12, 12), generator=torch.Generator().manual_seed(3))}
    else:
        tensors = sft_like_rows()
    full, res_full, stream = _accum_run(tensors, batch_size=4, grad_accum=1)
    accum, res_accum, _ = _accum_run(tensors, batch_size=2, grad_accum=2)
    if data == "sft":  # the case a plain mean of micro-batch means gets wrong: unequal supervised tokens
        for step in range(2):
            halves = [_targets(stream.batch(4 * step + 2 * h, 2)) for h in range(2)]
            assert halves[0] != halves[1], halves
    assert res_full.samples == res_accum.samples == 8 and res_full.tokens == res_accum.tokens
    for (name, a), (_, b) in zip(full.named_parameters(), accum.named_parameters()):
        assert a.grad is not None and b.grad is not None, name
        torch.testing.assert_close(
            b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"grad {n}: {m}"
        )
        # Adam divides by sqrt(v): elements with a near-zero gradient amplify fp32 rounding, so the weights
        # agree to a small fraction of one lr step (1e-2) rather than to rounding.
        torch.testing.assert_close(b, a, rtol=0, atol=5e-5, msg=lambda m, n=name: f"weight {n}: {m}")
    train = lambda res: [(r["step"], r["exit"], r["loss"]) for r in res.history if r["split"] == "train"]  # noqa: E731
    assert [x[:2] for x in train(res_accum)] == [x[:2] for x in train(res_full)]
    assert [x[2] for x in train(res_accum)] == pytest.approx([x[2] for x in train(res_full)], rel=1e-5)


def test_bf16_autocast_trains_with_fp32_weights():
    """bf16=True: the matmuls run in bf16 (seen by a hook), losses stay finite and fall, and the weights,
    gradients and optimizer state stay fp32."""
    tensors = {"input_ids": torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(4))}
    model = _micro_family()
    seen: set[torch.dtype] = set()
    proj = model.model.layers[0].self_attn.q_proj
    proj.register_forward_hook(lambda module, args, out: seen.add(out.dtype) if module.training else None)
    cfg = TrainParams(
        seq_len=12,
        batch_size=4,
        max_steps=12,
        lr=1e-2,
        warmup_steps=1,
        bf16=True,
        eval_every=6,
        eval_batches=1,
    )
    result = train_loop(
        stage="t",
        model=model,
        cfg=cfg,
        named_params=list(model.named_parameters()),
        stream=BlockStream(tensors, 0, "bf16"),
        loss_fn=multi_exit_loss_fn(lambda step: [0.5, 1.0]),
        val_batches=[{"input_ids": tensors["input_ids"][:4]}],
    )
    assert seen == {torch.bfloat16}
    for d in (1, 3):
        train = [r["loss"] for r in result.history if r["split"] == "train" and r["exit"] == d]
        val = [r["loss"] for r in result.history if r["split"] == "val" and r["exit"] == d]
        assert len(train) == 12 and all(math.isfinite(v) for v in train + val)
        assert sum(train[-3:]) / 3 < sum(train[:3]) / 3 - 0.1, train
        assert val[-1] < val[0], val
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {torch.float32}
    out = model(tensors["input_ids"][:2], use_cache=False)
    assert out.logits.dtype == torch.float32  # outside autocast the model is plain fp32


def test_loss_curves_csv_and_png(tmp_path):
    history = [
        {"step": s, "exit": d, "split": sp, "loss": 5.0 - 0.1 * s}
        for s in range(5)
        for d in (2, 4)
        for sp in ("train", "val")
    ]
    png, csv_path = write_loss_curves(history, tmp_path, "t")
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "step,exit,split,loss" and len(lines) == 21
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert math.isclose(float(lines[1].split(",")[3]), 5.0)


def test_loss_figure_smooths_long_train_curves_and_keeps_validation_points():
    from tasks.training.curves import TRAIN_POINTS, loss_figure, running_mean

    n = 10 * TRAIN_POINTS
    swing = [(1.5 if s % 3 else 0.4) * (2 - s / n) for s in range(n)]  # two kinds of batch, falling
    rows = [
        {"step": s, "exit": d, "split": "train", "loss": swing[s] * d / 2} for s in range(n) for d in (2, 4)
    ]
    rows += [{"step": s, "exit": 2, "split": "val", "loss": 1.0 - s / (2 * n)} for s in range(0, n, 100)]
    rows += [{"step": s, "exit": 8, "split": "train", "loss": 1.0} for s in range(5)]  # short: raw
    fig = loss_figure(rows, "t")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) >= {
        "exit 2 train (mean of 10)",
        "exit 4 train (mean of 10)",
        "exit 2 val",
        "exit 8 train",
    }
    mean = lines["exit 4 train (mean of 10)"].get_ydata()
    assert list(mean) == running_mean([v * 2 for v in swing], 10)  # exit 4's raw values are 2x swing
    assert list(lines["exit 2 val"].get_xdata()) == list(range(0, n, 100))
    assert list(lines["exit 8 train"].get_ydata()) == [1.0] * 5


def test_stage_modules_import_no_heavy_library():
    """`python -m tasks.cpt --help` must answer instantly: torch/transformers are imported lazily."""
    import subprocess
    import sys

    code = (
        "import sys, tasks.cpt, tasks.expand, tasks.sft, tasks.training; "
        "print([m for m in ('torch', 'transformers', 'ruyi_model', 'prefect', 'dvc', 'ray') "
        "if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
