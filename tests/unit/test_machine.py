"""flows.machine: the CPU time other work takes, measured from /proc/stat, and when `ruyi run` / `ruyi
audit` warn that the stages' threads would compete with it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from spinners import spinners, stop

from flows.machine import OtherWork, OtherWorkWatch, busy, check_threads, oversubscription_warning, watch_run

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
    said = oversubscription_warning(2, 1.0, 2, where, avx512=False)
    assert said and "1.0 of the 2 CPUs" in said and "2 intra-op threads (`threads: 2` in params.yaml)" in said
    assert "OMP_NUM_THREADS=1" in said and "same outputs, bit for bit" in said
    # one thread's bits were not two threads' on an AVX-512 CPU: the warning does not claim them there
    wide = oversubscription_warning(2, 1.0, 2, where, avx512=True)
    assert wide and "bit for bit" not in wide and "can differ" in wide and "MKL_CBWR=AVX2,STRICT" in wide
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


def _burn(seconds: float) -> str:
    """Python code that uses `seconds` of CPU time, then exits."""
    return f"import time\nt = time.process_time()\nwhile time.process_time() - t < {seconds}: pass"


def _watched(args: list, interval_s: float, window_s: float) -> tuple[str, OtherWork]:
    """Runs `python *args` as the watched tree: it starts its work on a line from the watch (after the
    first sample) and prints one line, returned with what the watch measured."""
    run = subprocess.Popen(
        [sys.executable, *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    watch = OtherWorkWatch(root=run.pid, interval_s=interval_s, window_s=window_s)
    with watch:
        run.stdin.write("go\n")
        run.stdin.flush()
        line = run.stdout.readline()
        run.wait()
    other = watch.result()
    assert other is not None
    return line, other


def test_a_process_outside_the_tree_is_other_work():
    # the watched run sleeps; a process beside it (not its descendant) uses 1.5 CPU-seconds
    run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        watch = OtherWorkWatch(root=run.pid, interval_s=0.2, window_s=1.0)
        with watch:
            subprocess.run([sys.executable, "-c", _burn(1.5)], check=True)
    finally:
        run.kill()
        run.wait()
    other = watch.result()
    assert other is not None and other.cpus == len(os.sched_getaffinity(0))
    # the machine's other load (the suite's other worker) only adds to it
    assert other.cpu_seconds >= 1.3 and other.own_cpu_seconds <= 0.1, other
    assert other.peak >= 0.5 and not other.alone, other
    assert 0 < other.peak_at <= other.seconds + 1e-6, other  # when the busiest window ended


RUN = """
import os, resource, subprocess, sys, time
burn, orphaner = sys.argv[1], sys.argv[2]
sys.stdin.readline()  # the watch has started
subprocess.run([sys.executable, burn, "1.0"])  # a child, waited for
for _ in range(4):  # children shorter than the watch's interval: seen only in their parent's time
    subprocess.run([sys.executable, burn, "0.05"])
# a child left behind by its parent, which init reaps: waited for here by its pid
orphan = int(subprocess.run([sys.executable, orphaner, burn], capture_output=True, text=True).stdout)
while os.path.exists(f"/proc/{orphan}"):
    time.sleep(0.05)
mine = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(sum(r.ru_utime + r.ru_stime for r in mine), flush=True)
time.sleep(0.5)
"""
BURN = "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < float(sys.argv[1]): pass\n"
ORPHANER = """
import subprocess, sys, time
print(subprocess.Popen([sys.executable, sys.argv[1], "1.0"], stdout=subprocess.DEVNULL).pid, flush=True)
time.sleep(0.6)
"""


def test_the_runs_own_tree_is_not_other_work(tmp_path):
    """Children waited for, children too short to be sampled and an orphan seen in the tree all count as
    the run's own CPU time (the orphan's last interval excepted)."""
    files = {}
    for name, text in (("run.py", RUN), ("burn.py", BURN), ("orphaner.py", ORPHANER)):
        files[name] = tmp_path / name
        files[name].write_text(text)
    line, other = _watched([files["run.py"], files["burn.py"], files["orphaner.py"]], 0.1, 1.0)
    waited = float(line)  # the run's own and its waited children's CPU time
    # the orphan's 1.0 s is not in `waited`; at most its last 0.1 s interval (a tick more) is lost, and
    # the run's start-up before the watch's first sample (in `waited`, not in the watched span)
    assert waited + 1.0 - 0.25 <= other.own_cpu_seconds <= waited + 1.0 + 0.1, (waited, other)


def test_a_child_and_its_parent_exiting_in_one_interval_count_once(tmp_path):
    """The run waits for a process that waits for a 1.5 CPU-s child and exits at once: both leave the
    tree within one sampling interval, the child's time reaching the run through its parent's."""
    (tmp_path / "burn.py").write_text(BURN)
    nested = f"import subprocess, sys; subprocess.run([sys.executable, {str(tmp_path / 'burn.py')!r}, '1.5'])"
    code = (
        "import resource, subprocess, sys, time\n"
        "sys.stdin.readline()\n"
        f"subprocess.run([sys.executable, '-c', {nested!r}])\n"
        "r = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(sum(x.ru_utime + x.ru_stime for x in r), flush=True)\n"
        "time.sleep(1.2)\n"
    )
    line, other = _watched(["-c", code], 1.0, 2.0)
    waited = float(line)
    assert waited - 0.25 <= other.own_cpu_seconds <= waited + 0.1, (waited, other)


SPINNER = "while True: pass\n"
KILLED = """
import os, signal, subprocess, sys, time
sys.stdin.readline()
# a parent and its spinning child killed together (as `ray.shutdown` ends raylet and its workers): the
# child is reaped by init, so its time never reaches the run's
parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\\n"
                           "print(subprocess.Popen([sys.executable, sys.argv[1]]).pid, flush=True)\\n"
                           "time.sleep(60)", sys.argv[1]], stdout=subprocess.PIPE, text=True)
