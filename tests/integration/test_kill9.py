"""A real `kill -9` of the cpt, sft and rl stages at random points; resumed runs equal uninterrupted ones.

Each stage runs as a subprocess (`python -m tasks.<stage> --params ...`) on the micro workspaces of the
other integration tests (tests/training_helpers.py; the rl task of test_rl.py, with settings that give
it a gradient at every step), checkpointing every 1-2 steps. A `random.Random(seed)`, the seed in the
test id, draws the kill points of a run: one inside a checkpoint save and one of the other kinds, each
SIGKILLing the process (re)started after the previous kill:

- `in_save`: while step k's checkpoint is being written (its temporary directory exists, its manifest
  not yet), a random few milliseconds after the save began;
- `after_save`: as soon as step k's checkpoint is in place (while the oldest one is pruned);
- `timer`: a random time after the run's first checkpoint activity (training, saving or publishing);
- `publish`: a random time after the process writes its first output.

After every kill nothing partial is visible: the stage's model directory, metrics and curves are absent
or the finished ones, and every checkpoint in place passes verification. A last run completes it; its
model (every tensor, `torch.equal`), metrics and full-precision loss / reward curves equal those of an
uninterrupted run (made in this process through the same `main`) bit for bit, and no checkpoint was
ever set aside as corrupt. Then one flipped byte in a random file of the newest checkpoint after a real
kill (rl) is named in a warning, that checkpoint is skipped, and the result is still bit-identical. The
seed, the kill points and what each kill hit (the checkpoint files and outputs on disk) are printed,
shown on failure. About 2-4 minutes on two busy cores (each stage process spends 5-15 s importing).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import test_rl  # the micro rl task (tokenizer, SFT warm-up, workspace)
import torch
import yaml
from safetensors.torch import load_file
from training_helpers import copy_workspace, load, make_workspace

from tasks import cpt, expand, family_sft
from tasks.core.artifacts import save_family
from tasks.core.files import reproducible_part
from tasks.training.checkpoint import MANIFEST, verify_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
#: Limit on one stage subprocess: a hung child fails the test instead of hanging it.
TIMEOUT_S = 300
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "MPLBACKEND": "Agg",
}
#: The rl run: 4 prompts x 4 samples per step give the micro task a correct and a wrong answer in
#: some group at every step (BPPO pairs, hence a gradient), checked on the uninterrupted run.
RL_SETTINGS = {"rl.steps": 6, "rl.checkpoint_every": 1, "rl.prompts_per_step": 4, "rl.group_size": 4}


@dataclass(frozen=True)
class Stage:
    name: str
    steps: int
    every: int  # checkpoint interval
    final_checkpoint: bool  # the loop of cpt/sft also saves after the last step; rl does not
    outputs: tuple[str, ...]  # files (relative to the workspace) compared byte for byte

    @property
    def checkpoint_steps(self) -> list[int]:
        last = self.steps + 1 if self.final_checkpoint else self.steps
        return [s for s in range(self.every, last, self.every)]


STAGES = {
    "cpt": Stage("cpt", 12, 1, True, ("metrics/reproducible/cpt.json", "plots/cpt/loss.csv")),
    "sft": Stage("sft", 10, 2, True, ("metrics/reproducible/sft.json", "plots/sft/loss.csv")),
    "rl": Stage("rl", 6, 1, False, ("metrics/reproducible/rl.json",)),
}


# --- workspaces ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The micro workspace with cpt, family_sft and expand artifacts (as test_sft.py builds it)."""
    path = make_workspace(tmp_path_factory.mktemp("kill9"))
    cpt.run(load(path, cpt__max_steps=6))
    family_sft.run(load(path, family_sft__max_steps=4, family_sft__stage1_steps=1))
    expand.run(load(path, expand__max_steps=4))
    return path


@pytest.fixture(scope="module")
def rl_sft(tmp_path_factory) -> Path:
    """test_rl.py's SFT-warmed micro family, saved: the input of the rl runs."""
    tok = test_rl.make_tokenizer()
    model = test_rl.make_model(tok)
    test_rl.sft_warmup(model, tok)
    return save_family(model, tok, tmp_path_factory.mktemp("rl-sft") / "sft")


