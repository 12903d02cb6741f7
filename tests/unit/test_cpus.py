"""tasks.core.cpus: the CPUs a stage counts are its affinity mask's, capped by its cgroup CPU quota.

The cgroup files are read from /proc/self/{mountinfo,cgroup} and the hierarchies they name. The layouts
below are the kernel's file formats as containers present them (cgroup v2 with and without a cgroup
namespace, cgroup v1 with `cpu,cpuacct` mounted together or apart); where this process may create
cgroups (root with a writable `cpu` hierarchy, as on the project's machine) a real quota is set and a
stage's thread count and the cgroup's CPU time are read under it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from spinners import SPIN

from tasks.core.cpus import (
    KERNEL_PINS,
    CpuQuota,
    cgroup_cpu_seconds,
    cgroup_dirs,
    cpu_flags,
    cpu_limit,
    cpu_quota,
    pin_cpu_kernels,
    usable_cpu_set,
)

REPO = Path(__file__).resolve().parents[2]


def _proc(tmp_path: Path, mounts: list[str], membership: list[str]) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text("".join(line + "\n" for line in mounts))
    (proc / "cgroup").write_text("".join(line + "\n" for line in membership))
    return proc


def _v2_mount(mount: Path, root: str = "/") -> str:
    return f"35 24 0:30 {root} {mount} rw,nosuid,nodev,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate"


def _v1_mount(mount: Path, controllers: str, root: str = "/") -> str:
    return f"41 34 0:36 {root} {mount} rw,nosuid,nodev,relatime shared:16 - cgroup cgroup rw,{controllers}"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_in_a_cgroup_namespace_reads_cpu_max_at_the_root(tmp_path):
    mount = tmp_path / "sys fs cgroup"  # a space in the mount point: mountinfo writes it as \040
    _write(mount / "cpu.max", "150000 100000\n")
    _write(mount / "cpu.stat", "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    proc = _proc(tmp_path, [_v2_mount(Path(str(mount).replace(" ", "\\040")))], ["0::/"])
    quota = cpu_quota(proc)
    assert quota == CpuQuota(1.5, mount, 2, mount / "cpu.stat")
    assert quota.threads == 1  # rounded down: a second thread would be throttled
    assert cgroup_cpu_seconds(quota) == 2.5
    assert cpu_limit(proc)[0] == 1


def test_v2_the_smallest_quota_on_the_way_up_binds(tmp_path):
    mount = tmp_path / "cgroup"
    _write(mount / "kubepods" / "pod1" / "ctr" / "cpu.max", "max 100000\n")  # the container: unlimited
    _write(mount / "kubepods" / "pod1" / "cpu.max", "200000 100000\n")  # the pod: 2 CPUs
    _write(mount / "kubepods" / "cpu.max", "400000 100000\n")
    proc = _proc(tmp_path, [_v2_mount(mount)], ["0::/kubepods/pod1/ctr"])
    quota = cpu_quota(proc)
    assert quota is not None and (quota.cpus, quota.path) == (2.0, mount / "kubepods" / "pod1")
    assert quota.threads == 2
    assert cpu_limit(proc)[0] == min(2, len(usable_cpu_set()))
    assert cpu_limit(proc)[1] == quota  # the count and the quota behind it, read once


@pytest.mark.parametrize(
    "cpu_max", [None, "max 100000\n", "max\n", "lots 100000\n", "0 100000\n", "100000 0\n", "-1 100000\n"]
)
def test_v2_no_quota_where_none_is_set_or_it_cannot_be_read(tmp_path, cpu_max):
    mount = tmp_path / "cgroup"
    mount.mkdir()
    if cpu_max is not None:
        (mount / "cpu.max").write_text(cpu_max)
    proc = _proc(tmp_path, [_v2_mount(mount)], ["0::/"])
    assert cpu_quota(proc) is None
    assert cpu_limit(proc) == (len(usable_cpu_set()), None)


def test_v1_docker_without_a_cgroup_namespace_sees_its_cgroup_at_the_mount_point(tmp_path):
    # docker on a cgroup v1 host: /proc/self/cgroup names /docker/<id>, mounted from that root
    mount = tmp_path / "cpu,cpuacct"
    _write(mount / "cpu.cfs_quota_us", "50000\n")
    _write(mount / "cpu.cfs_period_us", "100000\n")
    _write(mount / "cpuacct.usage", "7000000000\n")
    proc = _proc(
        tmp_path,
        [_v1_mount(mount, "cpu,cpuacct", root="/docker/abc123")],
        ["12:memory:/docker/abc123", "4:cpu,cpuacct:/docker/abc123", "1:name=systemd:/docker/abc123"],
    )
    quota = cpu_quota(proc)
    assert quota == CpuQuota(0.5, mount, 1, mount / "cpuacct.usage")
    assert quota.threads == 1  # at least one
    assert cgroup_cpu_seconds(quota) == 7.0


def test_v1_cpu_and_cpuacct_mounted_apart(tmp_path):
    cpu, acct = tmp_path / "cpu", tmp_path / "cpuacct"
    _write(cpu / "job" / "cpu.cfs_quota_us", "300000\n")
    _write(cpu / "job" / "cpu.cfs_period_us", "100000\n")
    _write(cpu / "cpu.cfs_quota_us", "-1\n")  # the root: unlimited
    _write(cpu / "cpu.cfs_period_us", "100000\n")
    _write(acct / "job" / "cpuacct.usage", "1500000000\n")
    mounts = [_v1_mount(cpu, "cpu"), _v1_mount(acct, "cpuacct")]
    quota = cpu_quota(_proc(tmp_path, mounts, ["3:cpu:/job", "2:cpuacct:/job"]))
    assert quota == CpuQuota(3.0, cpu / "job", 1, acct / "job" / "cpuacct.usage")
    assert cgroup_cpu_seconds(quota) == 1.5
    # in another cpuacct cgroup than its cpu one, the process has no counter for the quota's cgroup
    (tmp_path / "proc").rename(tmp_path / "proc-same")
    quota = cpu_quota(_proc(tmp_path, mounts, ["3:cpu:/job", "2:cpuacct:/"]))
    assert quota is not None and quota.cpus == 3.0 and quota.usage is None
    assert cgroup_cpu_seconds(quota) is None


def test_hybrid_hosts_read_both_trees_and_nothing_readable_means_no_quota(tmp_path):
    cpu, unified = tmp_path / "cpu", tmp_path / "unified"
    cpu.mkdir()
    unified.mkdir()  # hybrid: the cpu controller is on v1, the v2 tree has no cpu.max
    proc = _proc(tmp_path, [_v1_mount(cpu, "cpu"), _v2_mount(unified)], ["1:cpu:/", "0::/"])
    assert [(v, d) for v, d, _, _ in cgroup_dirs(proc)] == [(1, cpu), (2, unified)]
    assert cpu_quota(proc) is None
    assert cpu_quota(tmp_path / "no-proc") is None  # not Linux, or /proc not mounted
    assert cgroup_dirs(tmp_path / "no-proc") == []


class QuotaCgroup:
    """A real cgroup v1 `cpu` cgroup below this process's own, with a CPU quota (and its place in the
    `cpuacct` hierarchy where that is mounted apart, so its CPU time can be read); skips the test where
    this process may not create one. `enter` is a preexec_fn that moves a child process into it."""

    def __init__(self, cpus: float):
        v1 = [(d, mount, usage) for version, d, mount, usage in cgroup_dirs() if version == 1]
        if not v1 or not os.access(v1[0][0], os.W_OK):
            pytest.skip("needs a writable cgroup v1 cpu hierarchy (root, as on the project's machine)")
        directory, mount, usage = v1[0]
        name = f"ruyi-test-{os.getpid()}-{time.monotonic_ns()}"
        self.dirs = [directory / name]
        if usage is not None and usage != mount:  # cpuacct mounted apart, at the same path
            self.dirs.append(usage / directory.relative_to(mount) / name)
        try:
            for d in self.dirs:
                d.mkdir()
            (self.dirs[0] / "cpu.cfs_period_us").write_text("100000")
            (self.dirs[0] / "cpu.cfs_quota_us").write_text(str(round(cpus * 100000)))
        except OSError as e:
            self.remove()
            pytest.skip(f"cannot create a cgroup with a CPU quota here: {e}")

    def enter(self) -> None:
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        for d in self.dirs:
            if d.exists():
                d.rmdir()


@pytest.fixture
def quota_cgroup():
    made: list[QuotaCgroup] = []
    yield lambda cpus: made.append(QuotaCgroup(cpus)) or made[-1]
    for cgroup in made:
        cgroup.remove()


THREADS = (
    "from tasks.core.stage import resolve_threads\n"
    "auto, why = resolve_threads('auto')\nprint(auto, resolve_threads(2)[0])\nprint(why)"
)


def _threads(preexec=None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-c", THREADS]
    out = subprocess.run(cmd, env=env, preexec_fn=preexec, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_a_real_quota_caps_a_stages_threads(quota_cgroup):
    cgroup = quota_cgroup(1.0)
    inside = _threads(cgroup.enter)
    assert inside[0] == "1 1", inside  # `auto` and `threads: 2` alike
    assert f"a CPU quota of 1 at {cgroup.dirs[0]}" in inside[1]
    # the control: the same process outside the cgroup counts its affinity mask
    cpus = len(usable_cpu_set())
    assert _threads()[0] == f"{cpus} {min(2, cpus)}"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_a_cgroups_cpu_time_counts_the_work_inside_it_only(quota_cgroup):
    """The cgroup's counter grows by the CPU time of the process inside it, whatever else runs (the
    machine may be busy: the spinner's own share is the reference), and not by the one beside it."""
    from flows.machine import busy

    cgroup = quota_cgroup(1.0)
    inside = subprocess.Popen([sys.executable, "-c", SPIN], preexec_fn=cgroup.enter)
    beside = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        quota = cpu_quota(Path(f"/proc/{inside.pid}"))  # the spinner's own view of its cgroup
        assert quota is not None and quota.path == cgroup.dirs[0] and quota.usage is not None
        time.sleep(0.3)  # both spinners have started
        counter = cgroup_cpu_seconds(quota)
        spun, spun_beside = _cpu_seconds(inside.pid), _cpu_seconds(beside.pid)
        time.sleep(1.0)
        counted = cgroup_cpu_seconds(quota) - counter
        spun, spun_beside = _cpu_seconds(inside.pid) - spun, _cpu_seconds(beside.pid) - spun_beside
        on_host, in_cgroup = busy(None, quota, sample_s=0.5)
    finally:
        for p in (inside, beside):
            p.kill()
            p.wait()
    assert spun > 0.2 and spun_beside > 0.2, (spun, spun_beside)  # both ran
    assert abs(counted - spun) <= 0.05 + 0.1 * spun, (counted, spun)  # the inside one alone, in full
    assert in_cgroup is not None and 0.2 <= in_cgroup <= 1.1, in_cgroup  # at most its quota of one CPU
    assert on_host is not None and on_host >= in_cgroup, (on_host, in_cgroup)  # /proc/stat sees both


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    return path


