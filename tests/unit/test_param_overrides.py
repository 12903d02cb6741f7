"""`ruyi run --set` writes into the repository's own params files: the comment of a changed line says
what the file held before, setting it back restores the file byte for byte, and nothing else moves."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from flows.pipeline import apply_param_overrides

ROOT = Path(__file__).resolve().parents[2]


def _copy(tmp_path: Path, name: str) -> tuple[Path, str]:
    shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path / name, (ROOT / name).read_text()


def _line(text: str, start: str) -> str:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(start)]
    return line


def _changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    a, b = before.splitlines(), after.splitlines()
    assert len(a) == len(b)  # no line added or removed (flow style and comments kept)
    return [(x, y) for x, y in zip(a, b, strict=True) if x != y]


def test_set_marks_the_comment_and_setting_back_restores_the_file(tmp_path):
    path, original = _copy(tmp_path, "params.yaml")
    assert apply_param_overrides(
        tmp_path,
        {
            "rl.lr": 1e-4,
            "seed": 7,
            "rl.bppo.early_stop": True,
            "gates.min_accuracy": {2: 0.1, 5: 0.2, 8: 0.3},
            "export.gguf_dtypes": ["f16"],
        },
    ) == ["rl.lr", "seed", "rl.bppo.early_stop", "gates.min_accuracy", "export.gguf_dtypes"]
    once = path.read_text()
    assert len(_changed_lines(original, once)) == 5  # the five lines set, nothing else (nulls stay `null`)
    assert _line(once, "seed:").startswith("seed: 7 ")
    assert "# (--set: seed was 1234) every stage derives its RNG seeds from this" in _line(once, "seed:")
    lr = _line(once, "  lr: 1.0e-4 ")  # the notation of the value it replaced
    assert "# (--set: lr was 3.0e-5) AdamW, constant." in lr
    assert "(--set: early_stop was false) stop a group's" in _line(once, "    early_stop:")
    floors = _line(once, "  min_accuracy:")
    assert floors.startswith("  min_accuracy: {2: 0.1, 5: 0.2, 8: 0.3}")  # stays one flow-style line
    assert "(--set: min_accuracy was {2: 0.12, 5: 0.24, 8: 0.26}) math accuracy floor" in floors
    assert _line(once, "  gguf_dtypes:") == "  gguf_dtypes: [f16]  # (--set: gguf_dtypes was [f32, q8_0])"
    loaded = yaml.safe_load(once)
    assert loaded["rl"]["lr"] == 1e-4 and loaded["seed"] == 7 and loaded["rl"]["bppo"]["early_stop"] is True
    assert loaded["gates"]["min_accuracy"] == {2: 0.1, 5: 0.2, 8: 0.3}

    # a second --set keeps the file's value as the one it replaced
    apply_param_overrides(tmp_path, {"rl.lr": 2e-4})
    assert "# (--set: lr was 3.0e-5) AdamW" in _line(path.read_text(), "  lr: 2.0e-4 ")

    # back to the file's values: the file as it was, spelling included (3.0e-5, not 3e-05)
    apply_param_overrides(
        tmp_path,
        {
            "rl.lr": 3e-5,
            "seed": 1234,
            "rl.bppo.early_stop": False,
            "gates.min_accuracy": {2: 0.12, 5: 0.24, 8: 0.26},
            "export.gguf_dtypes": ["f32", "q8_0"],
        },
    )
    assert path.read_text() == original


def test_a_key_inside_a_flow_mapping_is_noted_on_its_line(tmp_path):
    path, original = _copy(tmp_path, "params.vl.yaml")
    weights = _line(original, "  exit_weights:")
    assert "deepest: 2.0}" in weights  # the VL profile's flow-style mapping with its comment
    apply_param_overrides(tmp_path, {"family_sft.exit_weights.deepest": 1.5}, "params.vl.yaml")
    after = path.read_text()
    [(old, new)] = _changed_lines(original, after)
    assert old == weights
    assert new.startswith("  exit_weights: {kind: constant, start: 1.0, floor: 1.0, deepest: 1.5}")
    comment = weights.split("#", 1)[1].strip()
    assert new.endswith(f"# (--set: deepest was 2.0) {comment}")
    apply_param_overrides(tmp_path, {"family_sft.exit_weights.start": 0.5}, "params.vl.yaml")
    assert "# (--set: deepest was 2.0; start was 1.0) " in path.read_text()
    apply_param_overrides(
        tmp_path,
        {"family_sft.exit_weights.deepest": 2.0, "family_sft.exit_weights.start": 1.0},
        "params.vl.yaml",
    )
    assert path.read_text() == original


def test_a_key_without_a_comment_gets_one_and_loses_it_when_set_back(tmp_path):
    path, original = _copy(tmp_path, "params.yaml")
    apply_param_overrides(tmp_path, {"family_sft.exit_weights.deepest": 1.5})
    [(old, new)] = _changed_lines(original, path.read_text())
    assert old.strip() == "deepest: 1.0"  # no comment of its own in the file
    assert new.split("#", 1)[0].strip() == "deepest: 1.5"
    assert new.split("#", 1)[1].strip() == "(--set: deepest was 1.0)"
    apply_param_overrides(tmp_path, {"family_sft.exit_weights.deepest": 1.0})
    assert path.read_text() == original


def test_a_value_spelled_the_yaml_1_2_way_is_restored_and_the_next_comment_lines_stay(tmp_path):
    """`1e-4` is a float under YAML 1.2 (as params files are read), a string under PyYAML's 1.1; and a
    key followed by full-line comments carries them in the same comment slot as its own."""
    path = tmp_path / "params.yaml"
    text = (ROOT / "params.yaml").read_text()
    text = text.replace(
        "  lr: 3.0e-5                    # AdamW", "  lr: 1e-4\n  # a comment line\n  # AdamW", 1
    )
    path.write_text(text)
    apply_param_overrides(tmp_path, {"rl.lr": 2e-4})
    after = path.read_text()
    assert "  lr: 2.0e-4 # (--set: lr was 1e-4)\n  # a comment line\n  # AdamW" in after
    apply_param_overrides(tmp_path, {"rl.lr": 1e-4})
    assert path.read_text() == text


def test_floats_are_written_as_the_file_spells_them_and_yaml_1_1_reads_them_as_floats(tmp_path):
    """A float replacing one in exponent notation is written so too (`heal_lr: 1.0e-5` set to 0.001 reads
    `1.0e-3`); a decimal stays a decimal; and a float Python spells with an exponent (`1e-05`, a string
    to PyYAML's YAML 1.1) gets a point and a signed exponent, alone or inside a flow mapping."""
    path, original = _copy(tmp_path, "params.yaml")
    apply_param_overrides(
        tmp_path,
        {
            "compress.heal_lr": 0.001,
            "rl.temperature": 0.7,
            "privacy.beta": 1e-5,
            "gates.min_accuracy": {2: 1e-5, 5: 0.25, 8: 0.3},
        },
    )
    after = path.read_text()
    assert _line(after, "  heal_lr:").startswith("  heal_lr: 1.0e-3 ")
    assert _line(after, "  temperature:").startswith("  temperature: 0.7 ")
    assert "\n  beta: 1.0e-5 " in after  # privacy.beta (rl.beta is another line)
    assert _line(after, "  min_accuracy:").startswith("  min_accuracy: {2: 1.0e-5, 5: 0.25, 8: 0.3}")
    loaded = yaml.safe_load(after)  # YAML 1.1
    assert loaded["compress"]["heal_lr"] == 0.001 and loaded["privacy"]["beta"] == 1e-5
    assert loaded["gates"]["min_accuracy"] == {2: 1e-5, 5: 0.25, 8: 0.3}
    apply_param_overrides(
        tmp_path,
        {
            "compress.heal_lr": 1e-5,
            "rl.temperature": 1.0,
            "privacy.beta": 0.01,
            "gates.min_accuracy": {2: 0.12, 5: 0.24, 8: 0.26},
        },
    )
    assert path.read_text() == original


def test_exponent_text_reads_back_exactly():
    from flows.pipeline import _exponent_text

    cases = {1e-4: "1.0e-4", 3e-5: "3.0e-5", 2.5e-7: "2.5e-7", 1e20: "1.0e+20", 0.1: "1.0e-1"}
    for value, text in cases.items():
        assert _exponent_text(value) == text
    for value in (1.2345678901234567e-8, 5e-324, 1.7976931348623157e308, 1 / 3):
        assert float(_exponent_text(value)) == value
        assert yaml.safe_load(f"x: {_exponent_text(value)}")["x"] == value
