"""`make setup` with pip and with uv, side by side: the set-up's share of `make run`'s 15 minutes.

    python benchmarks/experiments/setup_time.py [--rev HEAD] [--pip-makefile-rev ca40853] [--rounds 1]
        [--json out.json]

Each round clones this repository at `--rev` twice into a temporary folder and builds the `.venv` of
each clone from scratch:
- `pip`: the Makefile of `--pip-makefile-rev` (ca40853, the last one that installed with pip:
  `pip install --no-compile -c constraints.txt torch==2.13.0 -e .[dev]`, then the bytecode on every core,
  `pip check` and the import check), run as `make -f <that Makefile> setup`;
- `uv`: the clone's own `make setup` (since 77959f5: uv, pinned in constraints.txt, handed pip's
  find-links; the same bytecode and checks), with `UV_CACHE_DIR` a new empty folder, so uv fetches every
  wheel as on a fresh machine.
The two alternate in order from round to round. Printed per round: each wall time and pip / uv, and
whether both venvs hold the same packages at the same versions (`pip freeze`, uv itself and the project
aside). Run it on an otherwise idle machine: it measures wall time. Nothing of it is kept (the clones, the
venvs and the uv cache are in the temporary folder). Figures: benchmarks/RESULTS.md, "The set-up with uv".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def build(kind: str, rev: str, pip_makefile: str, root: Path) -> dict:
    """One clean clone of `rev` under `root` and its `.venv` built the `kind` way; returns the seconds and
    the clone's `pip freeze`."""
    clone = root / f"{kind}-clone"
    _git("clone", "-q", "--no-checkout", str(REPO), str(clone))
    _git("checkout", "-q", rev, cwd=clone)
    env = dict(os.environ)
    if kind == "pip":
        (clone / "Makefile.pip").write_text(pip_makefile)
        cmd = ["make", "-f", "Makefile.pip", "setup"]
    else:
        env["UV_CACHE_DIR"] = str(root / "uv-cache")  # empty: every wheel fetched
        cmd = ["make", "setup"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(
            f"{kind}: `{' '.join(cmd)}` failed in {clone}:\n{(proc.stderr or proc.stdout)[-3000:]}"
        )
    freeze = subprocess.run(
        [str(clone / ".venv/bin/python"), "-m", "pip", "freeze", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return {"seconds": round(seconds, 1), "packages": sorted(p for p in freeze if not p.startswith("uv=="))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="HEAD", help="the revision whose set-up is built (default HEAD)")
    ap.add_argument(
        "--pip-makefile-rev",
        default="ca40853",
        help="the revision whose Makefile installs with pip (ca40853)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="pip + uv builds per round, alternating order")
    ap.add_argument("--json", type=Path, help="write the rounds here")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    rev = _git("rev-parse", "--verify", f"{args.rev}^{{commit}}").strip()
    pip_makefile = _git("show", f"{args.pip_makefile_rev}:Makefile")
    if "uv pip install" in pip_makefile:
        ap.error(f"the Makefile of {args.pip_makefile_rev} installs with uv, not pip")
    rounds = []
    for r in range(args.rounds):
        order = ("pip", "uv") if r % 2 == 0 else ("uv", "pip")
        with tempfile.TemporaryDirectory(prefix="setup-time-") as tmp:
            got = {kind: build(kind, rev, pip_makefile, Path(tmp)) for kind in order}
        same = got["pip"]["packages"] == got["uv"]["packages"]
        row = {
            "round": r + 1,
            "order": list(order),
            "pip_s": got["pip"]["seconds"],
            "uv_s": got["uv"]["seconds"],
            "ratio": round(got["pip"]["seconds"] / got["uv"]["seconds"], 2),
            "packages": len(got["uv"]["packages"]),
            "same_packages": same,
        }
        rounds.append(row)
        print(
            f"round {row['round']} ({' then '.join(order)}): pip {row['pip_s']:.1f} s, "
            f"uv {row['uv_s']:.1f} s (empty uv cache): pip / uv = {row['ratio']:.2f}; "
            f"{row['packages']} packages, " + ("the same versions" if same else "DIFFERENT versions"),
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"rev": rev, "rounds": rounds}, indent=2) + "\n")
    return 0 if all(r["same_packages"] for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
