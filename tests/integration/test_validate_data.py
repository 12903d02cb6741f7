"""The validate_data stage end to end on small files: pass, fail, quarantine, Data Docs, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from test_data_contracts import params_for_tests, valid_datasets

from tasks.core.stage import ContractViolation, StageError
from tasks.validate_data import main, run


def write_raw(
    tmp_path: Path, files: dict[str, list[dict]], extra_lines: dict[str, str] | None = None
) -> Path:
    """Writes data/raw/*.jsonl and a manifest.json (rows, sha256) as prepare_data does."""
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, rows in files.items():
        text = "".join(json.dumps(r) + "\n" for r in rows) + (extra_lines or {}).get(name, "")
        (raw / name).write_text(text, encoding="utf-8")
        entries[name] = {
            "rows": sum(1 for line in text.splitlines() if line.strip()),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
        }
    (raw / "manifest.json").write_text(json.dumps({"seed": 1, "files": entries}))
    return raw


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_valid_data_is_published_unchanged(tmp_path, monkeypatch):
    raw = write_raw(tmp_path, valid_datasets())
    monkeypatch.chdir(Path(__file__).parents[2])  # params.yaml of the repo
    sets = [f"paths.{k}_dir={tmp_path / k}" for k in ("data", "metrics", "plots", "reports")]
    sets += ["data.min_doc_chars=40", "data.max_doc_chars=600", "data.math_levels=[1, 2, 3]"]
    assert main([arg for s in sets for arg in ("--set", s)]) == 0

    validated = tmp_path / "data" / "validated"
    for name in valid_datasets():
        assert (validated / name).read_bytes() == (raw / name).read_bytes()
    manifest = json.loads((validated / "manifest.json").read_text())
    assert manifest["seed"] == 1  # prepare_data's entries are kept
    assert manifest["files"]["sft.jsonl"]["rows"] == 10
    assert (
        manifest["files"]["sft.jsonl"]["sha256"]
        == hashlib.sha256((raw / "sft.jsonl").read_bytes()).hexdigest()
    )
    metrics = json.loads((tmp_path / "metrics" / "validate_data.json").read_text())
    assert metrics["passed"] and metrics["rows_quarantined"] == 0
    assert metrics["rows_checked"] == 9 + 30 + 2 + 10
    assert metrics["expectations_failed"] == 0 and metrics["expectations_evaluated"] > 60
    assert metrics["datasets"]["eval.jsonl"] == {"rows_checked": 10, "rows_passed": 10, "rows_quarantined": 0}
    assert (
        json.loads((tmp_path / "data" / "quarantine" / "summary.json").read_text())["quarantined"][
            "sft.jsonl"
        ]
        == 0
    )
    assert (tmp_path / "data" / "quarantine" / "sft.jsonl").read_text() == ""
    assert (tmp_path / "reports" / "contracts" / "data_docs" / "index.html").is_file()
    assert (tmp_path / "plots" / "validate_data" / "rows.png").stat().st_size > 0
    assert _lines(tmp_path / "plots" / "validate_data" / "rows.csv")[0] == "file,rows_passed,rows_quarantined"


def _dirty():
    files = valid_datasets(n_math=20)
    files["sft.jsonl"][3]["prompt"] += " Mail bob@example.org."  # e-mail
    files["sft.jsonl"][7]["id"] = files["sft.jsonl"][2]["id"]  # duplicate of line 3
    files["rl.jsonl"][5]["answer"] = "twelve"  # bad answer format
    files["eval.jsonl"][9]["question"] = files["rl.jsonl"][0]["question"]  # overlap with training
    files["eval.jsonl"][9]["answer"] = files["rl.jsonl"][0]["answer"]
    files["eval.jsonl"][9]["solution"] = f"x\n#### {files['rl.jsonl'][0]['answer']}"
    return files


def test_violation_fails_naming_expectation_file_and_rows(tmp_path):
    write_raw(tmp_path, _dirty())
    params = params_for_tests(tmp_path)
    with pytest.raises(ContractViolation) as err:
        run(params)
    message = str(err.value)
    raw = tmp_path / "data" / "raw"
    assert "validate_data.on_violation=fail" in message
    assert "expect_column_values_to_not_match_regex(prompt): prompt: no e-mail addresses" in message
    assert f"{raw / 'sft.jsonl'}:4: 'bob@example.org' in" in message
    assert "expect_column_values_to_be_unique(id)" in message and f"{raw / 'sft.jsonl'}:8:" in message
    assert (
        "expect_column_values_to_match_regex(answer)" in message
        and f"{raw / 'rl.jsonl'}:6: 'twelve'" in message
    )
    assert (
        "expect_column_values_to_not_be_in_set(_question_key)" in message
        and f"{raw / 'eval.jsonl'}:10:" in message
    )
    assert {r["suite"] for r in err.value.failures} == {"sft", "rl", "eval"}
    assert isinstance(err.value, StageError)
    # Nothing published; the Data Docs list the bad rows.
    assert not (tmp_path / "data" / "validated").exists()
    assert not (tmp_path / "metrics" / "validate_data.json").exists()
    pages = list((tmp_path / "reports" / "contracts" / "data_docs" / "validations" / "sft").rglob("*.html"))
    assert len(pages) == 1
    html = pages[0].read_text()
    assert f"{raw / 'sft.jsonl'}:4" in html and f"{raw / 'sft.jsonl'}:8" in html and "bob@example.org" in html


def test_select_row_duplicating_a_training_row_fails_naming_file_and_row(tmp_path):
    """A healing-decision row that is a training row (another id, same text) fails the stage; under
    quarantine it is set aside and every other row published."""
    files = valid_datasets()
    files["select.jsonl"][6] = {**files["sft.jsonl"][2], "id": "select-dup"}
    files["select_corpus.jsonl"][1] = {**files["corpus_train.jsonl"][0], "id": "sel-doc-dup"}
    raw = write_raw(tmp_path, files)
    with pytest.raises(ContractViolation) as err:
        run(params_for_tests(tmp_path))
    message = str(err.value)
    assert "expect_column_values_to_not_be_in_set(_question_key)" in message
    assert f"{raw / 'select.jsonl'}:7:" in message and f"{raw / 'select_corpus.jsonl'}:2:" in message
    assert "expect_column_values_to_be_in_set(_shared_text)" in message
    assert {r["suite"] for r in err.value.failures} == {"select_corpus", "select"}
    assert not (tmp_path / "data" / "validated").exists()

    params = params_for_tests(
        tmp_path, **{"validate_data.on_violation": "quarantine", "validate_data.max_quarantine_fraction": 0.5}
    )
    metrics = run(params)
    quarantine = tmp_path / "data" / "quarantine"
    assert [json.loads(line)["line"] for line in _lines(quarantine / "select.jsonl")] == [7]
    assert [json.loads(line)["line"] for line in _lines(quarantine / "select_corpus.jsonl")] == [2]
    validated = tmp_path / "data" / "validated"
    assert (
        len(_lines(validated / "select.jsonl")) == 9 and len(_lines(validated / "select_corpus.jsonl")) == 1
    )
    assert (validated / "sft.jsonl").read_bytes() == (raw / "sft.jsonl").read_bytes()
    assert metrics["rows_quarantined"] == 2


def test_quarantine_moves_exactly_the_bad_rows(tmp_path):
    files = _dirty()
    raw = write_raw(tmp_path, files)
    params = params_for_tests(
        tmp_path, **{"validate_data.on_violation": "quarantine", "validate_data.max_quarantine_fraction": 0.1}
    )
    metrics = run(params)

    quarantine = tmp_path / "data" / "quarantine"
    sft_bad = [json.loads(line) for line in _lines(quarantine / "sft.jsonl")]
    assert [(r["line"], r["row"]["id"]) for r in sft_bad] == [(4, "sft-003"), (8, "sft-002")]
    assert sft_bad[0]["reasons"] == [
        {
            "expectation": "expect_column_values_to_not_match_regex",
            "column": "prompt",
            "description": "prompt: no e-mail addresses (personal data)",
        }
    ]
    # The first occurrence of the duplicated id (line 3) is kept, the later one quarantined.
    assert sft_bad[1]["reasons"][0]["expectation"] == "expect_column_values_to_be_unique"
    assert sft_bad[1]["reasons"][0]["detail"] == f"duplicate of {raw / 'sft.jsonl'}:3"
    assert [r["line"] for r in map(json.loads, _lines(quarantine / "rl.jsonl"))] == [6]
    eval_bad = [json.loads(line) for line in _lines(quarantine / "eval.jsonl")]
    assert [r["line"] for r in eval_bad] == [10]
    assert eval_bad[0]["reasons"][0]["expectation"] == "expect_column_values_to_not_be_in_set"
    assert (quarantine / "corpus_train.jsonl").read_text() == ""

    # Every other row is published, byte for byte and in order.
    validated = tmp_path / "data" / "validated"
    raw_sft = _lines(raw / "sft.jsonl")
    assert _lines(validated / "sft.jsonl") == [line for i, line in enumerate(raw_sft, 1) if i not in (4, 8)]
    assert len(_lines(validated / "rl.jsonl")) == 19 and len(_lines(validated / "eval.jsonl")) == 19
    assert (validated / "corpus_train.jsonl").read_bytes() == (raw / "corpus_train.jsonl").read_bytes()
    manifest = json.loads((validated / "manifest.json").read_text())
    assert manifest["files"]["sft.jsonl"]["rows"] == 18 and manifest["raw_files"]["sft.jsonl"]["rows"] == 20
    assert (
        manifest["files"]["sft.jsonl"]["sha256"]
        == hashlib.sha256((validated / "sft.jsonl").read_bytes()).hexdigest()
    )
    assert metrics["datasets"]["sft.jsonl"] == {"rows_checked": 20, "rows_passed": 18, "rows_quarantined": 2}
    assert metrics["rows_quarantined"] == 4 and metrics["expectations_failed"] == 4
    assert metrics["suites"]["sft"]["failed"] == [
        "expect_column_values_to_be_unique(id)",
        "expect_column_values_to_not_match_regex(prompt)",
    ]
    # The kept rows were validated again ("validated" run) and the Data Docs show both runs.
    docs = tmp_path / "reports" / "contracts" / "data_docs" / "validations" / "sft"
    assert sorted(p.name for p in docs.iterdir()) == ["raw", "validated"]


def test_quarantine_over_the_limit_fails(tmp_path):
    write_raw(tmp_path, _dirty())
    params = params_for_tests(
        tmp_path,
        **{"validate_data.on_violation": "quarantine", "validate_data.max_quarantine_fraction": 0.05},
    )
    with pytest.raises(
        ContractViolation,
        match=r"sft.jsonl: 2 of 20 rows \(10.0%\) would be quarantined, over "
        r"validate_data.max_quarantine_fraction=0.05",
    ):
        run(params)
    assert not (tmp_path / "data" / "validated").exists()
    assert not (tmp_path / "data" / "quarantine").exists()


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    write_raw(tmp_path, valid_datasets(), extra_lines={"rl.jsonl": '\n{"id": "rl-x", "question": \n'})
    with pytest.raises(StageError, match=r"rl.jsonl:12: not valid JSON") as err:
        run(params_for_tests(tmp_path, **{"validate_data.on_violation": "quarantine"}))
    assert not isinstance(err.value, ContractViolation)


def test_raw_file_changed_after_manifest(tmp_path):
    raw = write_raw(tmp_path, valid_datasets())
    with open(raw / "eval.jsonl", "a") as f:
        f.write(json.dumps({"id": "eval-extra"}) + "\n")
    with pytest.raises(ContractViolation, match=r"eval.jsonl: sha256 differs from .*manifest.json"):
        run(params_for_tests(tmp_path))


def test_missing_raw_data(tmp_path):
    with pytest.raises(StageError, match="run the prepare_data stage first"):
        run(params_for_tests(tmp_path))


def test_bool_level_is_not_published_as_an_integer(tmp_path):
    files = valid_datasets()
    files["rl.jsonl"][4]["level"] = True
    write_raw(tmp_path, files)
    expected = r"(?s)rl \(rl\.jsonl\).*level: a JSON integer, never true/false.*rl\.jsonl:5: 'level'"
    with pytest.raises(ContractViolation, match=expected):
        run(params_for_tests(tmp_path))
    assert not (tmp_path / "data" / "validated").exists()
    metrics = run(
        params_for_tests(
            tmp_path,
            **{"validate_data.on_violation": "quarantine", "validate_data.max_quarantine_fraction": 0.2},
        )
    )
    assert metrics["datasets"]["rl.jsonl"]["rows_quarantined"] == 1
    published = [json.loads(line) for line in _lines(tmp_path / "data" / "validated" / "rl.jsonl")]
    assert len(published) == 9 and all(type(r["level"]) is int for r in published)
    quarantined = [json.loads(line) for line in _lines(tmp_path / "data" / "quarantine" / "rl.jsonl")]
    assert [q["line"] for q in quarantined] == [5] and quarantined[0]["row"]["level"] is True