child = int(parent.stdout.readline())
def cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
while cpu(child) < 1.0:
    time.sleep(0.05)
spun = cpu(child)
os.kill(child, signal.SIGKILL)
parent.kill()
parent.wait()
while os.path.exists(f"/proc/{child}"):
    time.sleep(0.01)
import resource
r = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(sum(x.ru_utime + x.ru_stime for x in r), spun, flush=True)
time.sleep(1.2)
"""


def test_a_child_reaped_by_init_keeps_what_was_counted(tmp_path):
    """A parent killed with its child: the child's time up to the last sample stays the run's (its
    last interval is lost), and is not taken off as if the parent's time held it."""
    (tmp_path / "spin.py").write_text(SPINNER)
    (tmp_path / "killed.py").write_text(KILLED)
    line, other = _watched([tmp_path / "killed.py", tmp_path / "spin.py"], 1.0, 2.0)
    waited, spun = (float(x) for x in line.split())
    # at most the child's last 1-s interval (and a tick) is lost
    assert waited + spun - 1.1 <= other.own_cpu_seconds <= waited + spun + 0.1, (waited, spun, other)


IGNORING = """
import signal, subprocess, sys, time
sys.stdin.readline()
# a parent that ignores SIGCHLD (as raylet does): its child is reaped at exit with its time added to no
# one's, while the parent lives on
code = ("import signal, subprocess, sys, time\\n"
        "signal.signal(signal.SIGCHLD, signal.SIG_IGN)\\n"
        "subprocess.Popen([sys.executable, sys.argv[1], '3.0'])\\n"
        "time.sleep(6.0)\\n")
subprocess.run([sys.executable, "-c", code, sys.argv[1]])
import resource
r = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(sum(x.ru_utime + x.ru_stime for x in r), flush=True)
time.sleep(1.2)
"""


def test_a_child_whose_parent_ignores_sigchld_keeps_what_was_counted(tmp_path):
    """The child of a parent that ignores SIGCHLD exits while the parent lives: its 3 CPU-s reach no
    one's children's time, so what was counted of it stays the run's (the rule before took it off
    because its parent was alive, losing 2-3 CPU-s)."""
    (tmp_path / "burn.py").write_text(BURN)
    (tmp_path / "ignoring.py").write_text(IGNORING)
    line, other = _watched([tmp_path / "ignoring.py", tmp_path / "burn.py"], 1.0, 2.0)
    waited = float(line)  # the run's and the parent's own time: not the child's
    assert waited + 3.0 - 1.1 <= other.own_cpu_seconds <= waited + 3.0 + 0.1, (waited, other)


def test_other_work_verdict_and_line():
    quiet = OtherWork(
        seconds=769.0,
        cpus=2,
        cpu_seconds=15.4,
        own_cpu_seconds=1190.0,
        peak=0.3,
        peak_at=130.0,
        window_s=10.0,
    )
    assert quiet.alone and quiet.average == pytest.approx(15.4 / 769.0)
    line = quiet.line()
    assert line.startswith("other work during the run: 0.02 of 2 CPUs on average (15 CPU-s in 12 min 49 s;")
    assert (
        "1190 CPU-s were the run's own), at most 0.30 over 10 s (the window to 2 min 10 s)" in line
        and "otherwise idle" in line
    )
    for shared in (
        OtherWork(
            seconds=769.0,
            cpus=2,
            cpu_seconds=15.4,
            own_cpu_seconds=1190.0,
            peak=0.6,
            peak_at=130.0,
            window_s=10.0,
        ),
        OtherWork(
            seconds=100.0,
            cpus=2,
            cpu_seconds=12.0,
            own_cpu_seconds=150.0,
            peak=0.2,
            peak_at=130.0,
            window_s=10.0,
        ),
    ):
        assert not shared.alone and "the machine was shared" in shared.line("the reproduction")


def test_the_run_watch_warns_once_when_other_work_competes():
    said: list[str] = []
    watch = watch_run(2, "params.yaml", said.append)
    cpus = len(os.sched_getaffinity(0))
    watch.on_window(0.0)
    assert said == []
    watch.on_window(float(cpus))  # every CPU taken by other work
    watch.on_window(float(cpus))
    if cpus >= 2 and (os.environ.get("OMP_NUM_THREADS") or "2") != "1":
        assert len(said) == 1 and said[0].startswith("warning: the machine became busy: other work is using")
    else:  # one thread (a 1-CPU machine, or OMP_NUM_THREADS=1) never competes
        assert said == []


def test_no_proc_stat_no_verdict(tmp_path):
    watch = OtherWorkWatch(interval_s=0.05, stat=tmp_path / "stat")
    with watch:
        time.sleep(0.1)
    assert watch.result() is None
    assert watch.summary() == "other work during the run: not measured (no /proc/stat on this system)"


def test_a_failing_sample_ends_the_watch_without_a_figure(monkeypatch):
    """A sample that raises (a /proc race) stops the measuring, not the run: no partial figure."""
    import flows.machine

    watch = OtherWorkWatch(interval_s=0.05)
    with watch:
        time.sleep(0.12)  # some good samples first

        def vanished(root, ours):
            raise ProcessLookupError("the process table changed under us")

        monkeypatch.setattr(flows.machine, "_tree_times", vanished)
        time.sleep(0.12)
    assert watch.result() is None and watch.error is not None
    assert "not measured (ProcessLookupError: the process table changed under us)" in watch.summary()
