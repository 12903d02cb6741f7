"""The family on megatron-core (ruyi_model.megatron.model) against the HF family as the oracle.

Single process (gloo, world size 1, TP=1, PP=1): every member's logits and the multi-exit loss equal
the HF family's, a training step moves both models the same way (the megatron weights, converted
back, equal the HF model trained with the same step), and conversions leave the family and its stock
Qwen3 exports bitwise unchanged.
"""

from __future__ import annotations

import pytest
import torch
from local_http import free_port
from safetensors.torch import load_file

from ruyi_model import FamilialConfig, FamilialForCausalLM
from ruyi_model.export import export_exits
from ruyi_model.megatron import convert_hf_to_mcore, convert_mcore_to_hf

VOCAB = 128


def make_family(exits=(2, 4), branch=1, shared=False, dae=None, weights=None, seed=0):
    torch.manual_seed(seed)
    cfg = FamilialConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        exit_layers=list(exits),
        exit_branch_layers=branch,
        shared_heads=shared,
        dae_blocks=dae,
        exit_loss_weights=weights or [0.3 + 0.2 * k for k in range(len(exits))],
    )
    fam = FamilialForCausalLM._from_config(cfg).eval()
    with torch.no_grad():
        for name, p in fam.named_parameters():
            if p.ndim == 1:  # norms start at one: make them matter
                p.normal_(1.0, 0.2)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):  # DaE blocks start at zero
                p.normal_(0.0, 0.02)
    return fam


@pytest.fixture(scope="module")
def megatron_world():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from ruyi_model.megatron import init_parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    init_parallel(tp=1, pp=1, seed=0)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def megatron_batch(ids):
    """HF's `labels=ids` as megatron takes it: targets shifted left, the last position masked."""
    labels = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    mask = torch.ones_like(ids, dtype=torch.float32)
    mask[:, -1] = 0
    return torch.arange(ids.shape[1]).expand_as(ids), labels, mask


FAMILIES = [
    {},  # Ruyi2 layout: branch layer per member
    {"exits": (1, 3, 4), "dae": [2, 0, 1]},  # DaE blocks (also on the deepest member)
    {"exits": (2, 3, 4), "branch": 0},  # norm + head exits
    {"exits": (1, 2, 4), "shared": True},  # one shared head
]


@pytest.mark.parametrize("kw", FAMILIES)
def test_member_logits_and_multi_exit_loss_match_hf(tmp_path, megatron_world, kw):
    from ruyi_model.megatron import familial_loss_func, load_model

    fam = make_family(**kw)
    fam.save_pretrained(tmp_path / "fam")
    convert_hf_to_mcore(tmp_path / "fam", tmp_path / "mc")
    model = load_model(tmp_path / "mc").eval()
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    pos, labels, mask = megatron_batch(ids)
    got: dict = {}
    with torch.no_grad():
        deepest = model(ids, pos, exit_logits=got)
        assert sorted(got) == list(fam.config.exit_layers)
        assert torch.equal(deepest, got[fam.config.exit_layers[-1]])
        for d in fam.config.exit_layers:
            ref = fam(ids, exit_layer=d).logits
            assert got[d].shape == ref.shape
            assert (got[d] - ref).abs().max().item() <= 1e-4, d
        loss, _ = familial_loss_func(mask, model(ids, pos, labels=labels, loss_mask=mask))
        ref = fam(ids, labels=ids)
    assert abs(loss.item() - ref.loss.item()) <= 1e-5
    for d in fam.config.exit_layers:
        assert abs(model.exit_losses[d].item() - ref.exit_losses[d].item()) <= 1e-5, d


