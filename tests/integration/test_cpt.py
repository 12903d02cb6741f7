"""The cpt stage on a micro workspace: it learns, resumes bitwise, and refuses bad input clearly."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from training_helpers import copy_workspace, load, make_workspace, save_qwen_like_tokenizer

from tasks import cpt
from tasks.core.artifacts import load_family
from tasks.core.stage import StageError
from tasks.training.batches import fixed_batches, load_tokenizer, pack_corpus, read_corpus
from tasks.training.loop import exit_weights_at, multi_exit_loss_fn


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("cpt"))


@pytest.fixture(scope="module")
def straight_run(workspace):
    """One uninterrupted cpt run (12 steps, checkpoints every 4)."""
    params = load(workspace)
    return params, cpt.run(params)


def test_cpt_learns_and_writes_its_outputs(straight_run):
    params, metrics = straight_run
    for d in (2, 4):
        m = metrics[f"exit_{d}"]
        assert m["val_loss"] < m["val_loss_initial"] - 0.05, m
        assert m["val_loss"] < metrics["ln_vocab"]
    assert metrics["steps"] == 12 and metrics["resumed_from_step"] is None
    assert metrics["tokens"] == 12 * 4 * 32 and metrics["tokens_per_s"] > 0
    assert metrics["exit_weights_final"] == pytest.approx([0.3, 1.0])
    on_disk = json.loads((Path(params.paths.metrics_dir) / "cpt.json").read_text())
    assert on_disk["exit_2"] == metrics["exit_2"]
    model, tokenizer = load_family(f"{params.paths.artifacts_dir}/cpt")
    assert model.config.exit_layers == [2, 4]
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    with open(f"{params.paths.plots_dir}/cpt/loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["exit"], r["split"]) for r in rows} == {
        ("2", "train"),
        ("4", "train"),
        ("2", "val"),
        ("4", "val"),
    }
    assert sum(r["split"] == "train" for r in rows) == 24
    assert Path(params.paths.plots_dir, "cpt", "loss.png").read_bytes()[:4] == b"\x89PNG"
    steps = sorted(p.name for p in Path(params.paths.artifacts_dir, "checkpoints", "cpt").iterdir())
    assert steps == ["step_12", "step_8"]


class Killed(Exception):
    pass


def test_killed_and_resumed_run_equals_the_uninterrupted_one(straight_run, workspace, tmp_path):
    params_a, _ = straight_run
    # A second workspace with the same input files, other output paths.
    other = tmp_path / "b"
    params_b = copy_workspace(workspace, other)

    def kill(done):
        if done == 6:
            raise Killed

    with pytest.raises(Killed):
        cpt.run(params_b, callbacks=[kill])
    assert not (other / "artifacts" / "cpt").exists()  # no half-written output
    assert not (other / "metrics" / "cpt.json").exists()
    assert sorted(p.name for p in (other / "artifacts" / "checkpoints" / "cpt").iterdir()) == ["step_4"]

    metrics = cpt.run(params_b)
    assert metrics["resumed_from_step"] == 4
    a, _ = load_family(f"{params_a.paths.artifacts_dir}/cpt")
    b, _ = load_family(other / "artifacts" / "cpt")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    straight = json.loads((Path(params_a.paths.metrics_dir) / "cpt.json").read_text())
    assert metrics["exit_4"] == straight["exit_4"]


def test_corrupt_latest_checkpoint_is_skipped_and_the_resume_stays_exact(
    straight_run, workspace, tmp_path, caplog
):
    """One flipped byte in the latest checkpoint's weights after a kill: the checksum catches it, the run
    resumes from the previous checkpoint (the file named) and ends as the uninterrupted run."""
    params_a, straight = straight_run
    other = tmp_path / "b"
    params_b = copy_workspace(workspace, other)

    def kill(done):
        if done == 10:
            raise Killed

    with pytest.raises(Killed):
        cpt.run(params_b, callbacks=[kill])
    ckpt = other / "artifacts" / "checkpoints" / "cpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_4", "step_8"]
    weights = ckpt / "step_8" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor: without the checksum it would load silently
    weights.write_bytes(bytes(data))
    caplog.set_level("INFO", logger="ruyi")
    metrics = cpt.run(params_b)
    assert metrics["resumed_from_step"] == 4 and "cpt: resumed from step_4" in caplog.text
    assert metrics["skipped_checkpoints"] == [
        {
            "path": str(ckpt / "step_8"),
            "step": 8,
            "set_aside_to": str(ckpt.with_name("cpt.corrupt") / "step_8"),
            "reason": "model.safetensors does not match its sha256 in checksums.json (corrupt)",
        }
    ]
    assert f"{ckpt / 'step_8'} fails verification: model.safetensors" in caplog.text
    a, _ = load_family(f"{params_a.paths.artifacts_dir}/cpt")
    b, _ = load_family(other / "artifacts" / "cpt")
    for (name, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(ta, tb), name
    assert metrics["exit_4"] == straight["exit_4"]


def test_empty_corpus_is_an_error_naming_the_file(workspace, tmp_path):
    params = copy_workspace(workspace, tmp_path)
    path = tmp_path / "data" / "validated" / "corpus_train.jsonl"
    path.write_text("")
    with pytest.raises(StageError, match=f"{path}: no rows"):
        cpt.run(params)


def test_malformed_corpus_row_is_an_error_naming_file_and_line(workspace, tmp_path):
    params = copy_workspace(workspace, tmp_path)
    path = tmp_path / "data" / "validated" / "corpus_val.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = '{"id": "x", "text": "unterminated'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(StageError, match=f"{path}:3: not valid JSON"):
        cpt.run(params)
    lines[2] = json.dumps({"id": "x", "text": "", "source": "docs"})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(StageError, match=f"{path}: row 3 .*'text' must be a non-empty string"):
        cpt.run(params)


def test_missing_tokenizer_is_an_error_naming_the_directory(workspace, tmp_path):
    params = copy_workspace(workspace, tmp_path)
    shutil.rmtree(tmp_path / "artifacts" / "tokenizer")
    with pytest.raises(StageError, match=f"tokenizer .*{tmp_path / 'artifacts' / 'tokenizer'}"):
        cpt.run(params)
    assert not (tmp_path / "artifacts" / "cpt").exists()


def test_cli_help_and_bad_params(workspace, capsys):
    with pytest.raises(SystemExit) as e:
        cpt.main(["--help"])
    assert e.value.code == 0
    assert "python -m tasks.cpt" in capsys.readouterr().out
    assert cpt.main(["--params", str(workspace), "--set", "cpt.seq_len=1000"]) == 2
    assert "cpt.seq_len=1000 exceeds" in capsys.readouterr().err


def test_exit_loss_weights_reach_the_model(straight_run):
    """The schedule is what the model receives: the multi-exit loss equals sum_k w_k CE_k."""
    params, _ = straight_run
    model, _ = load_family(f"{params.paths.artifacts_dir}/cpt")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))

    weights = exit_weights_at(params.cpt.exit_weights, [2, 4], 5, 12)
    out = multi_exit_loss_fn(lambda step: weights)(model, {"input_ids": ids}, 5)
    per_exit = {d: model(ids, labels=ids, exit_layer=d, use_cache=False).loss.item() for d in (2, 4)}
    expected = weights[0] * per_exit[2] + weights[1] * per_exit[4]
    assert math.isclose(out[0].item(), expected, rel_tol=1e-5)


def _stock_qwen3(path: Path, texts: list[str]):
    """A tiny stock Qwen3ForCausalLM saved at `path` with its own Qwen-style tokenizer (ids of its own)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    stock = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=448,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=128,
            tie_word_embeddings=True,
        )
    ).eval()
    stock.save_pretrained(path)
    save_qwen_like_tokenizer(path, texts, vocab_size=380)
    return stock


