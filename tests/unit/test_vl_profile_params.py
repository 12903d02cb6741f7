"""The vision-language profile: params.vl.yaml and its schema, the flow's profiles, the stage dispatch,
SFT labels on answers only, and the per-exit / per-task-type accuracy table."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tasks.core.params import ParamsError, load_params
from tasks.core.stage import StageError
from tasks.training.vl_pipeline import encode_sft, format_table, graded_table, is_correct

REPO = Path(__file__).resolve().parents[2]
VL = REPO / "params.vl.yaml"


def test_the_vl_profile_validates_and_the_text_profile_stays_text():
    p = load_params(VL)
    assert p.model.modality == "vl" and p.model.exit_layers == [1, 2, 4]
    assert p.paths.data_dir == "data/vl" and p.paths.artifacts_dir == "artifacts/vl"
    assert p.paths.metrics_dir == "metrics/vl" and p.export.gguf_dtypes == []
    assert set(p.vl.rl_tasks) <= set(p.vl.tasks)
    assert load_params(REPO / "params.yaml").model.modality == "text"


@pytest.mark.parametrize(
    "override, key",
    [
        ({"vl.tasks": ["scene_count", "jigsaw"]}, "vl.tasks"),
        ({"vl.rl_tasks": ["geometry"]}, "vl.rl_tasks"),
        ({"vl.image_size": 40}, "vl.image_size"),
        ({"vl.vision.mrope_section": [2, 2, 2]}, "mrope_section"),
        ({"vl.vision.deepstack_visual_indexes": [0, 5]}, "deepstack_visual_indexes"),
        ({"model.modality": "audio"}, "model.modality"),
        ({"vl.vision_lr_scale": 0.0}, "vl.vision_lr_scale"),
    ],
)
def test_bad_vl_parameters_are_errors_naming_the_key(override, key):
    with pytest.raises(ParamsError) as info:
        load_params(VL, override)
    assert "params.vl.yaml" in str(info.value) and key in str(info.value)


def test_flow_profiles_name_their_pipeline_and_params_files():
    from flows.pipeline import profile_files, stage_target

    assert profile_files("text") == ("dvc.yaml", "params.yaml")
    assert profile_files("vl") == ("profiles/vl/dvc.yaml", "params.vl.yaml")
    assert stage_target("cpt") == "cpt"
    assert stage_target("cpt", "profiles/vl/dvc.yaml") == "profiles/vl/dvc.yaml:cpt"
    with pytest.raises(ValueError, match="profiles: text, vl"):
        profile_files("audio")


def test_vl_evaluate_reads_the_checkpoint_it_is_given(tmp_path):
    """evaluate.checkpoint is a directory, used as given (it once kept only its last name and read
    <artifacts_dir>/<name> instead)."""
    from tasks.training.vl_pipeline import evaluate

    (tmp_path / "rl").mkdir()  # the default's name, elsewhere: not a family
    params = load_params(VL, {"evaluate.checkpoint": str(tmp_path / "rl")})
    with pytest.raises(StageError, match=f"no VL family at {tmp_path / 'rl'}: evaluate.checkpoint names"):
        evaluate(params)


def test_a_stage_without_a_vl_body_is_a_clear_user_error(capsys):
    from tasks import expand

    assert expand.main(["--params", str(VL)]) == 2
    assert "stage expand has no vision-language version" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, match",
    [
        ({"rl.algorithm": "bppo"}, "rl.algorithm: the VL profile runs grpo"),
        ({"rl.beta": 0.04}, "rl.beta and rl.num_iterations"),
        ({"rl.select_prompts": 50}, "rl.select_prompts: the VL profile keeps its last step"),
        ({"rl.rollout_engine": "static"}, "rl.rollout_engine: the VL profile samples with its own loop"),
    ],
)
def test_vl_rl_refuses_text_only_settings_before_loading_anything(override, match):
    from tasks.training.vl_pipeline import rl

    with pytest.raises(StageError, match=match):
        rl(load_params(VL, override))


def test_answers_are_compared_exactly_after_normalisation():
    assert is_correct(" Red.", "red") and is_correct("3", "3") and is_correct("3.0", "3")
    assert not is_correct("4", "3") and not is_correct("top left", "top right") and not is_correct("", "0")


def test_graded_table_per_task_type_and_its_printed_form():
    rows = [
        {"task": "scene_count", "answer": "2"},
        {"task": "scene_count", "answer": "1"},
        {"task": "scene_colour", "answer": "red"},
    ]

    def table_of(answers):
        return graded_table(
            (r["task"], is_correct(a, r["answer"])) for r, a in zip(rows, answers, strict=True)
        )

    table = table_of(["2", "3", "red"])
    assert table["n"] == 3 and table["accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    assert table["by_task"] == {
        "scene_colour": {"accuracy": 1.0, "n": 1},
        "scene_count": {"accuracy": 0.5, "n": 2},
    }
    assert graded_table([]) == {"accuracy": 0.0, "n": 0, "by_task": {}}
    metrics = {
        "exit_1": {**table_of(["0", "0", "blue"]), "num_parameters": 1000, "tokens_per_s": 50.0},
        "exit_2": {**table, "num_parameters": 2000, "tokens_per_s": 40.0},
    }
    lines = format_table(metrics, [1, 2]).splitlines()
    assert lines[0] == "| exit | params | tokens/s | all | scene_colour | scene_count |"
    assert lines[2] == "| 1 | 1,000 | 50 | 0.0 | 0.0 | 0.0 |"
    assert lines[3] == "| 2 | 2,000 | 40 | 66.7 | 100.0 | 50.0 |"


def _rows(items) -> list[dict]:
    """The VL stages' rows of generated items: question, answer and the image as a PNG data URL."""
    return [
        {
            "question": it.question,
            "answer": it.answer,
            "image": "data:image/png;base64," + base64.b64encode(it.png_bytes()).decode(),
        }
        for it in items
    ]