def test_bad_inputs_are_clear_errors(tmp_path, megatron_world):
    from ruyi_model.megatron import load_model

    make_family().save_pretrained(tmp_path / "fam")
    convert_hf_to_mcore(tmp_path / "fam", tmp_path / "mc")
    model = load_model(tmp_path / "mc")
    ids = torch.randint(0, VOCAB, (2, 5))
    pos, labels, mask = megatron_batch(ids)
    with pytest.raises(ValueError, match="-100"):
        model(ids, pos, labels=torch.full_like(labels, -100), loss_mask=mask)
    with pytest.raises(ValueError, match="labels has shape"):
        model(ids, pos, labels=labels[:, :3], loss_mask=mask)
    with pytest.raises(ValueError, match="exit_loss_weights needs 2 values"):
        model(ids, pos, labels=labels, loss_mask=mask, exit_loss_weights=[1.0])
    # a checkpoint split for another process layout is refused
    convert_hf_to_mcore(tmp_path / "fam", tmp_path / "mc2", tp=2)
    with pytest.raises(ValueError, match="split tp=2, pp=1; this process group is tp=1, pp=1"):
        load_model(tmp_path / "mc2")
    with pytest.raises(ValueError, match="no megatron_split.json"):
        load_model(tmp_path / "fam")


def test_training_step_matches_hf_and_saves_back(tmp_path, megatron_world):
    """One SGD step on the multi-exit loss: megatron weights, converted back to HF, equal the HF step's."""
    from ruyi_model.megatron import familial_loss_func, load_model
    from ruyi_model.megatron.convert import finalize_split, save_rank_state_dict

    fam = make_family(exits=(1, 2, 4))
    fam.save_pretrained(tmp_path / "fam")
    convert_hf_to_mcore(tmp_path / "fam", tmp_path / "mc")
    model = load_model(tmp_path / "mc").train()
    fam.train()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    pos, labels, mask = megatron_batch(ids)
    opt_m = torch.optim.SGD(model.parameters(), lr=0.5)
    opt_h = torch.optim.SGD(fam.parameters(), lr=0.5)
    for _ in range(2):
        loss_m, _ = familial_loss_func(mask, model(ids, pos, labels=labels, loss_mask=mask))
        loss_h = fam(ids, labels=ids).loss
        assert abs(loss_m.item() - loss_h.item()) <= 1e-5
        for opt, loss in ((opt_m, loss_m), (opt_h, loss_h)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_rank_state_dict(model.state_dict(), tmp_path / "mc", 0, 0)
    finalize_split(tmp_path / "mc")
    convert_mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    trained = fam.state_dict()
    assert sorted(back) == sorted(trained)
    moved = 0
    for k, v in back.items():
        assert (v - trained[k]).abs().max().item() <= 1e-5, k
        moved += not torch.equal(v, load_file(str(tmp_path / "fam" / "model.safetensors"))[k])
    assert moved == len(back)  # every tensor (each member's head and norm included) was trained


def test_conversion_keeps_family_and_stock_exports_bitwise(tmp_path, megatron_world):
    from ruyi_model.megatron import load_model
    from ruyi_model.megatron.convert import finalize_split, save_rank_state_dict

    fam = make_family(exits=(1, 3, 4), dae=[1, 0, 0])
    fam.save_pretrained(tmp_path / "fam")
    convert_hf_to_mcore(tmp_path / "fam", tmp_path / "mc", tp=2, pp=2)
    convert_mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    # a TP=1 megatron model loads and saves its weights unchanged
    convert_hf_to_mcore(tmp_path / "back", tmp_path / "mc1")
    model = load_model(tmp_path / "mc1")
    save_rank_state_dict(model.state_dict(), tmp_path / "mc1", 0, 0)
    finalize_split(tmp_path / "mc1")
    convert_mcore_to_hf(tmp_path / "mc1", tmp_path / "back1")
    again = FamilialForCausalLM.from_pretrained(tmp_path / "back1").eval()
    ref_sd, got_sd = fam.state_dict(), again.state_dict()
    assert sorted(ref_sd) == sorted(got_sd)
    assert all(torch.equal(ref_sd[k], got_sd[k]) for k in ref_sd)
    export_exits(fam, tmp_path / "exp_ref")
    export_exits(again, tmp_path / "exp_got")
    for d in fam.config.exit_layers:
        a = load_file(str(tmp_path / "exp_ref" / f"exit_{d}" / "model.safetensors"))
        b = load_file(str(tmp_path / "exp_got" / f"exit_{d}" / "model.safetensors"))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), d


