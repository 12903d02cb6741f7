"""The rl stage and its algorithms (tasks/rl.py, tasks/training/rl_algos.py) on a micro family.

The micro task: a word-level chat tokenizer, a 2-layer family with exits [1, 2] and one DaE block on
member 1, briefly supervised to answer "#### <digit>" with a random digit; the RL prompts' answer
is always 7, so RL has to move the DaE member from ~10% to most answers correct.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import yaml

from tasks.core.artifacts import load_family, save_family
from tasks.core.params import RLParams, load_params
from tasks.core.stage import StageError
from tasks.training import rl_algos as A
from tests.scripts import load_script

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["[UNK]", "user", "assistant", "what", "is", "the", "answer", "to", "?", "####", "so"] + [
    str(i) for i in range(10)
]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token="[UNK]",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = TEMPLATE
    return tok


def make_model(tok, seed: int = 0):
    from ruyi_model import FamilialConfig, FamilialForCausalLM

    cfg = FamilialConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        exit_layers=[1, 2],
        dae_blocks=[1, 0],
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return FamilialForCausalLM(cfg)


def questions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"what is the answer to {rng.randint(0, 9)} ?" for _ in range(n)]


def sft_warmup(model, tok, steps: int = 40) -> None:
    """Teaches both members the format `so* #### <digit>`; the digit is 3 in 30% of the answers and
    uniform over 0-9 otherwise, so greedy decoding answers 3 and sampling finds 7 about 7% of the time."""
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for s in range(steps):
        ids_list, label_list = [], []
        for q in questions(16, 1000 + s):
            prompt = tok(
                tok.apply_chat_template(
                    [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
                ),
                add_special_tokens=False,
            )["input_ids"]
            digit = 3 if rng.random() < 0.3 else rng.randint(0, 9)
            resp = " ".join(["so"] * rng.randint(0, 3) + ["####", str(digit)]) + "<|im_end|>"
            full = prompt + tok(resp, add_special_tokens=False)["input_ids"]
            ids_list.append(full)
            label_list.append([-100] * len(prompt) + full[len(prompt) :])
        width = max(map(len, ids_list))
        ids = torch.full((16, width), tok.pad_token_id)
        labels = torch.full((16, width), -100)
        attn = torch.zeros((16, width), dtype=torch.long)
        for i, (x, y) in enumerate(zip(ids_list, label_list)):
            ids[i, : len(x)], labels[i, : len(y)], attn[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        loss = sum(
            model(input_ids=ids, attention_mask=attn, labels=labels, exit_layer=d).loss for d in (1, 2)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """(tokenizer, SFT-warmed model state dict, saved SFT dir)."""
    tok = make_tokenizer()
    model = make_model(tok)
    sft_warmup(model, tok)
    sft_dir = tmp_path_factory.mktemp("sft") / "sft"
    save_family(model, tok, sft_dir)
    return tok, {k: v.clone() for k, v in model.state_dict().items()}, sft_dir


def fresh_model(micro):
    tok, state, _ = micro
    model = make_model(tok)
    model.load_state_dict(state)
    return model


def rl_rows(n: int, seed: int = 7) -> list[dict]:
    return [
        {"id": f"rl-{i}", "question": q, "answer": "7", "level": 1} for i, q in enumerate(questions(n, seed))
    ]


# --- sampling, rewards, advantages --------------------------------------------------------------


@pytest.mark.parametrize("sampler", A.SAMPLERS)
def test_sampler_equals_uncached_sampling_with_left_padding(micro, sampler):
    """The KV-cached batched sampler draws exactly what a no-cache loop over softmax(logits/T) draws,
    the loop written out here with each sampler's rule (inverse CDF in float64, or the exponential race)."""
    tok = micro[0]
    model = fresh_model(micro).eval()
    prompt_ids, prompt_mask = A.encode_chat_prompts(tok, ["what is the answer to 3 ?", "what is 5 ?"])
    assert prompt_mask[1, 0] == 0  # the second prompt is left-padded
    stops = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    comp, cmask, truncated = A.sample_completions(
        model,
        prompt_ids,
        prompt_mask,
        exit_layer=1,
        max_new_tokens=6,
        stop_ids=stops,
        pad_id=tok.pad_token_id,
        temperature=0.8,
        generator=torch.Generator().manual_seed(3),
        sampler=sampler,
    )
    gen = torch.Generator().manual_seed(3)
    ids, attn = prompt_ids.clone(), prompt_mask.clone()
    done = torch.zeros(2, dtype=torch.bool)
    expected = []
    with torch.no_grad():
        for _ in range(comp.shape[1]):
            logits = (
                model(
                    input_ids=ids,
                    attention_mask=attn,
                    position_ids=A.positions_from_mask(attn),
                    exit_layer=1,
                    use_cache=False,
                )
                .logits[:, -1]
                .float()
            )
            probs = torch.softmax(logits / 0.8, -1)
            if sampler == "race":
                tok_next = (probs / torch.empty_like(probs).exponential_(1.0, generator=gen)).argmax(-1)
            else:
                u = torch.rand(2, dtype=torch.float64, generator=gen)
                cdf = probs.double().cumsum(-1)
                tok_next = torch.tensor([int((c > x * c[-1]).nonzero()[0]) for c, x in zip(cdf, u)])
            tok_next = torch.where(done, torch.full_like(tok_next, tok.pad_token_id), tok_next)
            expected.append(tok_next)
            done |= torch.isin(tok_next, torch.tensor(stops))
            ids = torch.cat([ids, tok_next[:, None]], 1)
            attn = torch.cat([attn, torch.ones(2, 1, dtype=torch.long)], 1)
    assert torch.equal(comp, torch.stack(expected, 1))
    for row in range(2):  # the mask covers the tokens up to and including the stop token
        stop_at = [k for k, t in enumerate(comp[row].tolist()) if t in stops]
        n = stop_at[0] + 1 if stop_at else comp.shape[1]
        assert cmask[row].tolist() == [1] * n + [0] * (comp.shape[1] - n)
        assert bool(truncated[row]) == (not stop_at)


@pytest.mark.parametrize("sampler", A.SAMPLERS)
def test_sampler_draws_from_the_softmax_distribution(micro, sampler):
    """The sampler's first tokens follow softmax(logits / T) of the member empirically."""
    tok = micro[0]
    model = fresh_model(micro).eval()
    ids, mask = A.encode_chat_prompts(tok, ["what is the answer to 3 ?"])
    n = 20000
    comp, _, _ = A.sample_completions(
        model,
        ids.expand(n, -1),
        mask.expand(n, -1),
        exit_layer=1,
        max_new_tokens=1,
        stop_ids=[tok.convert_tokens_to_ids("<|im_end|>")],
        pad_id=tok.pad_token_id,
        temperature=4.0,
        generator=torch.Generator().manual_seed(0),
        sampler=sampler,
    )
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, exit_layer=1).logits[0, -1]
    want = torch.softmax(logits / 4.0, -1)
    freq = torch.bincount(comp[:, 0], minlength=want.numel()).float() / n
    assert (want > 0.02).sum() >= 3  # a spread-out distribution, or the check proves little
    assert torch.allclose(freq, want, atol=0.012), (freq, want)


@pytest.mark.parametrize("sampler", A.SAMPLERS)
def test_draw_tokens_never_draws_a_zero_probability_token(sampler):
    """Zero-probability tokens (at either end and between) are never drawn, the others at their rates,
    and a row's draw does not depend on which other rows are decoded (the compaction invariant)."""
    probs = torch.tensor([0.0, 0.3, 0.0, 0.7, 0.0]).expand(200_000, -1)
    rows = torch.arange(200_000)
    got = A.draw_tokens(probs, rows, 200_000, torch.Generator().manual_seed(1), sampler)
    counts = torch.bincount(got, minlength=5)
    assert counts[[0, 2, 4]].sum() == 0
    assert abs(counts[1].item() / 200_000 - 0.3) < 0.005
    some = torch.tensor([3, 17, 199_999])
    alone = A.draw_tokens(probs[some], some, 200_000, torch.Generator().manual_seed(1), sampler)
    assert torch.equal(alone, got[some])
    with pytest.raises(ValueError, match="sampler must be one of"):
        A.sample_completions(
            None,
            torch.ones(1, 1),
            torch.ones(1, 1),
            exit_layer=1,
            max_new_tokens=1,
            stop_ids=[0],
            pad_id=0,
            sampler="multinomial",
        )