def relocated_params(params_file: Path, root: Path, section: str, **settings) -> Path:
    """`params_file` with every path under `root` and `settings` in `section`, written to root/params.yaml."""
    raw = yaml.safe_load(params_file.read_text())
    raw["paths"] = {k: str(root / Path(v).name) for k, v in raw["paths"].items()}
    raw[section].update(settings)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def new_workspace(base, rl_sft):
    """`new_workspace(stage, root)`: a fresh workspace for `stage` under `root` (its params file inside)."""

    def make(stage: str, root: Path) -> Path:
        spec = STAGES[stage]
        if stage == "rl":
            return test_rl.write_workspace(root, rl_sft, test_rl.rl_rows(20), RL_SETTINGS)
        copy_workspace(base, root, artifacts=("tokenizer", "expand") if stage == "sft" else ("tokenizer",))
        return relocated_params(base, root, stage, checkpoint_every=spec.every, max_steps=spec.steps)

    return make


# --- running and killing a stage -------------------------------------------------------------------
@dataclass
class Run:
    """One workspace of one stage and the logs of every process started on it."""

    stage: Stage
    root: Path
    logs: list[Path] = field(default_factory=list)

    @property
    def ckpt(self) -> Path:
        return self.root / "artifacts" / "checkpoints" / self.stage.name

    @property
    def model_dir(self) -> Path:
        return self.root / "artifacts" / self.stage.name

    def start(self) -> subprocess.Popen:
        log = self.root / "logs" / f"run{len(self.logs)}.log"
        log.parent.mkdir(exist_ok=True)
        self.logs.append(log)
        cmd = [sys.executable, "-m", f"tasks.{self.stage.name}", "--params", str(self.root / "params.yaml")]
        with open(log, "wb") as out:
            return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)

    def log_tail(self, n: int = 3000) -> str:
        return self.logs[-1].read_text(errors="replace")[-n:] if self.logs else ""

    def entries(self) -> set[str]:
        return set(os.listdir(self.ckpt)) if self.ckpt.is_dir() else set()

    def saving(self) -> list[Path]:
        """Temporary directories of checkpoint saves in progress (or cut short)."""
        return sorted(self.ckpt.glob(".step_*.tmp-*")) if self.ckpt.is_dir() else []

    def outputs(self) -> list[str]:
        """The stage's outputs on disk, finished or not (temporaries of atomic writes included)."""
        name, found = self.stage.name, []
        for folder, pattern in [
            ("artifacts", name),
            ("artifacts", f".{name}.*"),
            ("metrics", f"{name}.json"),
            ("metrics", f".{name}.json.*"),
            ("metrics/reproducible", f"{name}.json"),
            ("metrics/reproducible", f".{name}.json.*"),
            (f"plots/{name}", "*"),
        ]:
            found += [str(p.relative_to(self.root)) for p in (self.root / folder).glob(pattern)]
        return sorted(found)

    def activity(self) -> tuple[set[str], dict[str, int]]:
        """The checkpoint directory's entries and the modification time (ns) of every output: what a
        process has done since another `activity()` differs."""
        times = {}
        for rel in self.outputs():
            try:
                times[rel] = (self.root / rel).stat().st_mtime_ns
            except FileNotFoundError:  # a temporary renamed meanwhile
                pass
        return self.entries(), times

    def state(self) -> str:
        """What is on disk now: the checkpoint directories (a save in progress with the files it
        holds) and the outputs."""
        parts = []
        if self.ckpt.is_dir():
            for p in sorted(self.ckpt.iterdir()):
                files = ",".join(sorted(f.name for f in p.iterdir())) if p.is_dir() else ""
                parts.append(f"{p.name}[{files}]")
        parts += [f"out:{rel}" for rel in self.outputs()]
        return " ".join(parts) or "(nothing)"


@dataclass
class KillPoint:
    kind: str  # in_save | after_save | timer | publish
    step: int = 0
    delay: float = 0.0  # seconds after the trigger (timer: after the process started)

    def __str__(self) -> str:
        where = f" step {self.step}" if self.kind in ("in_save", "after_save") else ""
        return f"{self.kind}{where} +{self.delay * 1000:.0f}ms"

    def triggered(self, run: Run, before: tuple[set[str], dict[str, int]]) -> bool:
        """Whether the point is reached; `before`: `run.activity()` when the process started."""
        if self.kind == "in_save":  # its save in progress, or already done (the poll was too slow)
            return any(run.ckpt.glob(f".step_{self.step}.tmp-*")) or (run.ckpt / f"step_{self.step}").is_dir()
        if self.kind == "after_save":
            return (run.ckpt / f"step_{self.step}").is_dir()
        if self.kind == "publish":
            return run.activity()[1] != before[1]  # an output of this process appeared or changed
        return bool(run.entries() - before[0])  # timer: from this process's first checkpoint activity


