"""The tiny profile's results do not depend on the intra-op thread count (1 or 2).

params.yaml asks for 2 threads (`threads: 2`, 1.3x faster training on 2 idle cores) while the test
suite, Ray workers and `OMP_NUM_THREADS=1 make run` cap it to 1 (tasks.core.stage.resolve_threads): the
recorded run and its audit only agree if every result is the same bitwise at either count. Measured
over the whole chain once (benchmarks/RESULTS.md); here the operations that chain is made of run at the
tiny profile's shapes in two processes, one per thread count, and must agree bitwise:
- three joint multi-exit training steps (family_sft's loss, AdamW, clipping, schedule) of the family
  built from params.yaml's `model` section (cpt's `family_config`, a 2048-token vocabulary);
- sampled and greedy generation of every member;
- compress's distillation KL (its value is reported; a flat sum over every logit was not invariant);
- compress's SVD, plain and activation-aware (torch's LAPACK differs in the last digits at 2 threads
  unless held on one: ruyi_model.threads).
A control shows that the second thread was used: flat sums over two million floats differ.

On a CPU with AVX-512 the probes also set `MKL_CBWR=AVX2,STRICT`: on an Intel Xeon with AVX-512 the
stages' pins alone gave other weights, Adam state, distillation KL and calibrated SVD at 1 and 2
threads (MKL's non-strict mode splits sums by thread count there), and strict mode made them agree
(docs/choices.md, "Bits across machines": why it is not the stages' pin yet).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.core.cpus import cpu_flags

REPO = Path(__file__).resolve().parents[2]

_PROBE = r"""
import hashlib, json, sys
import tasks  # noqa: F401  the stages' CPU kernel pins, set before torch is imported (as in every stage)
import torch

torch.set_num_threads(int(sys.argv[1]))
from ruyi_model import FamilialForCausalLM
from tasks.compress import distillation_kl
from tasks.cpt import family_config
from tasks.core.params import load_params
from tasks.training.loop import build_optimizer, multi_exit_loss_fn

params = load_params(sys.argv[2])
m, cfg = params.model, params.family_sft


def digest(*tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


torch.manual_seed(0)
config = family_config(m, vocab_size=2048, pad_token_id=0, eos_token_id=1)
model = FamilialForCausalLM(config)
teacher = FamilialForCausalLM(config)
teacher.load_state_dict(model.state_dict())
teacher.eval()
out = {}

# family_sft's steps: a batch of chats trimmed to its longest row, prompt tokens and padding unlabeled
optimizer, scheduler = build_optimizer(list(model.named_parameters()), cfg)
loss_fn = multi_exit_loss_fn(lambda step: [0.3] * (len(m.exit_layers) - 1) + [1.0])
model.train()
for step in range(3):
    ids = torch.randint(2, 2048, (cfg.batch_size, 100))
    mask = torch.ones_like(ids)
    mask[: cfg.batch_size // 2, 80:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :30] = -100
    loss, per_exit = loss_fn(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    out[f"loss_{step}"] = repr(float(loss))
out["weights"] = digest(*model.state_dict().values())
out["adam_state"] = digest(*(s["exp_avg_sq"] for s in optimizer.state.values()))

model.eval()
prompt = torch.randint(2, 2048, (2, 20))
for d in m.exit_layers:
    torch.manual_seed(1)
    sampled = model.generate(prompt, exit_layer=d, do_sample=True, max_new_tokens=12, top_k=0)
    greedy = model.generate(prompt, exit_layer=d, do_sample=False, max_new_tokens=12)
    out[f"generate_{d}"] = digest(sampled, greedy)

with torch.no_grad():  # compress's calibration batches: 4 x 256 tokens, the DaE member
    batches = [torch.randint(2, 2048, (4, 256)) for _ in range(8)]
    kls = [distillation_kl(model, teacher, m.exit_layers[0], ids) for ids in batches]
out["distillation_kl"] = [repr(float(v)) for v in kls]

# compress's SVD (plain and activation-aware: eigh of the Gram, then the whitened SVD) at the DaE
# blocks' shapes; LAPACK splits these over threads unless ruyi_model.threads.one_thread holds them
from ruyi_model.dae import svd_lowrank

g = torch.Generator().manual_seed(3)
for shape in [(128, 128), (512, 128), (128, 512)]:
    w = torch.randn(*shape, generator=g)
    x = torch.randn(1024, shape[1], generator=g, dtype=torch.float64)
    for name, gram in (("plain", None), ("calibrated", x.T @ x)):
        a, b, loss = svd_lowrank(w, 40, gram)
        out[f"svd_{name}_{shape[0]}x{shape[1]}"] = [digest(a, b), repr(loss)]

# The control: flat sums over two million floats, which the second thread splits (some of them round
# differently at 2 threads; which ones depends on the values)
torch.manual_seed(2)
out["control_flat_sums"] = [repr(float(torch.randn(2_000_000).sum())) for _ in range(8)]
print(json.dumps(out))
"""


def _probe(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if "avx512f" in (cpu_flags() or set()):
        env["MKL_CBWR"] = "AVX2,STRICT"  # see the module docstring
    env["PYTHONPATH"] = str(REPO)
    env["OMP_WAIT_POLICY"] = "PASSIVE"  # the other xdist worker owns a core: no spinning against it
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(threads), str(REPO / "params.yaml")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs for a second thread")
def test_tiny_profile_results_are_the_same_at_one_and_two_threads():
    one, two = _probe(1), _probe(2)
    control = one.pop("control_flat_sums"), two.pop("control_flat_sums")
    assert control[0] != control[1], "every control sum agreed: the second thread did not run"
    assert one == two


def test_one_thread_holds_torch_at_one_thread_and_restores_the_pool():
    import torch

    from ruyi_model.threads import one_thread

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="inside"):
            with one_thread():
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
