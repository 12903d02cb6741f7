"""flows.audit.AuditReport.hint: where to look when outputs differ though nothing recorded changed."""

from __future__ import annotations

import os

from flows.audit import AuditReport, OutputCheck, print_report
from flows.machine import cpu_name, machine_line


def _report(
    statuses: list[tuple[str, str, str]], stale: list[str] | None = None, cpu: str | None = None
) -> AuditReport:
    checks = [
        OutputCheck(stage, path, status, "a", "a" if status == "reproduced" else "b")
        for stage, path, status in statuses
    ]
    return AuditReport("HEAD", "0123456789abcdef", pulled=True, checks=checks, stale=stale or [], cpu=cpu)


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
    assert "The CPU model decides too" in hint and "this audit ran on" not in hint
    named = _report(CHAIN, cpu="AMD EPYC 7B13, AVX2").hint()
    assert named is not None and named.endswith("; this audit ran on AMD EPYC 7B13, AVX2")
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


def test_the_cpu_is_named_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 fma avx512f\n\n"
        "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 fma avx512f\n"
    )
    assert cpu_name(info) == "Intel(R) Xeon(R) Processor, AVX-512"
    info.write_text("model name\t: AMD EPYC 7B13 64-Core Processor\nflags\t\t: fpu avx2 fma\n")
    assert cpu_name(info) == "AMD EPYC 7B13 64-Core Processor, AVX2"
    info.write_text("processor\t: 0\nflags\t\t: fpu\n")  # no model name (some ARM kernels)
    assert cpu_name(info) is None
    assert cpu_name(tmp_path / "absent") is None
    assert _report(CHAIN, cpu=cpu_name()).to_dict()["cpu"] == cpu_name()


def test_the_machine_line_names_the_cpu_and_the_usable_cpus(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: AMD EPYC 7B13 64-Core Processor\nflags\t\t: fpu avx2 fma\n")
    usable = len(os.sched_getaffinity(0))
    line = machine_line(info)
    assert line.startswith("machine: AMD EPYC 7B13 64-Core Processor, AVX2; ") and "CPUs usable" in line
    assert int(line.split("; ")[1].split()[0]) <= usable
    assert machine_line(tmp_path / "absent").startswith("machine: a CPU /proc/cpuinfo does not name; ")
