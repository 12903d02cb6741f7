"""File helpers shared by the model package and the pipeline (which imports them from here).

`ruyi_model` may not import the pipeline (`tasks`), so the one home of these helpers is here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def temp_sibling(final: Path, kind: str = "tmp") -> Path:
    """`.<name>.<kind>-<pid>-<random>` next to `final`: the writer's pid in the name lets a later writer
    tell a killed writer's leftovers from those of one still running (`sweep_stale_siblings`)."""
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def sweep_stale_siblings(final: str | Path) -> list[Path]:
    """Clears what a killed writer of `final` left beside it (`temp_sibling` names whose pid is gone).

    A temporary (`tmp`) is removed. A replaced copy (`old`) is put back as `final` when `final` is missing
    (the writer died between its two renames in `atomic_dir`), else removed. Leftovers of live processes
    (this one included) are kept. Returns the paths removed or restored.
    """
    final = Path(final)
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}")
    done = []
    if not final.parent.is_dir():
        return done
    for path in sorted(final.parent.iterdir()):
        m = pattern.fullmatch(path.name)
        if not m or int(m.group(2)) == os.getpid() or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not final.exists():
            path.rename(final)
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        done.append(path)
    return done


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yields a fresh temporary sibling of `final` that replaces `final` only if the block succeeds.

    A failure (or a kill) leaves the previous `final` untouched, never a half-written directory; what a
    killed writer left beside `final` is cleared first (`sweep_stale_siblings`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_siblings(final)
    tmp = temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if final.exists():
            old = temp_sibling(final, "old")
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (large checkpoints never sit in memory whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