def test_sft_labels_cover_the_answer_and_its_end_token_only():
    from tasks.data.vlgen import generate_vqa
    from tests.tiny_vl import tiny_vl_processor

    processor = tiny_vl_processor()
    processor.tokenizer.padding_side = "left"
    items = generate_vqa(3, seed=0, split="train", tasks=["scene_count", "scene_position"], size=32)
    rows = _rows(items)
    batch = encode_sft(processor, rows)
    tok = processor.tokenizer
    for i, row in enumerate(rows):
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert tok.decode(labelled) == row["answer"] + "<|im_end|>"
        assert not (batch["labels"][i][batch["mm_token_type_ids"][i] == 1] != -100).any()


def test_vl_stream_visits_every_row_once_per_epoch_in_its_seeded_order():
    import random

    import torch

    from tasks.data.vlgen import generate_vqa
    from tasks.training.vl_pipeline import VLStream
    from tests.tiny_vl import tiny_vl_processor

    processor = tiny_vl_processor()
    processor.tokenizer.padding_side = "left"
    items = generate_vqa(5, seed=0, split="train", tasks=["scene_count", "scene_colour"], size=32)
    rows = _rows(items)
    stream = VLStream(processor, rows, seed=7)
    for epoch in range(3):
        expected = list(range(5))
        random.Random(f"7:{epoch}").shuffle(expected)
        assert stream.order(epoch) == expected
    assert stream.order(1) is stream.order(1)  # kept, not shuffled again per sample
    # positions 3..9 span the end of epoch 0, all of epoch 1: the rows of the orders, in sequence
    visited = [stream.order(p // 5)[p % 5] for p in range(3, 10)]
    batch = stream.batch(3, 7)
    assert torch.equal(batch["input_ids"], encode_sft(processor, [rows[i] for i in visited])["input_ids"])
    assert sorted(visited[2:]) == list(range(5))
    with pytest.raises(StageError, match="no training rows"):  # a user error: never retried by the flow
        VLStream(processor, [], seed=7)


def test_vl_training_checkpoints_are_stale_when_their_inputs_change(tmp_path):
    """A VL checkpoint resumes only on the same data, tokenizer and (for family_sft) the same cpt family:
    they once agreed on parameters alone, so a retrained cpt (say, another `cpt.lr`) left family_sft
    resuming its finished checkpoint, trained from the old cpt, and publishing it."""
    from tasks.training.vl_pipeline import train_inputs

    paths = {"paths.data_dir": str(tmp_path / "data"), "paths.artifacts_dir": str(tmp_path / "a")}
    p = load_params(VL, paths)
    validated, tok, cpt = (
        tmp_path / "data" / "validated",
        tmp_path / "a" / "tokenizer",
        tmp_path / "a" / "cpt",
    )
    for d in (validated, tok, cpt):
        d.mkdir(parents=True)
    for name in ("train.jsonl", "select.jsonl", "eval.jsonl"):
        (validated / name).write_text(f"{name}\n")
    (tok / "tokenizer.json").write_text("{}")
    (cpt / "model.safetensors").write_bytes(b"weights")
    assert "cpt" not in train_inputs(p, "cpt")
    before = {stage: train_inputs(p, stage) for stage in ("cpt", "family_sft")}
    for path, stages in [
        (validated / "train.jsonl", ("cpt", "family_sft")),
        (validated / "select.jsonl", ("cpt", "family_sft")),
        (tok / "tokenizer.json", ("cpt", "family_sft")),
        (cpt / "model.safetensors", ("family_sft",)),
        (validated / "eval.jsonl", ()),  # no training stage reads it
    ]:
        original = path.read_bytes()
        path.write_bytes(original + b"changed")
        changed = {s for s in before if train_inputs(p, s) != before[s]}
        assert changed == set(stages), (path, changed)
        path.write_bytes(original)
    assert train_inputs(p, "cpt") != train_inputs(load_params(VL, {**paths, "vl.num_train": 7}), "cpt")


def test_a_loaded_processor_saves_the_same_files_online_or_offline(tmp_path):
    """load_processor passes local_files_only itself: transformers sets it under HF_HUB_OFFLINE=1 and
    the tokenizer saves it into the configs that privacy and export write, so those outputs once
    depended on the environment (the first VL audit, whose stages ran without HF_HUB_OFFLINE, found
    artifacts/vl/privacy and export different)."""
    import os
    import subprocess
    import sys

    from tiny_vl import tiny_vl_processor

    tiny_vl_processor().save_pretrained(tmp_path / "a" / "tokenizer")
    script = (
        "import sys\n"
        "from tasks.core.params import load_params\n"
        "from tasks.training.vl_pipeline import load_processor\n"
        "p = load_params(sys.argv[1], {'paths.artifacts_dir': sys.argv[2]})\n"
        "load_processor(p).save_pretrained(sys.argv[3])\n"
    )
    saved = {}
    for offline in ("1", None):
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
        if offline:
            env["HF_HUB_OFFLINE"] = offline
        out = tmp_path / f"out-{offline}"
        cmd = [sys.executable, "-c", script, str(VL), str(tmp_path / "a"), str(out)]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        saved[offline] = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
    assert saved["1"] and saved["1"] == saved[None]
