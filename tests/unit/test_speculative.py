"""Self-speculative decoding (`ruyi_model.speculative`) against the deepest member's own decoding.

Greedy output must be token for token `generate(exit_layer=L, do_sample=False)` for every drafting
member and several k; after every round the shared KV cache must equal plain decoding of the committed
tokens; under sampling the output distribution must be the deepest member's (exact joint of the first
two tokens vs a seeded empirical sample, chi-square, with a power check against the draft's own law).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

from ruyi_model import FamilialConfig, FamilialForCausalLM, expand, speculative_generate
from ruyi_model.speculative import SpeculativeState


def agreeing_family(vocab=97, exits=(1, 2, 3, 4), alpha=0.1, branch=1, shared=False, init=0.2, seed=0):
    """A random family whose members mostly agree: layers after the first write a residual scaled by
    `alpha`, so drafts are often but not always accepted (both paths get exercised)."""
    torch.manual_seed(seed)
    q = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=67,
            num_hidden_layers=max(exits),
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=128,
            initializer_range=init,
            tie_word_embeddings=False,
        )
    ).eval()
    with torch.no_grad():
        for layer in q.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(alpha)
            layer.mlp.down_proj.weight.mul_(alpha)
    return FamilialForCausalLM.from_qwen3(
        q, exit_layers=list(exits), exit_branch_layers=branch, shared_heads=shared
    ).eval()


def with_dae(fam: FamilialForCausalLM) -> FamilialForCausalLM:
    """DaE blocks on a shallow member and on the deepest, made non-identity (small residuals)."""
    fam = expand(fam, 2, 2)
    fam = expand(fam, fam.config.exit_layers[-1], 1).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for d in (2, fam.config.exit_layers[-1]):
            for layer in fam.exits[str(d)].layers[fam.config.branch_layers(d) :]:
                layer.self_attn.o_proj.weight.normal_(0, 0.01)
                layer.mlp.down_proj.weight.normal_(0, 0.01)
    return fam


FAMILIES = {
    "branch1": lambda: agreeing_family(),
    "branch0_shared_heads": lambda: agreeing_family(exits=(1, 3, 4), branch=0, shared=True),
    "dae": lambda: with_dae(agreeing_family(exits=(2, 3, 4))),
}


def assert_drafts_are(out, draft_argmax: list[int], ref: torch.Tensor, prompt_len: int, k: int) -> None:
    """The drafts of a greedy run are `draft_argmax`'s (the drafter's own next-token choice along the
    output `ref`): each round keeps exactly as many as agree with the output."""
    seq, pos, made, n = ref[0].tolist(), prompt_len - 1, 0, ref.shape[1] - prompt_len
    for got in out.accepted_per_round:
        k_round, want = min(k, n - made - 1), 0
        while want < k_round and draft_argmax[pos + want] == seq[pos + want + 1]:
            want += 1
        assert got == want, (k, out.accepted_per_round)
        pos, made = pos + want + 1, made + want + 1


def without_blocks(fam: FamilialForCausalLM) -> FamilialForCausalLM:
    """The family with every DaE block removed (each member as it was before DaE; norms and heads kept)."""
    plain = FamilialForCausalLM(FamilialConfig(**{**fam.config.to_dict(), "dae_blocks": None})).eval()
    missing, unexpected = plain.load_state_dict(fam.state_dict(), strict=False)
    assert not missing and unexpected and all(".layers." in key for key in unexpected)
    return plain


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_equals_deepest_member_generate(family):
    fam = FAMILIES[family]()
    deepest = fam.config.exit_layers[-1]
    torch.manual_seed(3)
    ids = torch.randint(0, fam.config.vocab_size, (1, 6))
    ref = fam.generate(ids, max_new_tokens=20, do_sample=False, exit_layer=deepest)
    rates, full_rounds, rejections = [], 0, 0
    for d in fam.config.exit_layers[:-1]:
        with torch.no_grad():  # member d's own next-token choice along the output (no cache)
            draft_argmax = fam(ref, exit_layer=d, use_cache=False).logits[0].argmax(-1).tolist()
        for k in (1, 2, 3, 5):
            out = speculative_generate(fam, ids, draft_exit=d, k=k, max_new_tokens=20)
            assert out.sequences.tolist() == ref.tolist(), (d, k)
            assert_drafts_are(out, draft_argmax, ref, ids.shape[1], k)
            assert len(out.new_tokens) == 20
            assert out.target_forwards == len(out.accepted_per_round)
            assert out.accepted == sum(out.accepted_per_round) <= out.proposed == out.draft_forwards
            # every round commits its kept drafts plus one token of the deepest member
            assert sum(a + 1 for a in out.accepted_per_round) == 20
            rates.append(out.acceptance_rate)
            full_rounds += sum(a == min(k, 20) for a in out.accepted_per_round)
            rejections += sum(a < k for a in out.accepted_per_round[:-1])
    # the fixture family is built so that both paths (every draft kept / a rejection) occur
    assert full_rounds > 0 and rejections > 0 and 0 < np.mean(rates) < 1


@pytest.mark.parametrize("family", ["branch1", "dae"])
def test_confidence_gated_draft_length_is_lossless_and_stops_where_the_draft_is_unsure(family):
    """With `draft_threshold` a round drafts until (and including) the first token the draft member gives
    a probability below it: the output is still the deepest member's; 0 drafts k, 1 drafts one."""
    fam = FAMILIES[family]()
    deepest = fam.config.exit_layers[-1]
    torch.manual_seed(3)
    ids = torch.randint(0, fam.config.vocab_size, (1, 6))
    n = 20
    ref = fam.generate(ids, max_new_tokens=n, do_sample=False, exit_layer=deepest)
    lengths_seen = set()
    for d in fam.config.exit_layers[:-1]:
        with torch.no_grad():  # member d's next-token law along the output (no cache)
            probs = torch.softmax(fam(ref, exit_layer=d, use_cache=False).logits[0].float(), -1)
        conf = probs.max(-1).values.tolist()
        # a gate between two neighbouring confidences near the median (gates some rounds, not all; no
        # confidence sits on it, so the cache path's rounding cannot flip a comparison)
        along = sorted(conf[ids.shape[1] - 1 :])
        threshold = (along[len(along) // 2 - 1] + along[len(along) // 2]) / 2
        for k in (3, 8):
            for t, rule in ((threshold, "gated"), (0.0, "always k"), (1.0, "one")):
                out = speculative_generate(fam, ids, draft_exit=d, k=k, max_new_tokens=n, draft_threshold=t)
                assert out.sequences.tolist() == ref.tolist(), (d, k, t)
                assert out.proposed == sum(out.proposed_per_round) == out.draft_forwards
                pos, made = ids.shape[1] - 1, 0
                for got, kept in zip(out.proposed_per_round, out.accepted_per_round):
                    k_round = min(k, n - made - 1)
                    if rule == "always k":
                        assert got == k_round
                    elif rule == "one":
                        assert got == min(1, k_round)
                    else:
                        assert 0 < got <= k_round or got == k_round == 0
                        # the kept drafts are the output's tokens: every one but the round's last was
                        # drafted with confidence >= t, and a round cut short ends on one below t
                        for j in range(min(kept, got - 1)):
                            assert conf[pos + j] >= t, (d, k, pos, j)
                        if kept == got and got < k_round:
                            assert conf[pos + got - 1] < t, (d, k, pos, got)
                        lengths_seen.add(got)
                    pos, made = pos + kept + 1, made + kept + 1
    assert len(lengths_seen) > 2, lengths_seen  # the gate produced rounds of several lengths


def test_draft_without_dae_blocks_is_lossless_and_drafts_the_member_before_dae():
    """`draft_blocks=False`: the DaE member drafts with its layers before expansion (its norm and head
    kept); the output is still the deepest member's, the blocks' cache slots stay empty, and a member
    without blocks drafts as it is."""
    fam = FAMILIES["dae"]()  # exits (2, 3, 4): two blocks on member 2, one on the deepest
    plain = without_blocks(fam)
    torch.manual_seed(3)
    ids = torch.randint(0, fam.config.vocab_size, (1, 6))
    n = 20
    ref = fam.generate(ids, max_new_tokens=n, do_sample=False, exit_layer=4)
    with torch.no_grad():
        before = plain(ref, exit_layer=2, use_cache=False).logits[0].argmax(-1).tolist()
        dense = fam(ref, exit_layer=2, use_cache=False).logits[0].argmax(-1).tolist()
        member3 = fam(ref, exit_layer=3, use_cache=False).logits[0].argmax(-1).tolist()
    assert before != dense  # the fixture's blocks change some drafts: the test can tell them apart
    blocks = [layer.self_attn.layer_idx for layer in fam.exits["2"].layers[fam.config.branch_layers(2) :]]
    for k in (2, 5):
        out = speculative_generate(fam, ids, draft_exit=2, k=k, max_new_tokens=n, draft_blocks=False)
        assert out.sequences.tolist() == ref.tolist(), k
        assert_drafts_are(out, before, ref, ids.shape[1], k)
        for drafter_blocks in (True, False):  # member 3 has no blocks: the switch changes nothing
            out = speculative_generate(
                fam, ids, draft_exit=3, k=k, max_new_tokens=n, draft_blocks=drafter_blocks
            )
            assert out.sequences.tolist() == ref.tolist()
            assert_drafts_are(out, member3, ref, ids.shape[1], k)
    # The cache: the draft's own slots hold plain decoding of the member before DaE; the blocks' none.
    state = SpeculativeState(fam, draft_exit=2, draft_blocks=False)
    state.prefill(ids[0].tolist())
    for _ in range(4):
        state.step(3)
        consumed = state.tokens[: len(state.tokens) - 1 - state.backlog.shape[1]]
        want = plain_cache(plain, consumed, 2)
        for mine, theirs in zip(state.draft_only, plain.member_layers(2)[len(state.shared) :], strict=True):
            got, expected = (
                state.cache.layers[mine.self_attn.layer_idx],
                want.layers[theirs.self_attn.layer_idx],
            )
            torch.testing.assert_close(got.keys, expected.keys, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(got.values, expected.values, atol=2e-5, rtol=1e-4)
        assert all(state.cache.layers[slot].get_seq_length() == 0 for slot in blocks)
    assert state.draft_only and not set(blocks) & {layer.self_attn.layer_idx for layer in state.draft_only}


def test_greedy_stops_at_eos_and_handles_left_padding():
    fam = agreeing_family()
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(5))
    ref = fam.generate(ids, max_new_tokens=16, do_sample=False, exit_layer=4)[0, 5:].tolist()
    eos = ref[7]
    stop = ref.index(eos)
    out = speculative_generate(fam, ids, draft_exit=2, k=3, max_new_tokens=16, eos_token_id=[eos, 10_000])
    assert out.new_tokens == ref[: stop + 1]
    # the rounds themselves: the one that produces the stop token ends with it and is the last
    state = SpeculativeState(fam, draft_exit=2)
    state.prefill(ids[0].tolist())
    rounds = [new for new, _, _ in state.rounds(16, 3, stops={eos})]
    assert sum(rounds, []) == ref[: stop + 1] and rounds[-1][-1] == eos and eos not in sum(rounds[:-1], [])
    # sampling through the warpers: top_k=1 makes both laws one-hot, so the output is the greedy one
    out = speculative_generate(
        fam,
        ids,
        draft_exit=1,
        k=4,
        max_new_tokens=16,
        do_sample=True,
        top_k=1,
        top_p=0.9,
        temperature=0.7,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.new_tokens == ref and 0 < out.accepted < out.proposed
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)], dim=1)
    out = speculative_generate(fam, padded, draft_exit=3, k=2, max_new_tokens=16, attention_mask=mask)
    assert out.new_tokens == ref and out.sequences[0, :5].tolist() == ids[0].tolist()