def test_megatron_optimizer_and_schedule_match_hf_adamw(tmp_path, megatron_world):
    """megatron DDP + get_megatron_optimizer (Adam) + the no-pipelining schedule over 2 micro-batches,
    3 steps, against torch AdamW on the HF family with the full batch (equal token counts per micro-batch)."""
    from ruyi_model.megatron import load_model
    from ruyi_model.megatron.train import batch_from_tokens, train_step, wrap_for_training

    fam = make_family(exits=(2, 4), weights=[0.4, 1.0])
    fam.save_pretrained(tmp_path / "fam")
    convert_hf_to_mcore(tmp_path / "fam", tmp_path / "mc")
    model = load_model(tmp_path / "mc").train()
    ddp, opt = wrap_for_training(model, lr=1e-3, optimizer="adam", weight_decay=0.0)
    fam.train()
    opt_h = torch.optim.AdamW(fam.parameters(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    ids = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(3))
    micro = [batch_from_tokens(c) for c in ids.chunk(2)]
    for _ in range(3):
        got = train_step(ddp, opt, micro)
        ref = fam(ids, labels=ids)
        assert abs(got["loss"] - ref.loss.item()) <= 1e-5
        assert all(abs(got["exit_losses"][d] - ref.exit_losses[d].item()) <= 1e-5 for d in (2, 4))
        opt_h.zero_grad()
        ref.loss.backward()
        opt_h.step()
    trained = {k: v.detach() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    qkv = trained["decoder.layers.1.self_attention.linear_qkv.weight"].reshape(2, 4, 16, 64)
    hf_layer = fam.model.layers[1].self_attn
    assert (qkv[:, :2].reshape(64, 64) - hf_layer.q_proj.weight).abs().max().item() <= 1e-5
    assert (trained["exits.2.output_layer.weight"] - fam.exits["2"].lm_head.weight).abs().max().item() <= 1e-5
    assert (trained["output_layer.weight"] - fam.exits["4"].lm_head.weight).abs().max().item() <= 1e-5
    moved = (
        trained["exits.2.final_layernorm.weight"]
        - load_file(str(tmp_path / "fam" / "model.safetensors"))["exits.2.norm.weight"]
    )
    assert moved.abs().max().item() > 1e-4  # the shallow member's own norm was trained


def test_megatron_grad_clipping_matches_torch(tmp_path, megatron_world):
    """megatron's global-norm clipping (on the CPU through cpu_shim) = torch's clip_grad_norm_ + AdamW."""
    from ruyi_model.megatron import load_model
    from ruyi_model.megatron.train import batch_from_tokens, train_step, wrap_for_training

    fam = make_family(exits=(2, 4), weights=[0.4, 1.0])
    fam.save_pretrained(tmp_path / "fam")
    convert_hf_to_mcore(tmp_path / "fam", tmp_path / "mc")
    model = load_model(tmp_path / "mc").train()
    ddp, opt = wrap_for_training(model, lr=1e-2, weight_decay=0.0, clip_grad=0.05)
    fam.train()
    opt_h = torch.optim.AdamW(fam.parameters(), lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    for _ in range(2):
        train_step(ddp, opt, [batch_from_tokens(ids)])
        opt_h.zero_grad()
        fam(ids, labels=ids).loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(fam.parameters(), 0.05)
        assert norm > 0.05  # the clipping is active
        opt_h.step()
    trained = model.state_dict()
    assert (trained["output_layer.weight"] - fam.exits["4"].lm_head.weight).abs().max().item() <= 1e-5
    assert (trained["exits.2.output_layer.weight"] - fam.exits["2"].lm_head.weight).abs().max().item() <= 1e-5


def test_layer_recompute_gives_the_same_step(tmp_path, megatron_world):
    """`recompute_layers` (activation recomputation) changes memory, not the numbers: same losses and
    weights after 2 steps (bitwise on the CPU)."""
    from ruyi_model.megatron import load_model
    from ruyi_model.megatron.train import batch_from_tokens, train_step, wrap_for_training

    make_family(exits=(2, 4), weights=[0.4, 1.0]).save_pretrained(tmp_path / "fam")
    convert_hf_to_mcore(tmp_path / "fam", tmp_path / "mc")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    runs = []
    for recompute in (False, True):
        model = load_model(tmp_path / "mc").train()
        model.recompute_layers = recompute
        ddp, opt = wrap_for_training(model, lr=1e-2, weight_decay=0.1)
        losses = [train_step(ddp, opt, [batch_from_tokens(ids)]) for _ in range(2)]
        runs.append((losses, {k: v.clone() for k, v in model.state_dict().items() if "_extra" not in k}))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


# --- two processes (gloo): TP=2 and PP=2 -------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_two_process_split_matches_hf(tmp_path, tp, pp):
    """torchrun with 2 gloo ranks runs `python -m ruyi_model.megatron.train`. Every member's logits equal
    the HF family's to 1e-4 (seen: ~3e-7); with PP=2 member 1 is on stage 0 (branching from the
    embedding), members 3 and 4 on stage 1 (member 3 branching from the received input). 2 SGD steps
    over 2 micro-batches give each member's CE and, converted back, the weights of the same steps on the
    HF family (1e-5)."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import save_file

    fam = make_family(exits=(1, 3, 4), weights=[0.3, 0.5, 1.0])
    fam.save_pretrained(tmp_path / "fam")
    convert_hf_to_mcore(tmp_path / "fam", tmp_path / "mc", tp=tp, pp=pp)
    ids = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(4))
    save_file({"input_ids": ids}, str(tmp_path / "tokens.safetensors"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "ruyi_model.megatron.train",
        "--mcore-dir",
        str(tmp_path / "mc"),
        "--tokens",
        str(tmp_path / "tokens.safetensors"),
        "--tp",
        str(tp),
        "--pp",
        str(pp),
        "--steps",
        "2",
        "--lr",
        "0.5",
        "--optimizer",
        "sgd",
        "--micro-batches",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--save",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    seen: dict[int, list] = {}
    for t in range(tp):
        for p in range(pp):
            for d, logits in load_file(str(tmp_path / "out" / f"logits_tp{t}_pp{p}.safetensors")).items():
                seen.setdefault(int(d), []).append(p)
                with torch.no_grad():
                    ref = fam(ids, exit_layer=int(d)).logits
                assert (logits - ref).abs().max().item() <= 1e-4, (t, p, d)
    assert seen == ({1: [0] * tp, 3: [0] * tp, 4: [0] * tp} if pp == 1 else {1: [0], 3: [1], 4: [1]})

    history = [json.loads((tmp_path / "out" / f"losses_tp0_pp{p}.json").read_text()) for p in range(pp)]
    fam.train()
    opt = torch.optim.SGD(fam.parameters(), lr=0.5)
    for step in range(2):
        ref = fam(ids, labels=ids)
        for p in range(pp):
            for d, ce in history[p][step]["exit_losses"].items():
                assert abs(ce - ref.exit_losses[int(d)].item()) <= 1e-5, (step, p, d)
        opt.zero_grad()
        ref.loss.backward()
        opt.step()
    convert_mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    trained = fam.state_dict()
    assert sorted(back) == sorted(trained)
    for k, v in back.items():
        assert (v - trained[k]).abs().max().item() <= 1e-5, k