def watch(proc: subprocess.Popen, run: Run, point: KillPoint | None = None) -> str | None:
    """Polls the workspace while `proc` runs; SIGKILLs it once `point` is reached (plus its delay).

    Returns what the kill hit (`run.state()` right after it), or None if the process exited first.
    """
    t0, before = time.monotonic(), run.activity()
    fire_at = None
    while proc.poll() is None:
        now = time.monotonic() - t0
        if now > TIMEOUT_S:
            proc.kill()
            proc.wait()
            pytest.fail(f"{run.stage.name} did not finish in {TIMEOUT_S} s:\n{run.log_tail()}")
        if point is not None and fire_at is None and point.triggered(run, before):
            fire_at = now + point.delay
        if fire_at is not None and now >= fire_at:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            return f"t={now:.2f}s: {run.state()}"
        # Fast polling only once checkpoints are being written (the imports take seconds).
        time.sleep(0.0005 if run.ckpt.is_dir() else 0.01)
    assert proc.returncode == 0, f"{run.stage.name} failed (exit {proc.returncode}):\n{run.log_tail()}"
    return None


def run_to_completion(run: Run) -> dict:
    """Runs the stage to its end (it must exit 0); returns its complete metrics."""
    watch(run.start(), run)
    return json.loads((run.root / "metrics" / f"{run.stage.name}.json").read_text())


@pytest.fixture(scope="module")
def straight(new_workspace, tmp_path_factory):
    """`straight(stage)`: the uninterrupted run of `stage` (Run, metrics, seconds it took), made once,
    in this process through the same command line (`tasks.<stage>.main`)."""
    import importlib

    done: dict[str, tuple[Run, dict, float]] = {}

    def get(stage: str):
        if stage not in done:
            root = tmp_path_factory.mktemp(f"straight-{stage}")
            params = new_workspace(stage, root)
            t0 = time.monotonic()
            assert importlib.import_module(f"tasks.{stage}").main(["--params", str(params)]) == 0
            metrics = json.loads((root / "metrics" / f"{stage}.json").read_text())
            done[stage] = (Run(STAGES[stage], root), metrics, time.monotonic() - t0)
        return done[stage]

    return get


def draw_kill_points(rng: random.Random, stage: Stage, seconds: float) -> list[KillPoint]:
    """One kill inside a checkpoint save and one of the other kinds, in the order a run reaches them.

    `seconds`: how long the uninterrupted run took in-process (imports done): the span the `timer`
    and `publish` delays are drawn from.
    """
    steps = stage.checkpoint_steps
    points = [KillPoint("in_save", rng.choice(steps[1:]), rng.uniform(0.0, 0.008))]
    kind = rng.choice(["after_save", "timer", "publish"])
    if kind == "after_save":
        points.append(KillPoint(kind, rng.choice(steps[:-1])))
    else:
        points.append(KillPoint(kind, delay=rng.uniform(0.0, seconds if kind == "timer" else seconds / 2)))
    order = {"in_save": 0, "after_save": 0, "timer": 1, "publish": 2}
    return sorted(points, key=lambda p: (order[p.kind], p.step, p.kind == "after_save"))


# --- what must hold --------------------------------------------------------------------------------
def assert_same_model(a: Path, b: Path, why: str) -> None:
    """Every tensor equal (torch.equal), then every file of the two model directories byte for byte."""
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys(), why
    for name in ta:
        assert torch.equal(ta[name], tb[name]), f"tensor {name} differs; {why}"
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()), why
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{b / name} differs; {why}"


def assert_nothing_partial(run: Run, ref: Run, why: str) -> None:
    """After a kill: the model directory, metrics and curves are absent or the finished ones (they are
    written once training is over, so any that exists must be the uninterrupted run's), and every
    checkpoint in place passes verification."""
    if run.model_dir.exists():
        assert_same_model(ref.model_dir, run.model_dir, why)
    for rel in run.stage.outputs:
        if (run.root / rel).exists():
            assert (run.root / rel).read_bytes() == (ref.root / rel).read_bytes(), f"{rel}; {why}"
    metrics = run.root / "metrics" / f"{run.stage.name}.json"
    if metrics.exists():
        expected = json.loads((ref.root / "metrics" / "reproducible" / f"{run.stage.name}.json").read_text())
        assert reproducible_part(json.loads(metrics.read_text())) == expected, why
    if run.ckpt.is_dir():
        for p in sorted(run.ckpt.glob("step_*")):
            assert verify_checkpoint(p) is None, f"{p}: {verify_checkpoint(p)}; {why}"