def plain_cache(fam: FamilialForCausalLM, tokens: list[int], exit_layer: int) -> DynamicCache:
    cache = DynamicCache()
    if tokens:
        fam(torch.tensor([tokens]), exit_layer=exit_layer, past_key_values=cache, use_cache=True)
    return cache


@pytest.mark.parametrize(
    "do_sample,draft_threshold", [(False, None), (True, None), (False, 0.5), (True, 0.5)]
)
def test_cache_after_every_round_equals_plain_decoding(do_sample, draft_threshold):
    fam = agreeing_family(exits=(2, 3, 4))
    torch.manual_seed(11)
    prompt = torch.randint(0, 97, (7,)).tolist()
    state = SpeculativeState(
        fam,
        draft_exit=2,
        do_sample=do_sample,
        temperature=0.7,
        generator=torch.Generator().manual_seed(0),
        draft_threshold=draft_threshold,
    )
    state.prefill(prompt)
    seen_reject = seen_full = False
    for _ in range(12):
        k = 3 if draft_threshold is None else 6
        _, accepted, proposed = state.step(k)
        assert 0 < proposed <= k and accepted <= proposed
        seen_reject |= accepted < proposed
        seen_full |= accepted == proposed
        committed = state.tokens[:-1]  # the last token is pending: in no cache yet
        ref_target = plain_cache(fam, committed, 4)
        for layer in fam.member_layers(4):  # shared backbone slots and the verifier's own slots
            slot = layer.self_attn.layer_idx
            got, want = state.cache.layers[slot], ref_target.layers[slot]
            assert got.get_seq_length() == len(committed)
            torch.testing.assert_close(got.keys, want.keys, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(got.values, want.values, atol=2e-5, rtol=1e-4)
        # the draft's own slots: plain decoding of the tokens it has consumed (all but the backlog)
        lag = state.backlog.shape[1]
        ref_draft = plain_cache(fam, committed[: len(committed) - lag], 2)
        for layer in state.draft_only:
            slot = layer.self_attn.layer_idx
            got, want = state.cache.layers[slot], ref_draft.layers[slot]
            assert got.get_seq_length() == len(committed) - lag
            torch.testing.assert_close(got.keys, want.keys, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(got.values, want.values, atol=2e-5, rtol=1e-4)
        # (the backlog itself is checked through the next round: the draft consumes it into these slots)
    assert seen_reject and seen_full


def joint_first_two(
    fam: FamilialForCausalLM, prompt: list[int], exit_layer: int, temperature: float
) -> np.ndarray:
    """The exact V x V law of the first two sampled tokens of member `exit_layer`."""
    vocab = fam.config.vocab_size
    with torch.no_grad():
        batch = torch.tensor([prompt + [a] for a in range(vocab)])
        logits = fam(batch, exit_layer=exit_layer, use_cache=False).logits.float() / temperature
    p1 = torch.softmax(logits[0, -2], -1)
    p2 = torch.softmax(logits[:, -1], -1)
    return (p1[:, None] * p2).double().numpy()


@pytest.mark.parametrize(
    "k,draft_threshold,draft_blocks", [(1, None, True), (2, 0.3, True), (1, None, False)]
)
def test_sampling_follows_the_deepest_members_distribution(k, draft_threshold, draft_blocks):
    """k = 2 gated at 0.3: the first round drafts one or two tokens depending on the draft's confidence,
    and the joint law of the first two tokens must still be the deepest member's. draft_blocks=False: the
    drafting member has DaE blocks and drafts without them (its law before DaE is the one rejected)."""
    vocab, temperature, n = 8, 0.8, 1500
    fam = agreeing_family(vocab=vocab, exits=(1, 2), alpha=0.6, init=0.6, seed=2)
    drafter = fam
    if not draft_blocks:
        fam = expand(fam, 1, 2).eval()
        torch.manual_seed(4)
        with torch.no_grad():  # blocks that move member 1's law (zero-residual blocks would not)
            for layer in fam.exits["1"].layers[fam.config.branch_layers(1) :]:
                layer.self_attn.o_proj.weight.normal_(0, 0.3)
                layer.mlp.down_proj.weight.normal_(0, 0.3)
        drafter = without_blocks(fam)
        moved = 0.5 * np.abs(
            joint_first_two(fam, [5], 1, temperature) - joint_first_two(drafter, [5], 1, temperature)
        )
        assert moved.sum() > 0.05  # the blocks change member 1's law: the drafter is not the dense member
    prompt = [5]  # one token: no prefill, so each sample is 1-2 rounds (keeps the test fast)
    target = joint_first_two(fam, prompt, 2, temperature)
    draft = joint_first_two(drafter, prompt, 1, temperature)
    tv_draft = 0.5 * np.abs(target - draft).sum()
    assert tv_draft > 0.3, f"the fixture has no power: draft and target laws are {tv_draft:.3f} apart in TV"
    gen = torch.Generator().manual_seed(1234)
    ids = torch.tensor([prompt])
    counts = np.zeros((vocab, vocab))
    accepted = proposed = 0
    lengths = set()
    for _ in range(n):
        out = speculative_generate(
            fam,
            ids,
            draft_exit=1,
            k=k,
            max_new_tokens=3 if draft_threshold else 2,
            do_sample=True,
            temperature=temperature,
            generator=gen,
            draft_threshold=draft_threshold,
            draft_blocks=draft_blocks,
        )
        counts[out.new_tokens[0], out.new_tokens[1]] += 1
        accepted, proposed = accepted + out.accepted, proposed + out.proposed
        lengths.add(out.proposed_per_round[0])
    assert 0 < accepted < proposed  # both the accept and the residual-sampling paths ran
    assert lengths == ({1} if draft_threshold is None else {1, 2})  # the gate cut some first rounds
    emp = counts / n

    def chi2_pvalue(law):
        exp = (law / law.sum() * n).ravel()
        obs = counts.ravel()
        big = exp >= 5  # pool the sparse cells into one
        obs_c = np.append(obs[big], obs[~big].sum())
        exp_c = np.append(exp[big], exp[~big].sum())
        return stats.chisquare(obs_c, exp_c).pvalue

    assert chi2_pvalue(target) > 1e-3
    assert chi2_pvalue(draft) < 1e-6  # the same sample rejects the draft's own law
    assert 0.5 * np.abs(emp - target).sum() < 0.1  # (about 0.03 expected at n = 1500)


def test_invalid_arguments():
    fam = agreeing_family(exits=(2, 4))
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="batch size 1"):
        speculative_generate(fam, ids.repeat(2, 1), draft_exit=2)
    with pytest.raises(ValueError, match="deepest member"):
        speculative_generate(fam, ids, draft_exit=4)
    with pytest.raises(ValueError):
        speculative_generate(fam, ids, draft_exit=3)  # not a member
    with pytest.raises(ValueError, match="k "):
        speculative_generate(fam, ids, draft_exit=2, k=0)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(fam, ids, draft_exit=2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="left-padding"):
        speculative_generate(fam, ids, draft_exit=2, attention_mask=torch.tensor([[1, 0, 1]]))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="draft_threshold"):
            speculative_generate(fam, ids, draft_exit=2, draft_threshold=bad)
    with pytest.raises(TypeError, match="draft_blocks"):
        speculative_generate(fam, ids, draft_exit=2, draft_blocks="no")


