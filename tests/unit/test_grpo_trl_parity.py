"""Our GRPO loss (`tasks.training.rl_algos.per_token_logps` + `policy_loss`) equals TRL's `GRPOTrainer` loss.

TRL 1.16's own `compute_loss` runs on a fixed batch:
a stock `Qwen3ForCausalLM` saved to a tmp dir, a WordLevel tokenizer, left-padded prompts,
right-padded completions of different lengths, old log-probs that put 60%+ of the tokens outside the
clip range (so clipping is exercised), and reference log-probs for beta > 0. Loss and every
parameter gradient must match at atol 1e-6 for every loss type and beta in {0, 0.04}.
"""

from __future__ import annotations

import pytest
import torch

from tasks.training.rl_algos import per_token_logps, policy_loss

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
BETAS = [0.0, 0.04]
TEMPERATURE = 0.7
MAX_COMPLETION = 8
EPS, EPS_HIGH = 0.2, 0.28


@pytest.fixture(scope="module")
def trl_setup(tmp_path_factory):
    """Saved tiny Qwen3 + tokenizer, the fixed batch, and a factory of TRL trainers (TRL imported once)."""
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    root = tmp_path_factory.mktemp("trl")
    vocab = {f"w{i}": i for i in range(62)} | {"<pad>": 62, "<eos>": 63}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="w0")), pad_token="<pad>", eos_token="<eos>"
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            pad_token_id=62,
            eos_token_id=63,
        )
    )
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    gen = torch.Generator().manual_seed(1)
    b, p, c = 4, 3, 5
    prompt_ids = torch.randint(0, 62, (b, p), generator=gen)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_ids[1, 0], prompt_mask[1, 0] = 62, 0  # one left-padded prompt
    completion_ids = torch.randint(0, 62, (b, c), generator=gen)
    completion_mask = torch.zeros(b, c, dtype=torch.long)
    for row, length in enumerate([5, 3, 4, 2]):
        completion_mask[row, :length] = 1
        completion_ids[row, length:] = 62
    advantages = torch.tensor([0.9, -0.9, -0.5, 0.5])

    with torch.no_grad():
        # Reference = the saved weights; policy = saved weights + noise; old = policy logps + noise.
        ref_logps = per_token_logps(
            model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=TEMPERATURE
        )
        for prm in model.parameters():
            prm.add_(0.05 * torch.randn(prm.shape, generator=gen))
        policy_state = {k: v.clone() for k, v in model.state_dict().items()}
        cur = per_token_logps(
            model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=TEMPERATURE
        )
        old_logps = (cur + 0.5 * torch.randn(cur.shape, generator=gen)) * completion_mask
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": old_logps,
        "ref_per_token_logps": ref_logps,
        "num_items_in_batch": completion_mask.sum(),
    }
    dataset = Dataset.from_dict({"prompt": ["w1 w2", "w3 w4"]})

    def make_trainer(loss_type: str, beta: float):
        args = GRPOConfig(
            output_dir=str(root / f"out-{loss_type}-{beta}"),
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=MAX_COMPLETION,
            loss_type=loss_type,
            beta=beta,
            epsilon=EPS,
            epsilon_high=EPS_HIGH,
            temperature=TEMPERATURE,
            use_cpu=True,
            bf16=False,
            activation_checkpointing=False,
            report_to="none",
            logging_strategy="no",
            save_strategy="no",
        )
        trainer = GRPOTrainer(
            model=str(model_dir),
            reward_funcs=lambda completions, **kw: [0.0] * len(completions),
            args=args,
            train_dataset=dataset,
            processing_class=tok,
        )
        trainer.model.load_state_dict(policy_state)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # only HF's training loop sets it
        return trainer

    return {"batch": batch, "make_trainer": make_trainer, "old_logps": old_logps, "cur": cur}


def test_batch_exercises_clipping(trl_setup):
    """The fixed batch must push many tokens outside the clip range, or the parity test proves little."""
    ratio = torch.exp(trl_setup["cur"] - trl_setup["old_logps"])[trl_setup["batch"]["completion_mask"].bool()]
    outside = ((ratio < 1 - EPS) | (ratio > 1 + EPS_HIGH)).float().mean()
    assert outside > 0.3


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_matches_trl(trl_setup, loss_type, beta):
    trainer = trl_setup["make_trainer"](loss_type, beta)
    model, batch = trainer.model, trl_setup["batch"]

    model.zero_grad(set_to_none=True)
    trl_loss = trainer.compute_loss(model, dict(batch))
    trl_loss.backward()
    trl_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad(set_to_none=True)
    logps = per_token_logps(
        model,
        batch["prompt_ids"],
        batch["prompt_mask"],
        batch["completion_ids"],
        batch["completion_mask"],
        temperature=TEMPERATURE,
    )
    ours, stats = policy_loss(
        logps,
        batch["advantages"],
        batch["completion_mask"],
        old_logps=batch["old_per_token_logps"],
        ref_logps=batch["ref_per_token_logps"] if beta else None,
        beta=beta,
        epsilon=EPS,
        epsilon_high=EPS_HIGH,
        loss_type=loss_type,
        max_completion_length=MAX_COMPLETION,
        num_items_in_batch=batch["num_items_in_batch"],
    )
    ours.backward()
    our_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    assert abs(float(ours.detach()) - float(trl_loss.detach())) <= 1e-6, (
        float(ours.detach()),
        float(trl_loss.detach()),
    )
    assert our_grads.keys() == trl_grads.keys() and len(our_grads) > 0
    worst = max(float((our_grads[n] - trl_grads[n]).abs().max()) for n in our_grads)
    assert worst <= 1e-6, worst
    assert max(float(g.abs().max()) for g in our_grads.values()) > 1e-3  # gradients are not trivially zero
    assert stats["clip_ratio"] > 0.0
    if beta:
        assert stats["kl"] > 0.0