def test_greedy_sampler_matches_generate(micro):
    tok = micro[0]
    model = fresh_model(micro).eval()
    ids, mask = A.encode_chat_prompts(tok, ["what is the answer to 3 ?", "what is 5 ?"])
    stops = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    comp, cmask, _ = A.sample_completions(
        model,
        ids,
        mask,
        exit_layer=1,
        max_new_tokens=5,
        stop_ids=stops,
        pad_id=tok.pad_token_id,
        do_sample=False,
    )
    ref = model.generate(
        ids,
        attention_mask=mask,
        exit_layer=1,
        do_sample=False,
        max_new_tokens=5,
        eos_token_id=stops,
        pad_token_id=tok.pad_token_id,
    )[:, ids.shape[1] :]
    width = min(ref.shape[1], comp.shape[1])
    assert torch.equal((comp * cmask)[:, :width], (ref[:, :width] * cmask[:, :width]))


def dae_trainer(model, tok, rows: list[dict], cfg: RLParams, seed: int):
    """An RLTrainer of the DaE member (`rl.members: dae`), as the stage builds it."""
    from tasks.training.rl_trainer import RLTrainer, resolve_members, trainable_parameters

    members = resolve_members(model.config, "dae")
    return RLTrainer(
        model,
        tok,
        rows,
        cfg,
        members=members,
        trainable=trainable_parameters(model, "dae", members),
        seed=seed,
    )


def _sample(model, tok, questions_, g, seed, **kw):
    ids, mask = A.encode_chat_prompts(tok, questions_)
    return A.sample_completions(
        model,
        ids.repeat_interleave(g, 0),
        mask.repeat_interleave(g, 0),
        exit_layer=1,
        max_new_tokens=kw.pop("max_new_tokens", 8),
        stop_ids=[tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id],
        pad_id=tok.pad_token_id,
        group_size=g,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )


@pytest.mark.parametrize("do_sample,sampler", [(True, "inverse_cdf"), (True, "race"), (False, "inverse_cdf")])
def test_shared_prefill_and_compaction_keep_the_samples(micro, do_sample, sampler):
    """Prefilling each prompt once for its G rows, dropping finished rows from the decoded batch and
    decoding with the static decoder change the work only: same tokens, masks and truncation flags
    for a fixed seed."""
    tok = micro[0]
    model = fresh_model(micro).eval()
    qs = ["what is the answer to 3 ?", "what is 5 ?", "what is the 2 ?"]  # left padding included
    plain = _sample(model, tok, qs, 4, 11, do_sample=do_sample, sampler=sampler)
    lengths = plain[1].sum(1)
    assert lengths.min() < lengths.max()  # rows finish at different steps: compaction happens
    settings = [(True, False, "hf"), (False, True, "hf"), (True, True, "hf")]
    settings += [(False, False, "static"), (True, True, "static")]
    for share, compact, engine in settings:
        fast = _sample(
            model,
            tok,
            qs,
            4,
            11,
            do_sample=do_sample,
            share_prefill=share,
            compact=compact,
            sampler=sampler,
            engine=engine,
        )
        for a, b in zip(plain, fast):
            assert torch.equal(a, b), (share, compact, engine)
    ids, mask = A.encode_chat_prompts(tok, qs)
    with pytest.raises(ValueError, match="repeated group_size times"):
        A.sample_completions(
            model,
            ids[:2],
            mask[:2],
            exit_layer=1,
            max_new_tokens=2,
            stop_ids=[0],
            pad_id=1,
            group_size=2,
            share_prefill=True,
        )
    with pytest.raises(ValueError, match="engine must be one of"):
        _sample(model, tok, qs, 4, 11, engine="vllm")
    stock = _stock_causal_lm(tok)
    with pytest.raises(ValueError, match="engine 'static' decodes a family member: pass exit_layer"):
        A.sample_completions(
            stock, ids, mask, exit_layer=None, max_new_tokens=2, stop_ids=[0], pad_id=1, engine="static"
        )


def _stock_causal_lm(tok):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            pad_token_id=tok.pad_token_id,
        )
    )


def test_a_refused_static_decoder_leaves_the_model_in_training_mode(micro):
    """A model the static decoder refuses is named, and sample_completions hands it back in the mode
    it came in (training here), as after a normal rollout."""
    tok = micro[0]
    model = fresh_model(micro).train()
    model.exits["1"].layers[0].self_attn.sliding_window = 3
    with pytest.raises(ValueError, match="sliding-window attention is not supported by the static decoder"):
        _sample(model, tok, ["what is 5 ?"], 2, 0, share_prefill=True, engine="static")
    assert model.training


@pytest.mark.parametrize("engine", A.ENGINES)
def test_group_early_stop_keeps_the_bppo_pair(micro, engine):
    """The early group stop cuts only rows that can no longer be selected: every other row and the
    (shortest correct, shortest incorrect) pair of each group are those of the full rollout."""
    tok = micro[0]
    model = fresh_model(micro).eval()
    qs = [f"what is the answer to {i} ?" for i in range(6)]
    g = 8
    golds = ["3"] * (len(qs) * g)  # the warmed-up member answers 3 about 30% of the time

    def judge(idx, ids, mask):
        texts = A.decode_completions(tok, ids, mask)
        return A.score_responses(texts, [golds[i] for i in idx], 0.0)[1]

    full = _sample(model, tok, qs, g, 5, max_new_tokens=12, share_prefill=True, compact=True, engine=engine)
    stopper = A.GroupEarlyStop(g, judge)
    cut = _sample(
        model,
        tok,
        qs,
        g,
        5,
        max_new_tokens=12,
        share_prefill=True,
        compact=True,
        early_stop=stopper,
        engine=engine,
    )
    stopped = stopper.stopped
    assert stopped.any() and not stopped.all()
    n_full, n_cut = full[1].sum(1), cut[1].sum(1)
    assert torch.equal(n_full[~stopped], n_cut[~stopped])
    for row in range(len(golds)):  # a stopped row is the start of the full rollout's row
        m = int(n_cut[row])
        assert torch.equal(cut[0][row, :m], full[0][row, :m])
        if stopped[row]:
            assert bool(cut[2][row]) and m < int(n_full[row])
    correct_full = judge(list(range(len(golds))), full[0], full[1])
    correct_cut = judge(list(range(len(golds))), cut[0], cut[1])
    sel_full = A.bppo_select(correct_full, n_full, g)
    sel_cut = A.bppo_select(correct_cut, n_cut, g, eligible=~stopped)
    assert sel_full.pairs == sel_cut.pairs and sel_full.pairs
    assert cut[1].sum() < full[1].sum()  # fewer tokens decoded


def test_rewards_exact_answer_and_format():
    texts = ["so #### 7", "#### 7 apples", "#### 3", "7", "#### 7.0\n", "####", "#### 7\nso"]
    rewards, correct = A.score_responses(texts, ["7"] * 7, format_reward=0.1)
    assert correct.tolist() == [True, True, False, False, True, False, True]
    assert torch.allclose(rewards, torch.tensor([1.1, 1.0, 0.1, 0.0, 1.1, 0.0, 1.0]))
    with pytest.raises(ValueError, match="2 responses but 1"):
        A.score_responses(["a", "b"], ["1"], 0.1)


def test_group_advantages_formula():
    # TRL's own numbers (GRPOTrainer._compute_loss): unbiased std + 1e-4.
    adv = A.group_advantages(torch.tensor([1.0, 0.0, 0.5, 2.0]), 2)
    assert torch.allclose(adv, torch.tensor([0.707007, -0.707007, -0.707040, 0.707040]), atol=1e-6)
    r = torch.tensor([0.0, 1.1, 0.1, 1.0, 0.0, 0.0, 0.0, 0.0])
    for g in (4, 2):
        groups = r.view(-1, g)
        want = (
            (groups - groups.mean(1, keepdim=True))
            / (torch.tensor([statistics_std(row) for row in groups.tolist()])[:, None] + 1e-4)
        ).view(-1)
        assert torch.allclose(A.group_advantages(r, g), want, atol=1e-6)
    assert torch.equal(A.group_advantages(torch.zeros(4), 4), torch.zeros(4))  # degenerate group: no signal
    groups = r.view(-1, 4)
    assert torch.allclose(
        A.group_advantages(r, 4, scale="none"), (groups - groups.mean(1, keepdim=True)).view(-1)
    )
    assert torch.allclose(
        A.group_advantages(r, 4, scale="batch"),
        (groups - groups.mean(1, keepdim=True)).view(-1) / (statistics_std(r.tolist()) + 1e-4),
    )
    with pytest.raises(ValueError, match="groups of 3"):
        A.group_advantages(r, 3)


def statistics_std(values: list[float]) -> float:
    import statistics

    return statistics.stdev(values)


# --- the loss -------------------------------------------------------------------------------------