def test_kernel_pins_are_set_on_x86_64_v3_and_never_over_the_users(tmp_path):
    v3 = _cpuinfo(tmp_path, "fpu sse sse2 avx avx2 fma bmi2 avx512f avx512bw")
    env: dict[str, str] = {"ATEN_CPU_CAPABILITY": "avx512", "PATH": "/bin"}
    set_now = pin_cpu_kernels(env, v3)
    assert env["ATEN_CPU_CAPABILITY"] == "avx512"  # the user's choice (speed over portable bits) stays
    assert set_now == {k: v for k, v in KERNEL_PINS.items() if k != "ATEN_CPU_CAPABILITY"}
    assert {k: env[k] for k in set_now} == set_now
    assert pin_cpu_kernels(env, v3) == {}  # idempotent
    # a CPU without AVX2 + FMA would fault in the pinned kernels: nothing is set; nor without a cpuinfo
    for cpuinfo in (_cpuinfo(tmp_path, "fpu sse sse2 avx"), tmp_path / "missing"):
        env = {}
        assert pin_cpu_kernels(env, cpuinfo) == {} and env == {}


KERNELS = (
    "import os, hashlib, tasks, torch\n"
    "torch.set_num_threads(1)\n"
    "torch.manual_seed(0)\n"
    "w = torch.randn(64, 300, requires_grad=True)\n"
    "x = torch.randn(300, 257)\n"
    "loss = torch.log_softmax(w @ x, dim=-1).sum() + (w * w).sum()\n"
    "loss.backward()\n"
    "print(torch.backends.cpu.get_cpu_capability(), os.environ.get('MKL_CBWR'))\n"
    "print(hashlib.sha256(w.grad.numpy().tobytes()).hexdigest())"
)


def _kernels(**env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in KERNEL_PINS}
    out = subprocess.run(
        [sys.executable, "-c", KERNELS],
        env={**base, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.splitlines()


@pytest.mark.skipif(not {"avx2", "fma"} <= (cpu_flags() or set()), reason="needs an x86-64-v3 CPU")
def test_a_stage_process_runs_the_pinned_kernels_which_decide_the_bits():
    pinned = _kernels()
    assert pinned[0] == "AVX2 AVX2", pinned  # on a CPU with AVX-512 too: that is the point
    assert _kernels(**KERNEL_PINS) == pinned  # the pins are what it ran
    # the control: other kernels give other bits, which is why a recording names the kernels it ran
    other = _kernels(ATEN_CPU_CAPABILITY="default", MKL_CBWR="COMPATIBLE")
    assert other[0] == "DEFAULT COMPATIBLE" and other[1] != pinned[1], other
