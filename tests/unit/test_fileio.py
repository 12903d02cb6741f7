"""`ruyi_model.fileio`: what a killed writer of an `atomic_dir` output left beside it is cleared."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ruyi_model.fileio import atomic_dir, sweep_stale_siblings, temp_sibling


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(proc.stdout)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid
    raise AssertionError(f"pid {pid} was reused at once")


def _named(final, kind: str, pid: int):
    return final.parent / f".{final.name}.{kind}-{pid}-0123abcd"


def test_temp_sibling_names_the_writer():
    final = Path("/x/out")
    name = temp_sibling(final).name
    assert name.startswith(f".out.tmp-{os.getpid()}-") and len(name.rsplit("-", 1)[1]) == 8


def test_a_killed_writers_leftovers_are_cleared_and_a_live_ones_kept(tmp_path):
    final = tmp_path / "model"
    dead, live = _dead_pid(), os.getppid()
    stale = _named(final, "tmp", dead)
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "w.bin").write_bytes(b"half")
    stale_file = final.parent / f".model.tmp-{dead}-fedcba98"
    stale_file.write_text("half")
    running = _named(final, "tmp", live)
    running.mkdir()
    other = tmp_path / f".modelx.tmp-{dead}-0123abcd"  # another output's temporary: not ours
    other.mkdir()
    with atomic_dir(final) as out:
        (out / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "new"
    assert not stale.exists() and not stale_file.exists()
    assert running.is_dir() and other.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".model.")) == [running.name]


def test_a_writer_killed_between_its_renames_gets_its_output_back(tmp_path):
    final = tmp_path / "model"
    old = _named(final, "old", _dead_pid())
    old.mkdir()
    (old / "a.txt").write_text("previous")
    assert sweep_stale_siblings(final) == [old]
    assert (final / "a.txt").read_text() == "previous" and not old.exists()
    # With the output present, a stale replaced copy is just removed.
    old.mkdir()
    assert sweep_stale_siblings(final) == [old]
    assert not old.exists() and (final / "a.txt").read_text() == "previous"
