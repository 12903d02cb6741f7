"""flows.audit.AuditReport.hint: where to look when outputs differ though nothing recorded changed."""

from __future__ import annotations

from flows.audit import AuditReport, OutputCheck, print_report


def _report(statuses: list[tuple[str, str, str]], stale: list[str] | None = None) -> AuditReport:
    checks = [
        OutputCheck(stage, path, status, "a", "a" if status == "reproduced" else "b")
        for stage, path, status in statuses
    ]
    return AuditReport("HEAD", "0123456789abcdef", pulled=True, checks=checks, stale=stale or [])


CHAIN = [
    ("prepare_data", "data/raw", "reproduced"),
    ("tokenizer", "artifacts/tokenizer", "reproduced"),
    ("tokenizer", "metrics/tokenizer.json", "measured"),
    ("cpt", "artifacts/cpt", "differs"),
    ("cpt", "metrics/reproducible/cpt.json", "differs"),
    ("family_sft", "artifacts/family_sft", "differs"),
]


def test_the_first_differing_output_and_the_stages_before_it_are_named(capsys):
    report = _report(CHAIN)
    hint = report.hint()
    assert hint is not None and hint.startswith("the first output that differs is cpt: artifacts/cpt")
    assert "(the stages before it reproduced: prepare_data, tokenizer)" in hint
    assert "thread count" in hint and "CPU kernels:" in hint and "Bits across machines" in hint
    assert report.to_dict()["hint"] == hint
    print_report(report)
    out = " ".join(capsys.readouterr().out.split())
    assert "where to look: the first output that differs is cpt: artifacts/cpt" in out


def test_no_hint_when_nothing_differs_or_the_recording_is_stale():
    assert _report([s for s in CHAIN if s[2] != "differs"]).hint() is None
    assert _report(CHAIN, stale=["cpt: changed deps: tasks/cpt.py"]).hint() is None  # the stale line says why
    assert _report([]).to_dict()["hint"] is None


def test_a_stage_with_a_missing_output_is_not_called_reproduced():
    chain = [("prepare_data", "data/raw", "missing"), ("tokenizer", "artifacts/tokenizer", "reproduced")]
    hint = _report([*chain, ("cpt", "artifacts/cpt", "differs")]).hint()
    assert hint is not None and "(the stages before it reproduced: tokenizer)" in hint
    assert "reproduced" not in _report([("cpt", "artifacts/cpt", "differs")]).hint().split(".")[0]
