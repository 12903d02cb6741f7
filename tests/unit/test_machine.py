"""flows.machine: the CPU time other work takes, measured from /proc/stat, and when `ruyi run` / `ruyi
audit` warn that the stages' threads would compete with it."""

from __future__ import annotations

import os

import pytest
from spinners import spinners, stop

from flows.machine import busy, check_threads, oversubscription_warning

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat (Linux)")


def test_a_spinning_process_is_counted_on_its_cpu():
    cpu = min(os.sched_getaffinity(0))
    procs = spinners([cpu])
    try:
        assert busy([cpu], None, sample_s=0.2)[0] is not None  # the spinner has started
        on_host, in_cgroup = busy([cpu], None, sample_s=1.0)
    finally:
        stop(procs)
    assert on_host is not None and 0.8 <= on_host <= 1.0, on_host
    assert in_cgroup is None  # no quota given: nothing to measure it against


def test_every_usable_cpu_spinning_counts_them_all():
    usable = sorted(os.sched_getaffinity(0))
    procs = spinners(usable)
    try:
        busy(None, None, sample_s=0.2)
        on_host = busy(None, None, sample_s=1.0)[0]
    finally:
        stop(procs)
    assert on_host is not None and on_host >= 0.8 * len(usable), (on_host, usable)


def test_no_proc_stat_no_figure(tmp_path):
    assert busy(None, None, sample_s=0.0, stat=tmp_path / "stat") == (None, None)
    (tmp_path / "stat").write_text("intr 1 2 3\n")  # no per-CPU lines
    assert busy(None, None, sample_s=0.0, stat=tmp_path / "stat") == (None, None)


def test_the_warning_rule():
    where = "`threads: 2` in params.yaml"
    # two threads on two CPUs: warned once other work takes more than half a CPU
    assert oversubscription_warning(2, 0.3, 2, where) is None
    said = oversubscription_warning(2, 1.0, 2, where)
    assert said and "1.0 of the 2 CPUs" in said and "2 intra-op threads (`threads: 2` in params.yaml)" in said
    assert "OMP_NUM_THREADS=1" in said and "same outputs, bit for bit" in said
    assert oversubscription_warning(1, 2.0, 2, where) is None  # one thread does not spin against others
    assert oversubscription_warning(2, 5.0, 8, where) is None  # room left
    assert oversubscription_warning(4, 5.0, 8, where)
    assert oversubscription_warning(2, None, 2, where) is None  # nothing measured (no /proc/stat)
    # inside a CPU quota: its CPUs and where it is set are named
    limit = "CPUs of this process's CPU quota (set at /sys/fs/cgroup/cpu/job)"
    said = oversubscription_warning(2, 1.2, 2.5, where, limit)
    assert said and "1.2 of the 2.5 CPUs of this process's CPU quota (set at /sys/fs/cgroup/cpu/job)" in said
    assert oversubscription_warning(2, 0.4, 2.5, where, limit) is None


@pytest.mark.parametrize("setting", [0, -1, "lots", 1.5, True, None])
def test_a_setting_the_stages_would_refuse_is_not_an_error_here(setting):
    assert check_threads(setting, "params.yaml") is None