def test_init_from_a_stock_qwen3_checkpoint(workspace, tmp_path):
    """model.init_from: the tokenizer stage adopts the checkpoint's tokenizer, and the family starts as the
    stock model (its deepest member equals it exactly, on the checkpoint's own token ids)."""
    from transformers import AutoTokenizer

    from tasks import tokenizer as tokenizer_stage
    from tasks.core.artifacts import tokenizer_fingerprint

    src = tmp_path / "qwen3"
    params = copy_workspace(
        workspace, tmp_path, artifacts=(), cpt__max_steps=2, cpt__warmup_steps=1, model__init_from=str(src)
    )
    train = read_corpus(tmp_path / "data" / "validated" / "corpus_train.jsonl")
    stock = _stock_qwen3(src, [r["text"] for r in train])
    tok_metrics = tokenizer_stage.run(params)
    assert tok_metrics["source"]["init_from"] == str(src)
    tokenizer = load_tokenizer(tmp_path / "artifacts" / "tokenizer")
    source = AutoTokenizer.from_pretrained(src)
    assert all(tokenizer.convert_tokens_to_ids(t) == i for t, i in source.get_vocab().items())
    metrics = cpt.run(params)
    # The stock model's loss on the same validation batches is the family's deepest member's initial loss.
    val = read_corpus(tmp_path / "data" / "validated" / "corpus_val.jsonl")
    blocks = pack_corpus(tokenizer, [r["text"] for r in val], 32, "val")
    assert int(blocks.max()) < len(source)  # packed with the checkpoint's own ids (eos included)
    batches = fixed_batches({"input_ids": blocks}, 4, 2)
    with torch.no_grad():
        losses = [stock(b["input_ids"], labels=b["input_ids"]).loss.item() for b in batches]
    assert metrics["exit_4"]["val_loss_initial"] == pytest.approx(sum(losses) / len(losses), abs=1e-4)
    model, loaded = load_family(tmp_path / "artifacts" / "cpt")
    assert model.config.exit_layers == [2, 4] and model.config.vocab_size == 448
    assert model.config.pad_token_id == loaded.pad_token_id == len(source)
    assert model.config.tokenizer_fingerprint == tokenizer_fingerprint(loaded) == tok_metrics["fingerprint"]


