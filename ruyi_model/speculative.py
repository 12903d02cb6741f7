"""Self-speculative decoding: a shallow member of the family drafts, the deepest member verifies.

    out = speculative_generate(model, ids, draft_exit=2, k=4, max_new_tokens=64)
    out = speculative_generate(model, ids, draft_exit=2, k=16, draft_threshold=0.95)  # adaptive length
    out = speculative_generate(model, ids, draft_exit=2, k=16, draft_threshold=0.95, draft_blocks=False)
    out.sequences, out.acceptance_rate, out.target_forwards

Each round the draft member proposes `k` tokens one at a time; the deepest member scores all k+1
positions in one forward. Greedy: the longest prefix agreeing with the deepest member's argmax is
kept, plus the deepest member's own next token, so the output is token for token
`model.generate(ids, exit_layer=L, do_sample=False)`. Sampling: speculative sampling (Leviathan et al.
2023, Chen et al. 2023): drafted y is kept with probability min(1, p(y)/q(y)), a rejection is replaced
by a sample of norm(max(0, p - q)), and a round with every draft kept adds a bonus token from p; the
output then follows the deepest member's distribution (p, q after the same temperature/top-k/top-p).

Draft length: `k` drafts per round, or, with `draft_threshold`, up to `k` drafts that stop after the
first one the draft member is less sure of than the threshold (its probability of the token it drafted):
long rounds where the draft agrees with the deepest member, short ones where it is likely to be wrong.
The rule reads only the draft's own distributions, so the verification (and losslessness) is unchanged.

Draft depth: with `draft_blocks=False` a DaE member drafts without its DaE blocks, i.e. with the layers
it had before expansion (its backbone and branch layers) and its own norm and head: a cheaper draft
that agrees with the deepest member almost as often (the blocks' gain is on the few tokens that decide
an answer, which the verifier decides anyway). A member without DaE blocks drafts as it is.

Backbone reuse: both members write into ONE DynamicCache (every decoder layer of a family owns its own
slot). The layers the two members share, backbone layers [0, s) with s = `backbone_depth(draft_exit)`,
run once per token: the draft's pass writes their KV and keeps its hidden state after layer s; the
verifier then runs only its own layers (backbone s..L-1 and its DaE blocks) over the k+1 positions,
starting from those hidden states, plus one pass of the shared layers over the last drafted token
(which the draft never consumed). Rollback: after verification every slot is cropped to the
committed tokens; the draft's own slots may lag by positions it has not consumed yet, whose hidden
states after layer s are kept (the backlog) and fed to the draft's layers at its next step.

Batch size 1 only (a left-padded prompt is accepted; its padding is dropped). DynamicCache only.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.masking_utils import create_causal_mask

from ruyi_model.modeling import FamilialForCausalLM


@dataclass
class SpeculativeOutput:
    """Result of `speculative_generate`.

    Attributes:
        sequences: 1 x (prompt + new) token ids (a left-padded prompt without its padding).
        new_tokens: the generated tokens (ending with an EOS token if one was produced).
        proposed: tokens drafted by the draft member (summed over rounds).
        accepted: drafted tokens kept by the verifier.
        target_forwards: verification forwards of the deepest member (the prompt prefill not counted).
        draft_forwards: single-token forwards of the draft member.
        accepted_per_round: drafted tokens kept in each round.
        proposed_per_round: tokens drafted in each round (below k where `draft_threshold` stopped it).
    """

    sequences: torch.LongTensor
    new_tokens: list[int]
    proposed: int = 0
    accepted: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    accepted_per_round: list[int] = field(default_factory=list)
    proposed_per_round: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed (0.0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return len(self.new_tokens) / self.target_forwards if self.target_forwards else 0.0


class SpeculativeState:
    """The decoding state of one sequence: the shared cache, committed tokens and the draft backlog.

    `prefill(prompt)` then `step(k)` (one draft/verify round; returns the committed new tokens).
    The arguments are `speculative_generate`'s (`draft_blocks=False`: the draft runs its member's layers
    but its DaE blocks).
    Invariant between rounds (N = len(tokens), the last token is not yet in any cache): the shared
    and verifier slots hold positions [0, N-1); the draft's own slots hold [0, N-1-e), and `backlog`
    (1 x e x hidden) holds the hidden states after the shared layers of positions [N-1-e, N-1).
    """

    def __init__(
        self,
        model: FamilialForCausalLM,
        draft_exit: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        draft_threshold: float | None = None,
        draft_blocks: bool = True,
    ):
        cfg = model.config
        self.model = model
        self.draft_exit = cfg.check_exit(draft_exit)
        if not isinstance(draft_blocks, bool):
            raise TypeError(f"draft_blocks must be True or False, got {draft_blocks!r}")
        self.target_exit = cfg.exit_layers[-1]
        if self.draft_exit == self.target_exit:
            raise ValueError(
                f"draft_exit={draft_exit} is the deepest member; the draft must be a shallower "
                f"member (one of {cfg.exit_layers[:-1]})"
            )
        draft_layers = model.member_layers(self.draft_exit)
        blocks = cfg.num_dae_blocks(self.draft_exit)
        if not draft_blocks and blocks:  # the member as it was before DaE: its blocks are its last layers
            draft_layers = draft_layers[:-blocks]
        target_layers = model.member_layers(self.target_exit)
        s = 0
        while s < min(len(draft_layers), len(target_layers)) and draft_layers[s] is target_layers[s]:
            s += 1
        self.shared, self.draft_only, self.target_only = draft_layers[:s], draft_layers[s:], target_layers[s:]
        self.do_sample, self.generator = do_sample, generator
        if draft_threshold is not None and not 0.0 <= draft_threshold <= 1.0:
            raise ValueError(f"draft_threshold must be in [0, 1] (or None: off), got {draft_threshold}")
        self.draft_threshold = draft_threshold
        warpers = LogitsProcessorList()
        if do_sample:
            if not temperature > 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
            if not 0 < top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {top_p}")
            if top_k < 0:
                raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_k:
                warpers.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
        self.warpers = warpers
        self.cache = DynamicCache()
        while len(self.cache.layers) < model.num_cache_slots:
            self.cache.layers.append(DynamicLayer())
        self.tokens: list[int] = []
        self.backlog: torch.Tensor | None = None

    # --- pieces --------------------------------------------------------------------------------
    def _embed(self, token_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.model.device)
        return self.model.model.embed_tokens(ids)

    def _slot_len(self, layers) -> int:
        return self.cache.layers[layers[0].self_attn.layer_idx].get_seq_length() if layers else 0

    def _run(self, layers, h: torch.Tensor, start: int, tap: int | None = None):
        """Runs `layers` over h (positions start..), appending their KV to the cache. With `tap`, returns
        (hidden state after layers[:tap], after all of them): one mask and one rotary table for both."""
        if not layers or h.shape[1] == 0:
            return h if tap is None else (h, h)
        first = layers[0].self_attn.layer_idx
        have = self.cache.layers[first].get_seq_length()
        if have != start:  # an internal invariant: the positions must continue the slot exactly
            raise RuntimeError(
                f"speculative cache out of step: slot {first} holds {have} positions, "
                f"feeding position {start}"
            )
        pos = torch.arange(start, start + h.shape[1], device=h.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.model.config,
            inputs_embeds=h,
            attention_mask=None,
            past_key_values=self.cache,
            position_ids=pos,
            layer_idx=first,
        )
        pos_emb = self.model.model.rotary_emb(h, pos)
        tapped = h
        for i, layer in enumerate(layers):
            if i == tap:
                tapped = h
            h = layer(
                h,
                attention_mask=mask,
                position_embeddings=pos_emb,
                position_ids=pos,
                past_key_values=self.cache,
                use_cache=True,
            )
        if tap is None:
            return h
        return (h if tap >= len(layers) else tapped), h

    def _probs(self, exit_layer: int, h: torch.Tensor) -> torch.Tensor:
        """Member `exit_layer`'s next-token distributions (T x V, float32) at every position of h."""
        logits = self.model.exit_head(exit_layer)(self.model.exits[str(exit_layer)].norm(h))[0].float()
        if self.do_sample:
            logits = self.warpers(None, logits)
        return torch.softmax(logits, dim=-1)

    def _pick(self, probs: torch.Tensor) -> int:
        if not self.do_sample:
            return int(probs.argmax())
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _crop(self, layers, length: int) -> None:
        for layer in layers:
            slot = self.cache.layers[layer.self_attn.layer_idx]
            extra = slot.get_seq_length() - length
            if extra > 0:
                slot.crop(-extra)

    # --- decoding ------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompt: list[int]) -> None:
        """Fills every slot with the prompt but its last token (that one starts the first round)."""
        if self.tokens:
            raise RuntimeError("prefill() called twice on one SpeculativeState")
        if not prompt:
            raise ValueError("the prompt is empty")
        self.tokens = list(prompt)
        h = self._run(self.shared, self._embed(self.tokens[:-1]), 0)
        self._run(self.draft_only, h, 0)
        self._run(self.target_only, h, 0)
        self.backlog = h[:, :0]

    @torch.no_grad()
    def step(self, k: int) -> tuple[list[int], int, int]:
        """One round: drafts up to k tokens, verifies them; returns (committed new tokens, drafts
        accepted, drafts proposed). With `draft_threshold`, drafting stops after the first token the
        draft member gives a probability below it (that token is still verified)."""
        n = len(self.tokens)
        last = self.tokens[-1]
        backlog_len = self.backlog.shape[1]
        drafted: list[int] = []
        q_rows: list[torch.Tensor] = []
        hiddens: list[torch.Tensor] = []
        for j in range(k):
            pos = n - 1 + j
            x = self._embed([last if j == 0 else drafted[-1]])
            if j == 0 and backlog_len:  # positions the draft's own layers have not seen yet, then this one
                h = self._run(self.shared, x, pos)
                out = self._run(self.draft_only, torch.cat([self.backlog, h], dim=1), pos - backlog_len)
            else:  # every slot of the draft is at `pos`: the shared and own layers in one pass
                h, out = self._run(self.shared + self.draft_only, x, pos, tap=len(self.shared))
            hiddens.append(h)
            q = self._probs(self.draft_exit, out[:, -1:])[0]
            q_rows.append(q)
            drafted.append(self._pick(q))
            if self.draft_threshold is not None and float(q[drafted[-1]]) < self.draft_threshold:
                break
        k = len(drafted)
        # Verify: the shared layers still need the last drafted token (or `last` when k == 0).
        h = self._run(self.shared, self._embed([drafted[-1] if k else last]), n - 1 + k)
        hiddens.append(h)
        verify_in = torch.cat(hiddens, dim=1)  # positions n-1 .. n-1+k
        p = self._probs(self.target_exit, self._run(self.target_only, verify_in, n - 1))
        accepted, nxt = self._accept(drafted, q_rows, p)
        new = drafted[:accepted] + [nxt]
        # Rollback: keep exactly the committed positions [0, n + accepted) (the new last token is pending).
        keep = n + accepted
        self._crop(self.shared, keep)
        self._crop(self.target_only, keep)
        self._crop(self.draft_only, keep)
        if k:
            pool, pool_start = verify_in, n - 1
        else:
            pool, pool_start = torch.cat([self.backlog, verify_in], dim=1), n - 1 - backlog_len
        draft_len = self._slot_len(self.draft_only) if self.draft_only else keep
        self.backlog = pool[:, draft_len - pool_start : keep - pool_start]
        self.tokens.extend(new)
        return new, accepted, k

    def rounds(
        self, max_new_tokens: int, k: int, stops: Collection[int] = ()
    ) -> Iterator[tuple[list[int], int, int]]:
        """Decodes (after `prefill`) up to `max_new_tokens` tokens in rounds of up to `k` drafts, the
        last round drafting fewer so as not to overshoot; yields each round's `step` result. With
        `stops`, the round that produces a stop token yields its tokens up to and including the first
        one, and is the last (a caller with other stop rules, a stop string, leaves the loop itself)."""
        produced = 0
        while produced < max_new_tokens:
            new, accepted, proposed = self.step(min(k, max_new_tokens - produced - 1))
            produced += len(new)
            hit = next((i for i, t in enumerate(new) if t in stops), None)
            yield (new if hit is None else new[: hit + 1]), accepted, proposed
            if hit is not None:
                return

    def _accept(self, drafted: list[int], q_rows: list[torch.Tensor], p: torch.Tensor) -> tuple[int, int]:
        """(number of drafts kept, next token) under greedy or speculative sampling."""
        for j, y in enumerate(drafted):
            if not self.do_sample:
                if int(p[j].argmax()) != y:
                    return j, int(p[j].argmax())
                continue
            q = q_rows[j]
            u = torch.rand((), generator=self.generator, device=p.device)
            if u * q[y] < p[j, y]:  # accept with probability min(1, p/q)
                continue
            residual = torch.clamp(p[j] - q, min=0.0)
            total = residual.sum()
            # total == 0 means p == q, where a rejection cannot happen except by rounding: fall back to p.
            residual = residual / total if total > 0 else p[j]
            return j, int(torch.multinomial(residual, 1, generator=self.generator))
        return len(drafted), self._pick(p[len(drafted)])


