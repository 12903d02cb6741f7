"""`training.backend: megatron` in the family stages, against the hf backend as the oracle.

On the micro workspace (tests/training_helpers.py), 2 gloo processes each:
- cpt with PP=2 (member 2 on stage 0, member 4 on stage 1; 1F1B over grad_accum=2 micro-batches;
  warmup, cosine lr, exit-weight schedule, weight decay and clipping as in params): every train/val
  loss of the curve equals the hf backend's run to 1e-5 (seen: 1e-6), the trained weights to 1e-4,
  and the family's export loads in stock transformers with the same logits;
- family_sft with DP=2 (SFT rows with -100 labels and right padding, so the micro-batches supervise
  different numbers of tokens: the token-share weighting is exercised): the curve equals hf's to 1e-5;
- a real `kill -9` of the megatron cpt stage (a subprocess, ranks spawned locally) right after a
  checkpoint: no process is left behind; the rerun runs its 2 ranks as Ray Train workers
  (`distributed.backend: ray`, a local Ray), resumes from megatron's dist_checkpointing checkpoint,
  and its curve, metrics and family equal the uninterrupted, locally spawned run bit for bit (so the
  Ray launch and the resume are both exact).
The fast test: bad layouts are clear errors naming the parameter, before any work. The spawned runs
are module fixtures shared by the assertions.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from training_helpers import copy_workspace, load, make_workspace

from tasks import cpt, family_sft
from tasks.core.params import ParamsError

REPO = Path(__file__).resolve().parents[2]
TOL_CURVE = 1e-5
TOL_WEIGHTS = 1e-4
CPT = {"cpt__max_steps": 4, "cpt__grad_accum": 2, "cpt__checkpoint_every": 2, "cpt__eval_every": 2}
PP2 = {"training__backend": "megatron", "training__megatron__pp": 2}
DP2 = {"training__backend": "megatron", "training__megatron__dp": 2}
SFT = {"family_sft__max_steps": 3, "family_sft__stage1_steps": 1, "family_sft__eval_every": 3}


def curve(root: Path, stage: str) -> list[tuple]:
    rows = (root / "plots" / stage / "loss.csv").read_text().splitlines()[1:]
    return [tuple(r.split(",")[:3]) + (float(r.split(",")[3]),) for r in rows]


def assert_curves_close(a: list[tuple], b: list[tuple], tol: float) -> float:
    assert [r[:3] for r in a] == [r[:3] for r in b]
    worst = max(abs(x[3] - y[3]) for x, y in zip(a, b))
    assert worst <= tol, worst
    return worst


def family_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("mcore"))


@pytest.fixture(scope="module")
def hf_cpt(base, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    cpt.run(copy_workspace(base, root, **CPT))
    return root


@pytest.fixture(scope="module")
def mc_cpt(base, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mc")
    t0 = time.perf_counter()
    cpt.run(copy_workspace(base, root, **CPT, **PP2))
    print(f"megatron cpt (pp=2): {time.perf_counter() - t0:.1f} s")
    return root


def test_bad_layouts_are_clear_errors(base):
    with pytest.raises(
        ParamsError, match=r"training.megatron \(tp=1, pp=3\).*pp=3 does not divide num_hidden"
    ):
        load(base, training__backend="megatron", training__megatron__pp=3)
    with pytest.raises(ParamsError, match=r"tp=2 does not divide num_key_value_heads"):
        load(base, training__backend="megatron", training__megatron__tp=2)
    with pytest.raises(ParamsError, match=r"training.megatron.dp \(3\) must divide cpt.batch_size \(4\)"):
        load(base, training__backend="megatron", training__megatron__dp=3)
    with pytest.raises(ParamsError, match=r"distributed.num_workers \(2\) must equal .* = 4"):
        load(
            base,
            training__backend="megatron",
            training__megatron__pp=2,
            training__megatron__dp=2,
            distributed__backend="ray",
        )
    assert load(base).training.backend == "hf"  # the default pipeline is unchanged


@pytest.mark.slow
def test_cpt_pp2_matches_hf_and_exports_stock_qwen3(hf_cpt, mc_cpt, tmp_path):
    from transformers import AutoModelForCausalLM

    from ruyi_model import FamilialForCausalLM
    from ruyi_model.export import export_exits

    worst = assert_curves_close(curve(hf_cpt, "cpt"), curve(mc_cpt, "cpt"), TOL_CURVE)
    print(f"cpt pp=2 vs hf: max curve difference {worst:.2e}")
    a, b = family_tensors(hf_cpt / "artifacts" / "cpt"), family_tensors(mc_cpt / "artifacts" / "cpt")
    assert sorted(a) == sorted(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= TOL_WEIGHTS
    metrics = json.loads((mc_cpt / "metrics" / "cpt.json").read_text())
    assert (
        metrics["megatron"] == {"tp": 1, "pp": 2, "dp": 1, "recompute": False}
        and metrics["steps"] == CPT["cpt__max_steps"]
    )
    family = FamilialForCausalLM.from_pretrained(mc_cpt / "artifacts" / "cpt").eval()
    export_exits(family, tmp_path / "export")
    ids = torch.randint(0, family.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    for d in family.config.exit_layers:
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / f"exit_{d}").eval()
        assert type(stock).__name__ == "Qwen3ForCausalLM"
        with torch.no_grad():
            diff = (stock(ids).logits - family(ids, exit_layer=d).logits).abs().max().item()
        assert diff <= 1e-5, (d, diff)


@pytest.mark.slow
def test_family_sft_dp2_matches_hf(base, hf_cpt, tmp_path):
    roots = {}
    for name, extra in [("hf", {}), ("mc", DP2)]:
        root = tmp_path / name
        params = copy_workspace(base, root, **CPT, **SFT, **extra)
        shutil.copytree(hf_cpt / "artifacts" / "cpt", root / "artifacts" / "cpt")
        t0 = time.perf_counter()
        family_sft.run(params)
        print(f"family_sft {name}: {time.perf_counter() - t0:.1f} s")
        roots[name] = root
    worst = assert_curves_close(curve(roots["hf"], "family_sft"), curve(roots["mc"], "family_sft"), TOL_CURVE)
    print(f"family_sft dp=2 vs hf: max curve difference {worst:.2e}")
    a = family_tensors(roots["hf"] / "artifacts" / "family_sft")
    b = family_tensors(roots["mc"] / "artifacts" / "family_sft")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= TOL_WEIGHTS


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    children = [int(p) for p in out.split()]
    return children + [d for c in children for d in _descendants(c)]


def _running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_kill9_then_ray_workers_resume_from_dist_checkpoint_exactly(base, mc_cpt, tmp_path):
    raw = yaml.safe_load(base.read_text())
    raw["paths"] = {k: str(tmp_path / Path(v).name) for k, v in raw["paths"].items()}
    raw["cpt"].update(max_steps=CPT["cpt__max_steps"], grad_accum=2, checkpoint_every=2, eval_every=2)
    raw["training"] = {"backend": "megatron", "megatron": {"pp": 2}}
    shutil.copytree(base.parent / "data", tmp_path / "data")
    shutil.copytree(base.parent / "artifacts" / "tokenizer", tmp_path / "artifacts" / "tokenizer")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
    }
    cmd = [sys.executable, "-m", "tasks.cpt", "--params", str(params)]
    ckpt = tmp_path / "artifacts" / "checkpoints" / "cpt"
    with open(tmp_path / "run1.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (ckpt / "step_2").is_dir():
        assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    spawned = _descendants(proc.pid)  # ranks, their checkpoint helpers, the resource tracker
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)
    alive = [p for p in spawned if _running(p)]
    assert not alive, f"processes of the killed stage still run: {alive}"
    assert not (tmp_path / "artifacts" / "cpt").exists()
    # The rerun: this process, the same checkpoints, its 2 ranks as Ray Train workers (RAY_TMPDIR and
    # RAY_AUTH_MODE: tests/conftest.py); the checkpoint fingerprint does not depend on the launcher.
    rerun = load(params, distributed__backend="ray", distributed__num_workers=2)
    t0 = time.perf_counter()
    cpt.run(rerun)
    print(f"megatron cpt resumed on Ray Train (pp=2): {time.perf_counter() - t0:.1f} s")
    assert curve(tmp_path, "cpt") == curve(mc_cpt, "cpt")  # bit for bit
    a, b = family_tensors(tmp_path / "artifacts" / "cpt"), family_tensors(mc_cpt / "artifacts" / "cpt")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    m1 = json.loads((tmp_path / "metrics" / "cpt.json").read_text())
    m0 = json.loads((mc_cpt / "metrics" / "cpt.json").read_text())
    assert m1["resumed_from_step"] >= 2 and m0["resumed_from_step"] is None
    assert {k: v for k, v in m1.items() if k.startswith("exit_")} == {
        k: v for k, v in m0.items() if k.startswith("exit_")
    }