def test_bppo_loss_is_the_reference_formula():
    """dapo over the prefix mask = -(1/sum P_i) sum_i sum_{t<P_i} min(r A, clip(r) A) (BPPO paper)."""
    gen = torch.Generator().manual_seed(0)
    logps = torch.randn(4, 6, generator=gen, requires_grad=True)
    old = logps.detach() + 0.4 * torch.randn(4, 6, generator=gen)
    adv = torch.tensor([1.2, -0.4, 0.8, -1.1])
    plen = torch.tensor([3, 1, 6, 2])
    mask = A.prefix_mask(plen, 6)
    loss, _ = A.policy_loss(logps, adv, mask, old_logps=old, epsilon=0.2, epsilon_high=0.28, loss_type="dapo")
    total = 0.0
    for i in range(4):
        for t in range(int(plen[i])):
            r = math.exp(float(logps[i, t].detach()) - float(old[i, t]))
            total += min(r * float(adv[i]), min(max(r, 0.8), 1.28) * float(adv[i]))
    assert abs(float(loss.detach()) - (-total / int(plen.sum()))) < 1e-5
    loss.backward()
    assert torch.all(logps.grad[mask == 0] == 0)  # no gradient beyond the prefixes


def test_policy_loss_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="ref_logps"):
        A.policy_loss(x, torch.zeros(2), x, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        A.policy_loss(x, torch.zeros(2), x, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        A.policy_loss(x, torch.zeros(2), x, loss_type="ppo")


# --- BPPO selection, prefixes, adaptive budget ----------------------------------------------------


def test_bppo_selects_shortest_correct_and_incorrect_and_skips_degenerate_groups():
    correct = torch.tensor([0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 1], dtype=torch.bool)
    lengths = torch.tensor([5, 9, 4, 3, 2, 3, 4, 5, 1, 2, 3, 4, 7, 6, 6, 7])
    sel = A.bppo_select(correct, lengths, 4)
    # group 0: shortest correct row 2 (len 4), shortest incorrect row 3 (len 3); group 3: ties -> earlier.
    assert sel.pairs == [(2, 3), (12, 13)]
    assert sel.groups == [0, 3]
    assert sel.skipped == 2  # all correct (group 1) and all wrong (group 2)
    assert sel.shortest_correct == [4, 2, 7]
    assert sel.rows == [2, 3, 12, 13]
    with pytest.raises(ValueError, match="groups of 4"):
        A.bppo_select(correct[:6], lengths[:6], 4)


def test_prefix_rules_and_mask():
    comp = torch.tensor(
        [
            [5, 6, 7, 8, 9, 1],  # correct, length 6
            [5, 6, 2, 2, 1, 0],  # incorrect, length 5: common prefix with row 0 = 2 tokens
            [3, 4, 1, 0, 0, 0],  # correct, length 3
            [9, 4, 4, 4, 4, 1],  # incorrect, length 6: empty common prefix
            [3, 4, 1, 0, 0, 0],  # correct, length 3 (a prefix of row 5)
            [3, 4, 1, 5, 5, 5],
        ]
    )  # incorrect, length 6
    lengths = torch.tensor([6, 5, 3, 6, 3, 6])
    pairs = [(0, 1), (2, 3), (4, 5)]
    frac = A.prefix_lengths(comp, lengths, pairs, "fraction", fraction=0.5)
    assert frac.tolist() == [3, 3, 2, 3, 2, 3]  # ceil(0.5 * L)
    assert A.prefix_lengths(comp, lengths, pairs, "fraction", fraction=0.01).tolist() == [1] * 6  # >= 1 token
    assert A.prefix_lengths(comp, lengths, pairs, "first_k", k=4).tolist() == [4, 4, 3, 4, 3, 4]
    # common: shared prefix + the first diverging token; empty shared prefix -> 1 token; capped at L.
    assert A.prefix_lengths(comp, lengths, pairs, "common").tolist() == [3, 3, 1, 1, 3, 4]
    mask = A.prefix_mask(torch.tensor([3, 1, 6]), 6)
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="prefix rule"):
        A.prefix_lengths(comp, lengths, pairs, "suffix")


def test_adaptive_budget_follows_shortest_correct_lengths():
    b = A.AdaptiveBudget(max_new_tokens=48, min_tokens=8, margin=1.5, ema_decay=0.5)
    assert b.budget == 48
    assert b.update([10, 20, 12]) == 30  # ema = 20 (max of the step), ceil(1.5 * 20)
    assert b.update([10]) == 23  # ema = 0.5*20 + 0.5*10 = 15 -> 22.5 -> 23
    assert b.update([4, 2]) == 15  # ema = 9.5 -> 14.25 -> 15
    for _ in range(10):
        b.update([2])
    assert b.budget == 8  # floor
    assert b.update([]) == 12  # no correct response: grow by the margin
    assert b.update([]) == 18
    assert b.update([100]) == 48  # ceiling
    state = b.state_dict()
    c = A.AdaptiveBudget(48, 8, 1.5, 0.5)
    c.load_state_dict(state)
    assert c.update([30]) == b.update([30])
    with pytest.raises(ValueError):
        A.AdaptiveBudget(max_new_tokens=8, min_tokens=9, margin=1.5)


# --- training ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["grpo", "bppo"])
def test_rl_raises_reward_and_only_the_dae_member_changes(micro, algorithm):
    from tasks.training.rl_trainer import RLTrainer, evaluate_members, resolve_members, trainable_parameters

    tok = micro[0]
    model = fresh_model(micro)
    rows = rl_rows(48)
    eval_rows, train_rows = rows[:16], rows[16:]
    # 40 steps: BPPO learns only from groups holding a correct and an incorrect answer, and at 25 steps
    # it had passed on 2 of 6 trainer seeds (race sampler) and 4 of 6 (inverse CDF); at 40, 7 of 8
    # with either sampler (GRPO: every seed at 25). A seed where no group ever mixes stays at 0.1.
    cfg = RLParams(
        algorithm=algorithm,
        steps=40,
        prompts_per_step=4,
        group_size=8,
        max_new_tokens=8,
        lr=5e-3,
        eval_prompts=16,
    )
    members = resolve_members(model.config, "dae")
    assert members == [1]
    trainable = trainable_parameters(model, "dae", members)
    names = {n for n, _ in trainable}
    assert names and all(
        n.startswith(("exits.1.layers.1.", "exits.1.norm.", "exits.1.lm_head.")) for n in names
    )
    probe = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        other_before = model(probe, exit_layer=2).logits.clone()
        dae_before = model(probe, exit_layer=1).logits.clone()
    before = evaluate_members(model, tok, eval_rows, members, 8, 0.1)[1]
    trainer = RLTrainer(model, tok, train_rows, cfg, members=members, trainable=trainable, seed=0)
    for _ in range(cfg.steps):
        trainer.step()
    after = evaluate_members(model, tok, eval_rows, members, 8, 0.1)[1]
    hist = trainer.history[1]
    first = sum(h["reward"] for h in hist[:5]) / 5
    last = sum(h["reward"] for h in hist[-5:]) / 5
    assert last > first + 0.2, (first, last)
    assert after["reward"] > before["reward"] and after["accuracy"] > before["accuracy"], (before, after)
    with torch.no_grad():
        assert torch.equal(model(probe, exit_layer=2).logits, other_before)  # other member bit-identical
        assert not torch.equal(model(probe, exit_layer=1).logits, dae_before)
    if algorithm == "bppo":
        assert sum(h["pairs"] for h in hist) > 0
        assert all(h["trained_tokens"] <= 2 * h["pairs"] * cfg.max_new_tokens for h in hist)


def test_adaptive_budget_cuts_generation_in_bppo(micro):

    tok = micro[0]
    model = fresh_model(micro)
    cfg = RLParams(
        algorithm="bppo",
        steps=6,
        prompts_per_step=4,
        group_size=8,
        max_new_tokens=24,
        lr=5e-3,
        eval_prompts=1,
        bppo={"adaptive_budget": True, "budget_min_tokens": 4, "budget_margin": 1.25},
    )
    trainer = dae_trainer(model, tok, rl_rows(40), cfg, seed=1)
    for _ in range(cfg.steps):
        trainer.step()
    budgets = [h["budget"] for h in trainer.history[1]]
    assert budgets[0] == 24 and min(budgets[1:]) < 12, budgets  # responses are ~2-6 tokens long
    assert all(h["length"] <= h["budget"] for h in trainer.history[1])


# --- the stage ---------------------------------------------------------------------------------------


def write_workspace(root, sft_dir, rows, overrides: dict | None = None):
    """A params file whose paths live under `root`, the SFT checkpoint and rl.jsonl in place."""
    import shutil

    (root / "data" / "validated").mkdir(parents=True, exist_ok=True)
    with open(root / "data" / "validated" / "rl.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    if sft_dir is not None:
        shutil.copytree(sft_dir, root / "artifacts" / "sft")
    raw = {
        "seed": 3,
        "paths": {
            k: str(root / v)
            for k, v in [
                ("data_dir", "data"),
                ("artifacts_dir", "artifacts"),
                ("metrics_dir", "metrics"),
                ("plots_dir", "plots"),
                ("reports_dir", "reports"),
            ]
        },
        "model": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "exit_layers": [1, 2],
        },
        "rl": {
            "steps": 4,
            "prompts_per_step": 2,
            "group_size": 4,
            "max_new_tokens": 8,
            "lr": 5e-3,
            "eval_prompts": 4,
            "checkpoint_every": 0,
            # the adaptive budget on (off by default), so that resumes and kills cover its state
            "bppo": {"adaptive_budget": True, "budget_min_tokens": 4},
        },
    }
    for key, value in (overrides or {}).items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_stage_writes_model_metrics_and_plots(micro, tmp_path):
    from tasks.rl import main

    params_file = write_workspace(tmp_path, micro[2], rl_rows(20), {"rl.eval_every": 3})
    assert main(["--params", str(params_file)]) == 0
    metrics = json.loads((tmp_path / "metrics" / "rl.json").read_text())
    for key in ("algorithm", "reward_start", "reward_end", "accuracy_start", "accuracy_end", "wall_time_s"):
        assert key in metrics
    # The held-out curve: before rl, every rl.eval_every steps (not at the last: that is "after"), after rl.
    held = metrics["exit_1"]["held_out_curve"]
    assert held["step"] == [0, 3, 4]
    assert (
        held["accuracy"][0] == metrics["accuracy_start"] and held["accuracy"][-1] == metrics["accuracy_end"]
    )
    assert held["reward"][0] == metrics["reward_start"] and held["reward"][-1] == metrics["reward_end"]
    reproducible = json.loads((tmp_path / "metrics" / "reproducible" / "rl.json").read_text())
    assert reproducible["exit_1"]["held_out_curve"] == held
    assert metrics["algorithm"] == "bppo" and metrics["members"] == [1]
    curves = metrics["exit_1"]["curves"]
    # Where the time and the work went (dvc metrics diff between grpo and bppo runs).
    assert metrics["tokens_generated"] == pytest.approx(sum(curves["tokens_generated"]))
    assert metrics["tokens_trained"] == pytest.approx(sum(curves["trained_tokens"]))
    assert 0 <= metrics["tokens_trained"] < metrics["tokens_generated"]  # BPPO: prefixes of 2 rows at most
    assert (
        metrics["rollout_time_s"] == pytest.approx(sum(curves["rollout_s"])) and metrics["rollout_time_s"] > 0
    )
    assert 0 <= metrics["loss_time_s"] + metrics["optimizer_time_s"] <= metrics["update_time_s"] + 1e-9
    assert len(curves["reward"]) == 4 and len(curves["length"]) == 4 and len(curves["kl"]) == 4
    assert (tmp_path / "plots" / "rl" / "curves.png").stat().st_size > 0
    lines = (tmp_path / "plots" / "rl" / "curves.csv").read_text().splitlines()
    assert lines[0].startswith("step,member,reward") and len(lines) == 5
    model, tok = load_family(tmp_path / "artifacts" / "rl")
    assert model.config.exit_layers == [1, 2]
    # Each held-out prompt's verdict before rl and at the kept step (the last here): what greedy decoding of
    # the SFT family and of the saved family answers on the held-out slice, and the means rl.json reports.
    from data_contracts.gates import check_rl_items_match
    from data_contracts.items import read_rl_items
    from tasks.training.rl_trainer import evaluate_members, split_rows

    items = read_rl_items(tmp_path / "reports" / "rl" / "items.jsonl")
    check_rl_items_match(items, reproducible, ("items.jsonl", "rl.json"))
    _, held_rows = split_rows(rl_rows(20), 4, tmp_path)  # rl.eval_prompts of write_workspace
    assert items.exits == (1,) and items.items == tuple(r["id"] for r in held_rows)
    for weights, column in ((micro[2], items.start), (tmp_path / "artifacts" / "rl", items.end)):
        family, tok = load_family(weights)
        greedy = evaluate_members(family, tok, held_rows, [1], 8, 0.1)[1]["correct"]
        assert column[:, 0].tolist() == [float(c) for c in greedy], weights


def test_stage_grpo_all_members_with_kl_and_reuse(micro, tmp_path):
    from tasks.rl import main

    params_file = write_workspace(
        tmp_path,
        micro[2],
        rl_rows(20),
        {
            "rl.algorithm": "grpo",
            "rl.members": "all",
            "rl.beta": 0.04,
            "rl.num_iterations": 2,
            "rl.steps": 2,
            "rl.loss_type": "grpo",
        },
    )
    assert main(["--params", str(params_file)]) == 0
    metrics = json.loads((tmp_path / "metrics" / "rl.json").read_text())
    assert metrics["members"] == [1, 2] and metrics["algorithm"] == "grpo"
    assert all(
        k > 0 for k in metrics["exit_2"]["curves"]["kl"][1:]
    )  # KL to the reference once the policy moved
    assert metrics["trainable_params"] == sum(p.numel() for p in load_family(micro[2])[0].parameters())


def test_resume_equals_uninterrupted_run(micro, tmp_path):
    from safetensors.torch import load_file

    from tasks.rl import main

    rows = rl_rows(20)
    # 4 prompts x 8 samples: every step has a reward signal (a gradient), so the optimizer state restored
    # from the checkpoint decides the later steps (with no gradient a lost Adam state would go unseen).
    signal = {"rl.prompts_per_step": 4, "rl.group_size": 8, "rl.eval_every": 1}
    straight = write_workspace(tmp_path / "straight", micro[2], rows, {"rl.steps": 4, **signal})
    assert main(["--params", str(straight)]) == 0
    # The held-out evaluations between steps never change training: the same run without them.
    quiet = write_workspace(tmp_path / "quiet", micro[2], rows, {"rl.steps": 4, **signal, "rl.eval_every": 0})
    assert main(["--params", str(quiet)]) == 0
    # An interrupted run: 3 steps with a checkpoint at step 2, then the same run asked for 4 steps.
    resumed = write_workspace(
        tmp_path / "resumed", micro[2], rows, {"rl.steps": 3, "rl.checkpoint_every": 2, **signal}
    )
    assert main(["--params", str(resumed)]) == 0
    assert (tmp_path / "resumed" / "artifacts" / "checkpoints" / "rl" / "step_2").is_dir()
    assert main(["--params", str(resumed), "--set", "rl.steps=4"]) == 0
    m_straight = json.loads((tmp_path / "straight" / "metrics" / "rl.json").read_text())
    m_resumed = json.loads((tmp_path / "resumed" / "metrics" / "rl.json").read_text())
    assert m_resumed["resumed_from_step"] == 2 and m_straight["resumed_from_step"] is None
    assert m_straight["exit_1"]["curves"]["has_gradient"][2:] == [1.0, 1.0], m_straight["exit_1"]["curves"]
    for key in ("reward", "length", "loss", "kl", "budget"):
        assert m_resumed["exit_1"]["curves"][key] == m_straight["exit_1"]["curves"][key], key
    # The held-out curve survives the resume: steps 0-2 from the checkpoint, 3 and 4 after it.
    assert m_straight["exit_1"]["held_out_curve"]["step"] == [0, 1, 2, 3, 4]
    assert m_resumed["exit_1"]["held_out_curve"] == m_straight["exit_1"]["held_out_curve"]
    m_quiet = json.loads((tmp_path / "quiet" / "metrics" / "rl.json").read_text())
    assert m_quiet["exit_1"]["held_out_curve"]["step"] == [0, 4]
    # the per-prompt verdicts too: the step-0 ones travel in the checkpoint
    items = {
        r: (tmp_path / r / "reports" / "rl" / "items.jsonl").read_bytes() for r in ("straight", "resumed")
    }
    assert items["resumed"] == items["straight"]
    a = load_file(tmp_path / "straight" / "artifacts" / "rl" / "model.safetensors")
    for other in ("resumed", "quiet"):
        b = load_file(tmp_path / other / "artifacts" / "rl" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), other
    # A checkpoint made with other params is set aside (as cpt's), not resumed.
    assert main(["--params", str(resumed), "--set", "rl.steps=4", "--set", "rl.lr=0.001"]) == 0
    m_other = json.loads((tmp_path / "resumed" / "metrics" / "rl.json").read_text())
    assert m_other["resumed_from_step"] is None
    stale = tmp_path / "resumed" / "artifacts" / "checkpoints" / "rl.stale"
    assert m_other["stale_checkpoint"] == {
        "set_aside_to": str(stale),
        "step": 2,
        "differences": ["params.lr: 0.005 -> 0.001"],
    }
    assert sorted(p.name for p in stale.iterdir()) == ["step_2"]


def write_select(root, questions_: list[str], answer: str) -> None:
    """select.jsonl (the split rl's checkpoint selection scores) with these questions, one answer each."""
    with open(root / "data" / "validated" / "select.jsonl", "w") as f:
        for i, q in enumerate(questions_):
            f.write(json.dumps({"id": f"select-{i}", "prompt": q, "answer": answer, "level": 1}) + "\n")


def _weights(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SELECT_SIGNAL = {"rl.prompts_per_step": 4, "rl.group_size": 4, "rl.eval_every": 1, "rl.steps": 4}
#: Settings under which rl moves the micro task's greedy answers from 3 to its rewarded 7 (GRPO learns it
#: between steps 4 and 8 and keeps it, so a selection keeps step 8: neither the first nor the last).
LEARNING = {
    "rl.algorithm": "grpo",
    "rl.prompts_per_step": 4,
    "rl.group_size": 8,
    "rl.eval_every": 4,
    "rl.steps": 12,
    "rl.eval_prompts": 8,
}


def test_selection_keeps_the_weights_of_the_best_select_point(micro, tmp_path):
    from tasks.rl import main

    rows = rl_rows(40)
    root = tmp_path / "sel"
    # rl teaches the task's answer (7) where SFT answers 3 greedily: the select problems' accuracy rises.
    settings = {**LEARNING, "rl.select_prompts": 6}
    params_file = write_workspace(root, micro[2], rows, settings)
    write_select(root, questions(8, 99), "7")
    assert main(["--params", str(params_file)]) == 0
    m = json.loads((root / "metrics" / "rl.json").read_text())
    curve = m["selection"]["curve"]
    assert curve["step"] == [0, 4, 8, 12] and m["selection"]["prompts"] == 6
    best = max(curve["accuracy"])
    kept = curve["step"][curve["accuracy"].index(best)]  # the earliest of equals
    assert 0 < kept < 12, curve  # neither the SFT weights (the next test keeps those) nor the last step
    assert (m["kept_step"], m["selection"]["kept_step"], m["selection"]["kept_accuracy"]) == (
        kept,
        kept,
        best,
    )
    held = m["exit_1"]["held_out_curve"]
    assert m["accuracy_end"] == held["accuracy"][held["step"].index(kept)]  # before/after: the saved weights
    from data_contracts.gates import check_rl_items_match
    from data_contracts.items import read_rl_items

    # the per-prompt verdicts "after" are those of the kept step, not of the last
    items = read_rl_items(root / "reports" / "rl" / "items.jsonl")
    check_rl_items_match(items, m, ("items.jsonl", "rl.json"))
    assert m["accuracy_last_step"] == held["accuracy"][-1] and m["accuracy_start"] == held["accuracy"][0]
    # The saved weights are those after `kept` steps: the same run stopped there, without selection (the
    # greedy evaluations draw no random numbers), or the SFT weights for step 0.
    if kept == 0:
        reference = _weights(micro[2])
    else:
        ref_root = tmp_path / "ref"
        ref = write_workspace(ref_root, micro[2], rows, {**LEARNING, "rl.steps": kept})
        assert main(["--params", str(ref)]) == 0
        reference = _weights(ref_root / "artifacts" / "rl")
        off = json.loads((ref_root / "metrics" / "rl.json").read_text())
        assert off["selection"] is None and off["kept_step"] == off["steps"] == kept  # no selection: the last
    assert _same_weights(_weights(root / "artifacts" / "rl"), reference)
    assert (root / "plots" / "rl" / "curves.png").stat().st_size > 0


def test_selection_can_keep_the_sft_weights_and_survives_a_resume(micro, tmp_path):
    from tasks.rl import main

    rows = rl_rows(20)
    # Answers no model of the task gives: every point scores 0, so the earliest (step 0) is kept.
    settings = {**SELECT_SIGNAL, "rl.select_prompts": 5}
    straight = write_workspace(tmp_path / "straight", micro[2], rows, settings)
    write_select(tmp_path / "straight", questions(6, 99), "12345")
    assert main(["--params", str(straight)]) == 0
    m = json.loads((tmp_path / "straight" / "metrics" / "rl.json").read_text())
    assert m["selection"]["curve"]["accuracy"] == [0.0] * 5 and m["kept_step"] == 0
    assert m["exit_1"]["steps_with_gradient"] > 0  # rl did train; its weights were not kept
    assert m["accuracy_end"] == m["accuracy_start"]
    assert _same_weights(_weights(tmp_path / "straight" / "artifacts" / "rl"), _weights(micro[2]))
    # Interrupted after a checkpoint at step 2: the kept weights travel in it, the result is the same.
    resumed = write_workspace(
        tmp_path / "resumed", micro[2], rows, {**settings, "rl.steps": 3, "rl.checkpoint_every": 2}
    )
    write_select(tmp_path / "resumed", questions(6, 99), "12345")
    assert main(["--params", str(resumed)]) == 0
    ckpt = tmp_path / "resumed" / "artifacts" / "checkpoints" / "rl" / "step_2"
    assert (ckpt / "extra.safetensors").is_file()
    assert main(["--params", str(resumed), "--set", "rl.steps=4"]) == 0
    m_resumed = json.loads((tmp_path / "resumed" / "metrics" / "rl.json").read_text())
    assert m_resumed["resumed_from_step"] == 2
    assert m_resumed["selection"] == m["selection"]
    assert m_resumed["exit_1"]["curves"]["loss"] == m["exit_1"]["curves"]["loss"]
    assert _same_weights(_weights(tmp_path / "resumed" / "artifacts" / "rl"), _weights(micro[2]))
    # With selection on, eval_every decides the candidates: a checkpoint made with another is stale.
    assert main(["--params", str(resumed), "--set", "rl.steps=4", "--set", "rl.eval_every=2"]) == 0
    stale = json.loads((tmp_path / "resumed" / "metrics" / "rl.json").read_text())["stale_checkpoint"]
    assert stale["differences"] == ["extra.selection_eval_every: 1 -> 2"], stale


def test_selection_needs_enough_select_rows(micro, tmp_path):
    from tasks.rl import run

    params = load_params(write_workspace(tmp_path, micro[2], rl_rows(20), {"rl.select_prompts": 9}))
    with pytest.raises(StageError, match=r"select\.jsonl"):
        run(params)  # no select.jsonl at all
    write_select(tmp_path, questions(4, 99), "7")
    with pytest.raises(StageError, match=r"select\.jsonl: 4 rows, but rl\.select_prompts=9"):
        run(params)
    # A select answer that is not a number cannot be scored: the error names the file, row and id.
    write_select(tmp_path, questions(10, 99), "7")
    path = tmp_path / "data" / "validated" / "select.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace('"answer": "7"', '"answer": "seven"')
    path.write_text("\n".join(lines) + "\n")
    bad = r"select\.jsonl: row 3 \(id='select-2'\): answer 'seven' is not a number"
    with pytest.raises(StageError, match=bad):
        run(params)
    lines[2] = lines[2].replace('"answer": "seven"', '"answer": "7"')
    lines[2] = lines[2].replace(json.dumps(questions(10, 99)[2]), '"  "')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(StageError, match=r"select\.jsonl: row 3 \(id='select-2'\): empty prompt"):
        run(params)
    assert not (tmp_path / "artifacts" / "rl").exists()


def test_selection_refuses_kept_weights_unlike_the_trainable_parameters(tmp_path):
    from tasks.rl import Selection

    trainable = [("model.head.weight", torch.zeros(2, 2)), ("model.norm.weight", torch.zeros(2))]
    state = {"selection_curve": [{"step": 0, "accuracy": 0.5, "reward": 0.5}], "selection_best": {"step": 0}}
    good = {"model.head.weight": torch.ones(2, 2), "model.norm.weight": torch.ones(2)}
    sel = Selection([], trainable)
    sel.load(state, good, tmp_path)
    sel.restore()
    assert all(torch.equal(p, torch.ones_like(p)) for _, p in trainable)
    with pytest.raises(StageError, match=r"kept weights hold \['model\.other'\] unlike the trainable"):
        Selection([], trainable).load(state, {**good, "model.other": torch.ones(1)}, tmp_path)


def test_bad_inputs_name_the_file(micro, tmp_path):
    from tasks.rl import run

    params = load_params(write_workspace(tmp_path / "nosft", None, rl_rows(20)))
    with pytest.raises(StageError, match="artifacts/sft"):
        run(params)
    empty = tmp_path / "empty"
    params = load_params(write_workspace(empty, micro[2], []))
    with pytest.raises(StageError, match=r"rl\.jsonl: no rows"):
        run(params)
    bad = rl_rows(20)
    bad[5]["answer"] = "seven"
    params = load_params(write_workspace(tmp_path / "bad", micro[2], bad))
    with pytest.raises(StageError, match=r"rl\.jsonl: row 6 .*'seven' is not a number"):
        run(params)
    bad[5]["answer"], bad[2]["question"] = "7", ""
    params = load_params(write_workspace(tmp_path / "bad_q", micro[2], bad))
    with pytest.raises(StageError, match=r"rl\.jsonl: row 3 \(id='rl-2'\): empty question"):
        run(params)
    params = load_params(write_workspace(tmp_path / "few", micro[2], rl_rows(4)))
    with pytest.raises(StageError, match=r"rl\.jsonl: 4 rows, but rl\.eval_prompts=4"):
        run(params)
    with pytest.raises(Exception, match="budget_min_tokens"):
        load_params(write_workspace(tmp_path / "p", None, [], {"rl.bppo.budget_min_tokens": 9}))
    assert not (tmp_path / "bad" / "artifacts" / "rl").exists()
    # weights that are not safetensors (a truncated copy, a text file): the error names the checkpoint
    params = load_params(write_workspace(tmp_path / "corrupt", micro[2], rl_rows(20)))
    weights = tmp_path / "corrupt" / "artifacts" / "sft" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(StageError, match=f"cannot load the model at {weights.parent}: "):
        run(params)


def test_kl_metric_every_n_steps_changes_no_training(micro, tmp_path):
    """rl.kl_every (beta 0): the KL metric's extra no-grad pass runs on every n-th step only (20% of a
    GRPO step when it ran on all); the other steps report none (null in rl.json, an empty cell in
    curves.csv), never a 0 that reads as a measure, and the training is the same bits."""
    from safetensors.torch import load_file

    from tasks.rl import main

    rows = rl_rows(20)
    base = {"rl.prompts_per_step": 4, "rl.group_size": 8, "rl.steps": 4, "rl.eval_every": 0}
    kl, weights = {}, {}
    for every in (1, 2, 0):
        root = tmp_path / f"every_{every}"
        assert (
            main(["--params", str(write_workspace(root, micro[2], rows, {**base, "rl.kl_every": every}))])
            == 0
        )
        kl[every] = json.loads((root / "metrics" / "rl.json").read_text())["exit_1"]["curves"]["kl"]
        weights[every] = load_file(root / "artifacts" / "rl" / "model.safetensors")
    assert all(k is not None and k >= 0 for k in kl[1]) and max(kl[1]) > 0, kl[1]
    assert kl[2] == [None, kl[1][1], None, kl[1][3]]
    assert kl[0] == [None] * 4
    header, *lines = (tmp_path / "every_2" / "plots" / "rl" / "curves.csv").read_text().splitlines()
    column = header.split(",").index("kl")
    assert [line.split(",")[column] for line in lines] == [
        "",
        str(round(kl[1][1], 6)),
        "",
        str(round(kl[1][3], 6)),
    ]
    for every in (2, 0):
        assert all(torch.equal(weights[1][k], weights[every][k]) for k in weights[1]), every


# --- members, skipped steps, timing, set-asides -------------------------------------------------------


def _check_member_curves(metrics: dict, d: int, steps: int, format_reward: float) -> dict:
    """Every per-step curve has one value per step; the sampled accuracy is consistent with the reward
    (reward = accuracy + format_reward * share of well-formed responses)."""
    curves = metrics[f"exit_{d}"]["curves"]
    for key in ("reward", "accuracy", "length", "kl", "has_gradient"):
        assert len(curves[key]) == steps, key
    for acc, reward in zip(curves["accuracy"], curves["reward"]):
        assert 0.0 <= acc <= 1.0 and acc - 1e-6 <= reward <= acc + format_reward + 1e-6
    assert metrics[f"exit_{d}"]["steps_with_gradient"] == sum(curves["has_gradient"])
    assert metrics[f"exit_{d}"]["skipped_steps"] == steps - sum(curves["has_gradient"])
    if metrics["algorithm"] == "bppo":
        assert curves["has_gradient"] == [float(p > 0) for p in curves["pairs"]]
        assert all(t == 0 for t, g in zip(curves["trained_tokens"], curves["has_gradient"]) if not g)
    return curves


def test_stage_bppo_all_members_records_accuracy_per_member(micro, tmp_path):
    from tasks.rl import main

    params_file = write_workspace(tmp_path, micro[2], rl_rows(20), {"rl.members": "all", "rl.steps": 3})
    assert main(["--params", str(params_file)]) == 0
    metrics = json.loads((tmp_path / "metrics" / "rl.json").read_text())
    assert metrics["algorithm"] == "bppo" and metrics["members"] == [1, 2]
    curves = {d: _check_member_curves(metrics, d, 3, 0.1) for d in (1, 2)}
    # Each member samples its own rollouts: the two accuracy curves are recorded separately.
    assert curves[1]["length"] != curves[2]["length"]
    lines = (tmp_path / "plots" / "rl" / "curves.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert "accuracy" in header and "has_gradient" in header and len(lines) == 1 + 2 * 3
    acc_col = header.index("accuracy")
    for d in (1, 2):
        rows = [line.split(",") for line in lines[1:] if line.split(",")[1] == f"exit_{d}"]
        assert [float(r[acc_col]) for r in rows] == pytest.approx(curves[d]["accuracy"], abs=1e-6)
    assert metrics["trainable_params"] == sum(p.numel() for p in load_family(micro[2])[0].parameters())


def test_stage_members_as_a_list_of_exits(micro, tmp_path):
    from tasks.rl import main

    params_file = write_workspace(tmp_path, micro[2], rl_rows(20), {"rl.members": [2], "rl.steps": 2})
    assert main(["--params", str(params_file)]) == 0
    metrics = json.loads((tmp_path / "metrics" / "rl.json").read_text())
    assert metrics["members"] == [2] and "exit_1" not in metrics
    _check_member_curves(metrics, 2, 2, 0.1)
    from tasks.core.params import ParamsError

    with pytest.raises(ParamsError, match=r"rl\.members \[3\] are not in model\.exit_layers"):
        load_params(write_workspace(tmp_path / "bad", micro[2], rl_rows(20), {"rl.members": [3]}))


def test_bppo_steps_without_a_pair_are_counted_and_take_no_optimizer_step(micro):
    """An answer the model never produces: no group has a correct response, so every BPPO step is
    skipped (no pair, no optimizer step, weights unchanged) and the metrics say so."""

    tok = micro[0]
    model = fresh_model(micro)
    rows = [{**r, "answer": "12345"} for r in rl_rows(12)]
    cfg = RLParams(
        algorithm="bppo", steps=3, prompts_per_step=2, group_size=4, max_new_tokens=8, eval_prompts=1
    )
    trainer = dae_trainer(model, tok, rows, cfg, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        trainer.step()
    hist = trainer.history[1]
    assert [h["has_gradient"] for h in hist] == [0.0, 0.0, 0.0]
    assert all(h["pairs"] == 0 and h["skipped_groups"] == 2 and h["trained_tokens"] == 0 for h in hist)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bppo_early_stop_in_the_trainer_keeps_the_pairs(micro):
    """With rl.bppo.early_stop the trainer stops decided groups early, decodes fewer tokens and still
    trains the same (shortest correct, shortest incorrect) pairs as without it (same seed)."""

    tok = micro[0]
    rows = [{**r, "answer": "3"} for r in rl_rows(24)]  # the warmed-up member answers 3 about 30%
    out = {}
    for early in (False, True):
        model = fresh_model(micro)
        cfg = RLParams(
            algorithm="bppo",
            steps=2,
            prompts_per_step=6,
            group_size=8,
            max_new_tokens=12,
            eval_prompts=1,
            bppo={"early_stop": early, "adaptive_budget": False},
        )
        trainer = dae_trainer(model, tok, rows, cfg, seed=0)
        samples = trainer._sample(trainer.prompts_for_step(0), 1, 0)
        scores = trainer._score(trainer.prompts_for_step(0), samples)
        rollout = trainer._bppo_rollout(samples, scores, {})
        out[early] = (samples, rollout)
    (s_full, r_full), (s_cut, r_cut) = out[False], out[True]
    assert s_cut.stopped is not None and bool(s_cut.stopped.any())
    assert s_cut.completion_mask.sum() < s_full.completion_mask.sum()
    assert r_full.stats["pairs"] == r_cut.stats["pairs"] > 0
    assert torch.equal(r_full.batch.completion_ids, r_cut.batch.completion_ids)
    assert torch.equal(r_full.batch.loss_mask, r_cut.batch.loss_mask)


@pytest.mark.parametrize("algorithm", ["grpo", "bppo"])
def test_static_rollout_engine_trains_as_the_model_path(micro, algorithm):
    """rl.rollout_engine: static draws the same rollouts as the model's forward for a fixed seed, so
    three steps of either algorithm end with the same stats and bitwise the same weights."""

    tok = micro[0]
    rows = [{**r, "answer": "3"} for r in rl_rows(24)]
    out = {}
    for engine in A.ENGINES:
        model = fresh_model(micro)
        cfg = RLParams(
            algorithm=algorithm,
            steps=3,
            prompts_per_step=4,
            group_size=6,
            max_new_tokens=10,
            eval_prompts=1,
            rollout_engine=engine,
        )
        trainer = dae_trainer(model, tok, rows, cfg, seed=1)
        stats = [trainer.step() for _ in range(3)]
        out[engine] = (stats, {k: v.clone() for k, v in model.state_dict().items()})
    (s_hf, w_hf), (s_static, w_static) = out["hf"], out["static"]
    timing = {"rollout_s", "train_s", "loss_s", "optim_s", "time_s"}
    for a, b in zip(s_hf, s_static):
        for d in a:
            assert {k: v for k, v in a[d].items() if k not in timing} == {
                k: v for k, v in b[d].items() if k not in timing
            }
    assert any(a[d]["tokens_generated"] > 0 for a in s_hf for d in a)
    assert all(torch.equal(w_hf[k], w_static[k]) for k in w_hf)
    assert not all(torch.equal(w_hf[k], fresh_model(micro).state_dict()[k]) for k in w_hf)  # it trained


def test_benchmark_time_to_grpo_final_accuracy_over_seeds():
    bench = load_script("benchmarks/experiments/bppo_vs_grpo.py")

    def run(evals, step_s, grads=None):
        hist = [
            {
                "reward": 0.5,
                "has_gradient": 1.0 if grads is None else grads[i],
                "time_s": step_s * (i + 1),
                "rollout_s": 0.6 * step_s,
                "train_s": 0.4 * step_s,
                "loss_s": 0.3 * step_s,
                "optim_s": 0.1 * step_s,
                "length": 10.0 if step_s > 0.5 else 6.0,
                "tokens_generated": 40.0,
                "trained_tokens": 8.0,
            }
            for i in range(4)
        ]
        return {"history": {"2": hist}, "evals": [(0, 0.0, 0.40)] + [(s, s * step_s, a) for s, a in evals]}

    per_seed = {
        # GRPO reaches its final 0.50 at step 2 (2 s); BPPO at step 2 too, in 0.5 s: 4x.
        0: {"grpo": run([(2, 0.50), (4, 0.50)], 1.0), "bppo": run([(2, 0.52), (4, 0.48)], 0.25)},
        # GRPO 0.46 at step 4 (4 s); BPPO never reaches it.
        1: {
            "grpo": run([(2, 0.44), (4, 0.46)], 1.0),
            "bppo": run([(2, 0.41), (4, 0.45)], 0.25, [0, 1, 1, 1]),
        },
    }
    out = bench.summarize(per_seed, acc_tol=0.03)
    b, g = out["runs"]["bppo"], out["runs"]["grpo"]
    assert [r["time_to_target_s"] for r in b["per_seed"]] == [0.5, None]
    assert b["per_seed"][0]["speedup_time"] == 4.0 and b["speedups"] == [4.0]
    assert b["reached"] == 1 and g["reached"] == 2
    assert b["final_accuracy_mean"] == pytest.approx(0.465) and g["final_accuracy_mean"] == pytest.approx(
        0.48
    )
    assert b["equal_accuracy"] is True  # |0.465 - 0.48| <= 0.03
    assert b["target_met"] is False  # one seed never reached GRPO's accuracy
    assert bench.summarize(per_seed, acc_tol=0.01)["runs"]["bppo"]["equal_accuracy"] is False
    assert b["length_change"] == pytest.approx(-0.4)
    assert b["loss_s_per_step"] == pytest.approx(0.075) and b["rollout_s_per_step"] == pytest.approx(0.15)
    assert out["grpo_improved"] == [True, True]
    # A seed where GRPO ends below its start is a failed RL run: no speedup is computed from it.
    failed = {0: {"grpo": run([(2, 0.38), (4, 0.39)], 1.0), "bppo": run([(2, 0.45), (4, 0.45)], 0.25)}}
    out_failed = bench.summarize(failed, acc_tol=0.03)
    assert out_failed["grpo_improved"] == [False] and out_failed["runs"]["bppo"]["speedup_time"] is None
    assert bench.parse_run("x=bppo,bppo.prefix_rule=divergent,lr=1e-4") == (
        "x",
        {"algorithm": "bppo", "bppo.prefix_rule": "divergent", "lr": 1e-4},
    )
    cfg = bench.apply_overrides(RLParams(), {"algorithm": "grpo", "bppo.early_stop": True})
    assert cfg.algorithm == "grpo" and cfg.bppo.early_stop is True
    with pytest.raises(ValueError, match="unknown rl parameter"):
        bench.apply_overrides(RLParams(), {"bppo.nope": 1})
    with pytest.raises(ValueError, match="NAME=grpo"):
        bench.parse_run("x=ppo")


def test_wall_time_is_cumulative_across_resumes(micro, tmp_path):
    from tasks.rl import main

    params = write_workspace(tmp_path, micro[2], rl_rows(20), {"rl.steps": 3, "rl.checkpoint_every": 2})
    assert main(["--params", str(params)]) == 0
    first = json.loads((tmp_path / "metrics" / "rl.json").read_text())
    assert first["wall_time_s"] == first["wall_time_this_run_s"]
    state = json.loads((tmp_path / "artifacts/checkpoints/rl/step_2/trainer_state.json").read_text())
    assert 0 < state["wall_time_s"] < first["wall_time_s"]
    assert main(["--params", str(params), "--set", "rl.steps=4"]) == 0
    resumed = json.loads((tmp_path / "metrics" / "rl.json").read_text())
    assert resumed["resumed_from_step"] == 2
    assert resumed["wall_time_s"] == pytest.approx(
        state["wall_time_s"] + resumed["wall_time_this_run_s"], abs=1e-9
    )
    assert resumed["wall_time_s"] > resumed["wall_time_this_run_s"]
    assert resumed["train_time_s"] > state["elapsed_s"]  # train time: cumulative too


def test_corrupt_rl_checkpoints_are_skipped_and_resume_stays_exact(micro, tmp_path, caplog):
    from safetensors.torch import load_file

    from tasks.rl import main

    def flip_byte(path, offset):
        data = bytearray(path.read_bytes())
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))

    def final_weights(root):
        return load_file(root / "artifacts" / "rl" / "model.safetensors")

    rows = rl_rows(20)
    straight = write_workspace(tmp_path / "straight", micro[2], rows, {"rl.steps": 4})
    assert main(["--params", str(straight)]) == 0
    expected = final_weights(tmp_path / "straight")
    params = write_workspace(tmp_path / "run", micro[2], rows, {"rl.steps": 3, "rl.checkpoint_every": 1})
    assert main(["--params", str(params)]) == 0
    ckpt = tmp_path / "run" / "artifacts" / "checkpoints" / "rl"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_1", "step_2"]
    # One flipped byte in the latest checkpoint's weights: resumed from the previous one, the file named.
    flip_byte(ckpt / "step_2" / "model.safetensors", -5)
    assert main(["--params", str(params), "--set", "rl.steps=4"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics" / "rl.json").read_text())
    assert metrics["resumed_from_step"] == 1 and metrics["stale_checkpoint"] is None
    assert [(s["path"], s["reason"]) for s in metrics["skipped_checkpoints"]] == [
        (str(ckpt / "step_2"), "model.safetensors does not match its sha256 in checksums.json (corrupt)")
    ]
    assert f"{ckpt / 'step_2'} fails verification: model.safetensors does not match" in caplog.text
    got = final_weights(tmp_path / "run")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    # Every checkpoint bad (a corrupt rng.pt, a missing manifest): a fresh start, still the same result.
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_2", "step_3"]
    flip_byte(ckpt / "step_3" / "rng.pt", 100)
    (ckpt / "step_2" / "checksums.json").unlink()
    caplog.clear()
    assert main(["--params", str(params), "--set", "rl.steps=4"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics" / "rl.json").read_text())
    assert metrics["resumed_from_step"] is None
    assert [(s["step"], s["reason"].split()[0]) for s in metrics["skipped_checkpoints"]] == [
        (3, "rng.pt"),
        (2, "checksums.json"),
    ]
    assert "no checkpoint in" in caplog.text and "training starts from scratch" in caplog.text
    got = final_weights(tmp_path / "run")
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_rl_checkpoint_fingerprint_follows_the_code_it_imports(micro, tmp_path):
    """rl imports ruyi_model/decoding.py: a change there makes its checkpoints stale (as cpt's)."""
    import shutil

    from tasks.core import codedeps
    from tasks.rl import checkpoint_info
    from tasks.training.checkpoint import Checkpointer, fingerprint_differences

    params_file = write_workspace(tmp_path / "ws", micro[2], rl_rows(20))
    params = load_params(params_file)
    rl_path = tmp_path / "ws" / "data" / "validated" / "rl.jsonl"
    sft_dir = tmp_path / "ws" / "artifacts" / "sft"
    code = tmp_path / "code"
    for pkg in codedeps.PACKAGES:
        shutil.copytree(codedeps.REPO_ROOT / pkg, code / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    here = checkpoint_info(params, rl_path, sft_dir)
    before = checkpoint_info(params, rl_path, sft_dir, code_root=code)
    assert before == here and "ruyi_model/decoding.py" in before["code"]
    with open(code / "ruyi_model" / "decoding.py", "a") as f:
        f.write("\n# changed\n")
    after = checkpoint_info(params, rl_path, sft_dir, code_root=code)
    assert Checkpointer(tmp_path / "c", after).digest != Checkpointer(tmp_path / "c", before).digest
    [diff] = fingerprint_differences(before, after)
    assert diff.startswith("code.ruyi_model/decoding.py: ")
    # Extending the run (steps, checkpoint_every) keeps the fingerprint; the seed does not.
    longer = load_params(params_file, {"rl.steps": 9, "rl.checkpoint_every": 3})
    assert checkpoint_info(longer, rl_path, sft_dir) == here
    assert checkpoint_info(load_params(params_file, {"seed": 4}), rl_path, sft_dir) != here


def test_rl_diagnose_script_reports_pass_rates_and_an_rl_run(micro, tmp_path, capsys):
    diag = load_script("benchmarks/experiments/rl_diagnose.py")
    assert diag.kind("Nina is 5 years older than Maya. Maya is 6 years old. How old?") == "add (older)"
    assert diag.kind("Sara buys 6 books for $6 each. How much does she spend?") == "mul (buys each)"
    params_file = write_workspace(tmp_path, micro[2], rl_rows(12))
    data = tmp_path / "data" / "validated" / "rl.jsonl"
    common = ["--sft", str(tmp_path / "artifacts" / "sft"), "--data", str(data)]
    common += ["--params", str(params_file), "--samples", "2", "--json", str(tmp_path / "out.jsonl")]
    assert diag.main(common) == 0
    out = capsys.readouterr().out
    # the last rl.eval_prompts (4) rows are held out with every row posing one of their problems (split_rows)
    from tasks.training.rl_trainer import split_rows

    train, held = split_rows(rl_rows(12), 4, data)
    assert len(held) >= 4 and len(train) + len(held) == 12
    assert f"eval: {len(held)} prompts, greedy accuracy" in out and f"train: {len(train)} prompts" in out
    assert "all wrong" in out
    assert diag.main([*common, "--train", "--set", "steps=2", "--set", "lr=1e-3", "--eval-every", "1"]) == 0
    runs = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(runs) == 2 and "curve" not in runs[0]
    curve = runs[1]["curve"]
    assert [c[0] for c in curve] == [0, 1, 2] and all(0 <= a <= 1 for c in curve for a in c[1:])
    assert runs[1]["gain"] == pytest.approx(curve[-1][1] - curve[0][1])
    assert 0 <= runs[1]["steps_with_gradient"] <= 2 and runs[1]["set"] == ["steps=2", "lr=1e-3"]


def test_rl_slices_script_scores_three_slices_and_runs_the_supervised_control(micro, tmp_path):
    """benchmarks/experiments/rl_slices.py: rl (or its supervised control on gold chats) from
    artifacts/sft, greedy accuracy on rl's held-out slice, select and eval at step 0 and every n steps;
    the control moves only the trainable parameters, with AdamW at rl.lr."""
    slices = load_script("benchmarks/experiments/rl_slices.py")
    params_file = write_workspace(tmp_path, micro[2], rl_rows(12), {"rl.steps": 2})
    write_select(tmp_path, questions(6, 99), "7")
    validated = tmp_path / "data" / "validated"
    gold = [{"q": q, "a": "7", "s": "so #### 7"} for q in questions(5, 98)]
    with open(validated / "eval.jsonl", "w") as f:
        for i, g in enumerate(gold):
            row = {"id": f"eval-{i}", "question": g["q"], "answer": g["a"], "solution": g["s"], "level": 1}
            f.write(json.dumps(row) + "\n")
    with open(validated / "sft.jsonl", "w") as f:
        for i, g in enumerate(gold):
            row = {"id": f"sft-{i}", "prompt": g["q"], "response": g["s"], "answer": g["a"], "level": 1}
            f.write(json.dumps(row) + "\n")
    before = _weights(tmp_path / "artifacts" / "sft")
    from tasks.training.rl_trainer import split_rows

    _, held = split_rows(rl_rows(12), 4, validated / "rl.jsonl")
    for control in (None, "sft", "eval"):
        out = tmp_path / f"curves-{control}.json"
        argv = ["--params", str(params_file), "--seed", "0", "--every", "1", "--select", "4", "--eval", "3"]
        assert slices.main([*argv, "--json", str(out), *(["--control", control] if control else [])]) == 0
        got = json.loads(out.read_text())
        assert got["control"] == control and got["rows"] == {"held": len(held), "select": 4, "eval": 3}
        assert got["curves"]["step"] == [0, 1, 2]
        for name in got["rows"]:
            assert len(got["curves"][name]) == 3 and all(0 <= a <= 1 for a in got["curves"][name])
    # The script trains in memory: artifacts/sft is left as it was.
    assert _same_weights(_weights(tmp_path / "artifacts" / "sft"), before)
    # The control's step moves the trainable parameters of rl.members, and only those.
    from tasks.core.files import read_jsonl
    from tasks.core.paths import Workspace
    from tasks.training.rl_trainer import resolve_members, trainable_parameters

    params = load_params(params_file)
    model, tok = load_family(tmp_path / "artifacts" / "sft")
    members = resolve_members(model.config, params.rl.members)
    trainable = trainable_parameters(model, params.rl.members, members)
    names = {n for n, _ in trainable}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    sft_file = Workspace.from_params(params).sft_data
    gold = read_jsonl(sft_file, required=("id", "prompt", "response"))
    ctl = slices.SupervisedControl(model, tok, gold, str(sft_file), params, members, trainable)
    ctl.step()
    assert ctl.step_index == 1
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert moved and moved <= names < set(start)


def test_rollout_engine_benchmark_times_both_engines_on_a_family(micro, tmp_path, capsys):
    bench = load_script("benchmarks/kernels/rollout_engine.py")
    data = tmp_path / "rl.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rl_rows(6)))
    out_json = tmp_path / "engines.json"
    args = [
        "--family",
        str(micro[2]),
        "--data",
        str(data),
        "--batches",
        "3",
        "--prompts",
        "2",
        "--group",
        "3",
    ]
    assert bench.main([*args, "--max-new-tokens", "8", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    members = json.loads(out_json.read_text())["members"]
    assert set(members) == {"1", "2"}
    for d, row in members.items():
        assert row["rows"] == 3 * 2 * 3 and row["rows_identical"] == row["rows"]
        assert row["ratio"] == pytest.approx(row["hf_s"] / row["static_s"])
        assert f"member {d}: hf " in out and f"same tokens in {row['rows']} of {row['rows']} rows" in out
    assert bench.main(["--family", str(tmp_path / "none"), *args[2:]]) == 2  # no family there
    assert bench.main([*args[:3], str(tmp_path / "none.jsonl"), *args[4:]]) == 2
    assert bench.main([*args[:7], "30"]) == 2  # 3 x 30 questions needed, 6 there
    err = capsys.readouterr().err
    assert (
        "no saved family" in err and "not RL rows with a question" in err and "6 questions, 90 needed" in err
    )
    with pytest.raises(SystemExit) as e:
        bench.main([*args, "--members", "3"])
    assert e.value.code == 2 and "[3] are not exits" in capsys.readouterr().err