def assert_identical(run: Run, ref: Run, why: str) -> None:
    """The finished run equals the uninterrupted one: model, metrics, curves (cpt/sft: the full-precision
    loss history of the final checkpoint; rl's metrics hold its curves unrounded)."""
    assert_same_model(ref.model_dir, run.model_dir, why)
    for rel in run.stage.outputs:
        assert (run.root / rel).read_bytes() == (ref.root / rel).read_bytes(), f"{rel}; {why}"
    if run.stage.final_checkpoint:
        last = f"step_{run.stage.steps}/trainer_state.json"
        history = json.loads((run.ckpt / last).read_text())["history"]
        assert history == json.loads((ref.ckpt / last).read_text())["history"], why
        assert len(history) > run.stage.steps


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# --- the tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stage, seed", [("cpt", 3), ("sft", 7), ("rl", 13)], ids=["cpt-seed3", "sft-seed7", "rl-seed13"]
)
def test_kill9_at_random_points_then_resume_equals_the_uninterrupted_run(
    stage, seed, straight, new_workspace, tmp_path
):
    ref, ref_metrics, seconds = straight(stage)
    if stage == "rl":  # the run has a reward signal: the resumed optimizer state matters
        assert ref_metrics["steps_with_gradient"] > 0, ref_metrics["exit_1"]["curves"]["has_gradient"]
    spec = STAGES[stage]
    points = draw_kill_points(random.Random(seed), spec, seconds)
    new_workspace(stage, tmp_path)
    run = Run(spec, tmp_path)
    hits: list[str] = []

    def why() -> str:
        return f"seed {seed}, kill points {[str(p) for p in points]}, kills hit {hits}"

    print(f"{stage}: seed {seed}; uninterrupted run {seconds:.1f} s; kill points {[str(p) for p in points]}")
    for point in points:
        hit = watch(run.start(), run, point)
        hits.append(f"{point}: {hit or 'the run finished first'}")
        print(hits[-1])
        assert_nothing_partial(run, ref, why())
    metrics = run_to_completion(run)
    print(f"completed, resumed from step {metrics['resumed_from_step']}; outputs {run.outputs()}")
    assert_identical(run, ref, why())
    assert metrics["skipped_checkpoints"] == [] and metrics["stale_checkpoint"] is None, why()
    logs = "".join(p.read_text(errors="replace") for p in run.logs)
    assert "fails verification" not in logs and not run.ckpt.with_name(f"{stage}.corrupt").exists(), why()
    assert not run.saving(), why()  # the temporaries of saves cut short were cleaned up on resume


@pytest.mark.parametrize("seed", [21, 27], ids=["seed21-rng.pt", "seed27-optimizer.pt"])
def test_flipped_byte_in_the_newest_checkpoint_after_a_kill_is_skipped_and_named(
    seed, straight, new_workspace, tmp_path
):
    """rl (cpt and sft have in-process versions): kill inside a save, flip one random byte of one random
    file of the newest complete checkpoint (the seed draws it: the ids say which), rerun: a warning
    names the checkpoint and the file, the run resumes from the checkpoint before it and ends
    bit-identical to the uninterrupted run."""
    rng = random.Random(seed)
    ref = straight("rl")[0]
    spec = STAGES["rl"]
    new_workspace("rl", tmp_path)
    run = Run(spec, tmp_path)
    point = KillPoint("in_save", rng.choice(spec.checkpoint_steps[2:]), rng.uniform(0.0, 0.008))
    hit = watch(run.start(), run, point)
    print(f"seed {seed}: {point}: {hit}")
    assert hit is not None, "the rl run finished before the kill"
    newest = max(int(p.name.split("_")[1]) for p in run.ckpt.glob("step_*"))
    path = run.ckpt / f"step_{newest}"
    name = rng.choice(sorted(p.name for p in path.iterdir()))
    offset = rng.randrange((path / name).stat().st_size)
    flip_byte(path / name, offset)
    why = f"seed {seed}, {point}, hit {hit}, flipped byte {offset} of {path / name}"
    print(why)
    metrics = run_to_completion(run)
    [skipped] = metrics["skipped_checkpoints"]
    assert skipped["path"] == str(path) and skipped["step"] == newest, why
    assert name in skipped["reason"], why
    if name != MANIFEST:
        assert skipped["reason"] == f"{name} does not match its sha256 in {MANIFEST} (corrupt)", why
    assert f"{path} fails verification: {skipped['reason']}" in run.logs[-1].read_text(), why
    assert metrics["resumed_from_step"] == newest - 1, why
    assert (run.ckpt.with_name("rl.corrupt") / path.name / name).is_file(), why
    assert_identical(run, ref, why)