def test_init_from_refuses_a_tokenizer_that_is_not_the_checkpoints(workspace, tmp_path):
    """A BPE trained here (the workspace's) with a stock checkpoint would scramble its embeddings: refused."""
    src = tmp_path / "qwen3"
    _stock_qwen3(
        src, [r["text"] for r in json_rows(workspace.parent / "data" / "validated" / "corpus_train.jsonl")]
    )
    params = copy_workspace(
        workspace, tmp_path / "w", cpt__max_steps=2, cpt__warmup_steps=1, model__init_from=str(src)
    )
    tok_dir = tmp_path / "w" / "artifacts" / "tokenizer"
    with pytest.raises(
        StageError,
        match=rf"{tok_dir} is not the tokenizer of model.init_from={src} "
        rf"\(fingerprint [0-9a-f]{{64}}, expected [0-9a-f]{{64}}",
    ):
        cpt.run(params)
    assert not (tmp_path / "w" / "artifacts" / "cpt").exists()
    # A checkpoint without tokenizer files: an error naming it (not an empty tokenizer).
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).unlink()
    with pytest.raises(StageError, match=f"model.init_from={src}: cannot load the checkpoint's tokenizer"):
        cpt.run(params)
    with pytest.raises(StageError, match="model.init_from"):
        cpt.run(copy_workspace(workspace, tmp_path / "x", model__init_from=str(tmp_path / "missing")))


def json_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_model_dir_with_a_swapped_same_size_tokenizer_is_refused(straight_run, tmp_path, caplog):
    from ruyi_model.tokenizer import train_tokenizer
    from tasks.core.artifacts import save_family, tokenizer_fingerprint

    params, _ = straight_run
    good = Path(params.paths.artifacts_dir) / "cpt"
    model, tokenizer = load_family(good)
    recorded = json.loads((good / "config.json").read_text())["tokenizer_fingerprint"]
    assert recorded == tokenizer_fingerprint(tokenizer)
    # Another BPE of exactly the same size (trained on other text): the size check alone would pass.
    texts = [r["text"] for r in json_rows(Path(params.paths.data_dir) / "validated" / "corpus_train.jsonl")]
    other = train_tokenizer(list(reversed(texts)) + ["qqq zzz xxx www"] * 50, vocab_size=len(tokenizer))
    assert len(other) == len(tokenizer) and other.get_vocab() != tokenizer.get_vocab()
    swapped = tmp_path / "swapped"
    shutil.copytree(good, swapped)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (swapped / name).unlink(missing_ok=True)
    other.save_pretrained(swapped)
    with pytest.raises(
        StageError,
        match=rf"{swapped}: the tokenizer is not the one the model was trained with .*"
        rf"records tokenizer fingerprint {recorded}, the tokenizer files there have "
        rf"fingerprint {tokenizer_fingerprint(other)}",
    ):
        load_family(swapped)
    # save_family pairing the model with another tokenizer says so, and records the new fingerprint.
    with caplog.at_level("WARNING", logger="ruyi"):
        save_family(model, other, tmp_path / "resaved")
    assert f"trained with tokenizer fingerprint {recorded} and is saved with a tokenizer of" in caplog.text
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())[
        "tokenizer_fingerprint"
    ] == tokenizer_fingerprint(other)
    caplog.clear()
    # An old artifact without a recorded fingerprint still loads, with a warning.
    old = tmp_path / "old"
    shutil.copytree(good, old)
    config = json.loads((old / "config.json").read_text())
    del config["tokenizer_fingerprint"]
    (old / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="ruyi"):
        model_old, _ = load_family(old)
    assert "records no tokenizer fingerprint" in caplog.text and str(old) in caplog.text
    assert getattr(model_old.config, "tokenizer_fingerprint", None) is None