def test_benchmark_script_runs_every_configuration(tmp_path, monkeypatch):
    """benchmarks/experiments/speculative.py on a random family: the controls and every draft x k x gate
    configuration decode the same tokens (exit status 0), and the JSON rows say so."""
    script = Path(__file__).resolve().parents[2] / "benchmarks/experiments/speculative.py"
    spec = importlib.util.spec_from_file_location("speculative_bench", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    out = tmp_path / "spec.json"
    argv = ["--random-init", "--num-prompts", "2", "--max-new-tokens", "6", "--drafts", "2", "--k", "1,3"]
    assert module.main([*argv, "--thresholds", "0,0.5", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["configuration"] for r in rows] == [
        "generate@8",
        "loop@8",
        "spec 2/1/0",
        "spec 2/1/0.5",
        "spec 2/3/0",
        "spec 2/3/0.5",
        "spec 2-dae/1/0",
        "spec 2-dae/1/0.5",
        "spec 2-dae/3/0",
        "spec 2-dae/3/0.5",
    ]
    assert all(r["same_tokens"] and r["tokens"] == 12 for r in rows)
    assert [r["draft_blocks"] for r in rows[2:]] == [True] * 4 + [False] * 4
    assert rows[4]["drafts_per_token"] > rows[2]["drafts_per_token"]  # k = 3 drafts more than k = 1
    with pytest.raises(SystemExit, match="--drafts"):
        module.main([*argv, "--drafts", "8"])
    # member 4 of the random family has no DaE blocks: nothing to draft without them
    with pytest.raises(SystemExit, match="none of the drafting members"):
        module.main([*argv, "--drafts", "4", "--draft-blocks", "off"])
    with pytest.raises(SystemExit):
        module.parse_args(["--draft-blocks", "maybe"])
    # Sampling: every configuration samples (seeded per prompt); completions are not compared.
    assert module.main([*argv, "--thresholds", "0.5", "--temperature", "0.8", "--json", str(out)]) == 0
    sampled = json.loads(out.read_text())
    assert sampled["temperature"] == 0.8 and len(sampled["rows"]) == 6
    assert all(r["same_tokens"] is None and r["tokens"] == 12 for r in sampled["rows"])
    with pytest.raises(SystemExit):
        module.parse_args(["--temperature", "-1"])