def speculative_generate(
    model: FamilialForCausalLM,
    input_ids: torch.LongTensor,
    draft_exit: int,
    k: int = 4,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    draft_threshold: float | None = None,
    draft_blocks: bool = True,
) -> SpeculativeOutput:
    """Generates with the deepest member of `model`, drafted by member `draft_exit` (see module docstring).

    Args:
        input_ids: 1 x T prompt (batch size 1).
        draft_exit: the drafting member (any member but the deepest).
        k: tokens drafted per round (>= 1); the last round drafts fewer so as not to overshoot.
        draft_threshold: confidence-gated draft length: a round stops drafting after the first token
            to which the draft member gives a probability below this (that token is still verified),
            so rounds are long where the draft is sure and short where it is not. None: always k.
            Greedy output and the sampled distribution are unchanged (the stopping rule reads only the
            draft's own distributions).
        draft_blocks: False: a DaE member drafts without its DaE blocks (its layers before expansion,
            then its own norm and head), a cheaper draft; no effect on a member without blocks. The
            output is the deepest member's either way.
        do_sample, temperature, top_k, top_p: sampling as in `generate` (top_k=0 / top_p=1: off);
            greedy when do_sample is False.
        eos_token_id: stop after producing this token (or any of these tokens).
        attention_mask: 1 x T, zeros only as left padding (dropped).
        generator: the torch.Generator for sampling (reproducible runs), on the model's device.
    """
    if not isinstance(model, FamilialForCausalLM):
        raise TypeError(f"speculative_generate needs a FamilialForCausalLM, got {type(model).__name__}")
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"speculative_generate supports batch size 1: input_ids has shape {tuple(input_ids.shape)}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (tokens drafted per round) must be an integer >= 1, got {k!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    prompt = input_ids[0].tolist()
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}"
            )
        mask = attention_mask[0].tolist()
        n_pad = next((i for i, v in enumerate(mask) if v), len(mask))
        if not all(mask[n_pad:]):
            raise ValueError("attention_mask may only mask a left-padding prefix (batch size 1)")
        prompt = prompt[n_pad:]
    if not prompt:
        raise ValueError("the prompt is empty (no unmasked token)")
    if eos_token_id is None:
        eos = set()
    else:
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    state = SpeculativeState(
        model,
        draft_exit,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        draft_threshold=draft_threshold,
        draft_blocks=draft_blocks,
    )
    out = SpeculativeOutput(sequences=input_ids[:, :0], new_tokens=[])
    state.prefill(prompt)
    for new, accepted, proposed in state.rounds(max_new_tokens, k, stops=eos):
        out.proposed += proposed
        out.accepted += accepted
        out.draft_forwards += proposed
        out.target_forwards += 1
        out.accepted_per_round.append(accepted)
        out.proposed_per_round.append(proposed)
        out.new_tokens.extend(new)
    out.sequences = torch.tensor([prompt + out.new_tokens], dtype=torch.long, device=input_ids.device)
    return out


__all__ = ["speculative_generate", "SpeculativeOutput", "SpeculativeState"]
