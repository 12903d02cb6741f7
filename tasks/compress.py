"""Stage `compress`: DaE "Decompose" (Ruyi2 4.4) of the DaE member's added blocks and head.

Command line:
    python -m tasks.compress [--params params.yaml] [--set compress.ratio=0.5] [--set compress.heal_steps=0]
    (or `ruyi stage compress ...`)

Reads:
    artifacts/rl/                      the trained family (save_family directory) with DaE blocks
    artifacts/family_sft/              the family before DaE: the control "before DaE" state of the member
    data/validated/corpus_train.jsonl  calibration text; a carved-out slice decides on healing (step 3)
    data/validated/sft.jsonl           calibration and healing data (chat format); a carved-out slice
                                       decides on healing
    data/validated/corpus_val.jsonl    held-out loss before/after (reported)
    data/validated/eval.jsonl          held-out solution loss before/after (reported)
Writes:
    artifacts/compress/                the compressed family (low-rank factors in config.lowrank_ranks)
    metrics/compress.json              added_params_before/after/reduction, ratio, per exit `exit_<d>`
                                       losses before/after and relative changes, within_budget,
                                       removed_fraction (blocks, head, blocks_and_head), dae_control
    reports/compress/decompose_report.json  per-matrix rank, allocated ratio and truncation loss
    reports/compress/heal_selection.json    ids of the documents/rows of the healing-decision set
                                            and of the healing rows (checked disjoint)
    plots/compress/compress.png + allocation.csv + heal_loss.csv

What happens, in order:
1. The DaE member is `params.dae_exit` (`expand.exit_layer`, default the smallest member); it must have
   DaE blocks (`config.dae_blocks`), otherwise the stage stops naming the checkpoint.
2. Held-out losses of every member before compression: next-token CE on `loss_batches` x `batch_size`
   packed `seq_len`-token blocks of corpus_val, and on the assistant turns of the first
   `loss_batches` x `batch_size` eval problems under the chat template (tasks/evaluate.py helpers).
   These are the reported figures; they never influence what the stage publishes.
3. The healing-decision ("selection") set, carved deterministically out of the training data and
   used for nothing else: (a) corpus_train documents whose text is not in corpus_val, taken in
   the order of sha256(text) until they fill `loss_batches` x `batch_size` packed `seq_len`-token
   blocks; (b) the first `loss_batches` x `batch_size` sft.jsonl rows, in the order of
   sha256(id), whose question (`tasks.data.mathgen.normalize_question`) and id are not in eval.jsonl.
   Both are removed from the calibration data and from the healing data, so the decision is made on
   text that neither the decomposition, nor the fine-tune, nor the reported evaluation sees
   (`reports/compress/heal_selection.json` lists the ids; disjoint by construction, tested). The
   slice is carved whether or not healing runs, so the decomposition does not depend on heal_steps.
4. `ruyi_model.dae.decompose(model, matrix_ratio, calibration, allocation, include_head, exit_layer=d)`:
   activation-aware (whitened) SVD of every linear of the DaE blocks and, with `include_head`, the
   member's head, ranks allocated per matrix type from each matrix's truncation loss (loss_aware).
   `ratio` is the fraction of the *added parameters* to remove (the paper's "-40% of the added
   parameters"); the norms of the DaE blocks (and the head with `include_head: false`) stay dense,
   so the decomposed matrices are asked for `matrix_ratio = ratio * added / decomposable` (at most
   the largest removable share, else an error naming compress.ratio). Each matrix's integer rank is
   rounded down, so `added_params_reduction >= ratio` holds; the stage checks it.
   Calibration: `calibration_batches` batches of `batch_size` blocks of `seq_len` tokens; a share
   `calibration_sft_fraction` of the blocks is packed from SFT chat text (the member was SFT/RL-tuned
   on math chat, so its activations on that format are what the truncation should preserve; the paper
   does not say what it calibrated on), the rest from corpus_train (general text, the CPT
   distribution), both without the selection slice. Documents are taken in a seeded random order
   (`seed`).
5. Optional healing (`heal_steps` > 0): AdamW (`heal_lr`, no weight decay, grad clip 1.0) on the CE of
   the DaE member on SFT chat examples (assistant tokens only; the selection rows excluded), batches
   of `batch_size` drawn with a seeded generator. Trainable: the low-rank factors of the DaE member
   and its final norm, nothing else (a subset of `ruyi_model.dae.dae_trainable_parameters`): every
   other member, and the member's own branch layer, backbone and embedding, stay bit-identical. This
   is checked after the stage (`tasks.training.members_unchanged`: every parameter outside the DaE
   member's blocks, norm and head, and the other members' logits on a calibration batch, with
   torch.equal; a violation is an error), and the other members' relative loss changes are 0.0
   exactly. Healing is kept only if it does not make the member worse on the selection set (its
   corpus and SFT-solution losses, worst case: `heal_selection` in the metrics holds both losses
   before and after healing); otherwise the decomposed factors are restored (`heal_kept`). In the
   tiny chain an unconditional 20-step fine-tune at `heal_lr` 1e-3 on SFT text raised the
   general-text loss by about 22%, far more than the decomposition itself cost (benchmarks/RESULTS.md
   has the figures of the recorded run): an unconditional fine-tune would have been the wrong default.
6. Losses after; per exit the relative change (after - before) / before on each held-out set
   (`loss_relative_change`: corpus_val, `solution_loss_relative_change`: eval solutions) and
   `relative_loss_change` = the larger of the two (what the quality gates check). The DaE member also
   reports `loss_decomposed` / `solution_loss_decomposed`: after the decomposition, before healing.
   `within_budget` = every exit's `relative_loss_change` <= `max_relative_loss_increase` (Ruyi2
   reports < 2% at -40%). The budget is reported, not enforced: the quality gates decide.

7. The control (`dae_control`): the DaE member's held-out corpus loss, eval-solution loss (nats) and
   greedy accuracy (first `accuracy_problems` eval problems, `max_new_tokens`) in three states: before
   DaE (the same member in artifacts/family_sft, without blocks), dense (artifacts/rl) and decomposed
   (this stage's output); `gain_retained = (decomposed - before) / (dense - before)` per quantity (1: the
   decomposition keeps all of DaE's gain, 0: none of it; None when DaE gained nothing).

Runs on CUDA when available (`tasks.training.device_for_training`), else CPU (bitwise reproducible).

"Added parameters" are the parameters of the DaE blocks plus the DaE member's head: the blocks are
what expansion added, and the head is counted because Ruyi2 decomposes it together with them.
`added_params_reduction` = 1 - after / before (>= `ratio`, the requested fraction of the added
parameters); `matrix_ratio` is what the decomposed matrices were asked for and `achieved_ratio` the
fraction the decomposition removed from them (ranks are integers, and matrices whose factors would not
be smaller stay dense).
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.artifacts import load_family, save_family
from tasks.core.files import atomic_file, read_jsonl, save_figure, write_json, write_metrics
from tasks.core.params import Params
from tasks.core.paths import plots_dir, stage_dir, validated_path
from tasks.core.stage import StageError, seed_everything, stage_main
from tasks.training.batches import read_corpus, read_sft
from tasks.training.heldout import check_family_inputs, first_blocks, member_losses, solution_examples

log = logging.getLogger("ruyi.compress")


def added_parameters(model, exit_layer: int) -> int:
    """Parameters of member `exit_layer`'s DaE blocks plus its head (low-rank: the two factors)."""
    return sum(added_parts(model, exit_layer).values())


def healing_parameters(model, exit_layer: int) -> list[tuple[str, object]]:
    """What healing trains: the low-rank factors of member `exit_layer` and its final norm (a subset of
    `ruyi_model.dae.dae_trainable_parameters`)."""
    from ruyi_model.dae import dae_trainable_parameters
    from ruyi_model.modeling import LowRankLinear

    lowrank = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, LowRankLinear)
               for p in ("weight_a", "weight_b")}
    norm = f"exits.{exit_layer}.norm.weight"
    chosen = [(n, p) for n, p in dae_trainable_parameters(model, exit_layer) if n in lowrank or n == norm]
    if not any(n in lowrank for n, _ in chosen):
        raise RuntimeError(f"no low-rank factors found on member {exit_layer} after decomposition")
    return chosen


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class SelectionSplit:
    """The healing-decision ("selection") slice carved out of the training data (module docstring, step 3).

    Attributes:
        corpus_texts: corpus_train texts for calibration (the selection documents removed), file order.
        sft_rows: sft.jsonl rows for calibration and healing (the selection rows removed), file order.
        selection_corpus: the selection documents, in packing order.
        selection_sft: the selection SFT rows, in order.
        corpus_blocks: the selection documents packed into `loss_batches` x `batch_size` blocks.
    """

    corpus_texts: list[str]
    sft_rows: list[dict[str, Any]]
    selection_corpus: list[dict[str, Any]]
    selection_sft: list[dict[str, Any]]
    corpus_blocks: Any

    @property
    def report(self) -> dict[str, Any]:
        """What reports/compress/heal_selection.json records: the rule and the ids on each side."""
        return {
            "rule": "corpus_train docs not in corpus_val, by sha256(text); sft rows not in eval.jsonl (id or "
                    "normalised question), by sha256(id); both excluded from calibration and healing",
            "corpus_train_ids": [str(r["id"]) for r in self.selection_corpus],
            "sft_ids": [str(r["id"]) for r in self.selection_sft],
            "healing_sft_ids": [str(r["id"]) for r in self.sft_rows],
            "calibration_corpus_documents": len(self.corpus_texts),
        }


def carve_selection(params: Params, tokenizer, corpus_rows: list[dict], sft_rows: list[dict],
                    val_rows: list[dict], eval_rows: list[dict]) -> SelectionSplit:
    """Carves the healing-decision set out of corpus_train and sft.jsonl (deterministic, order-independent).

    Documents whose text is in corpus_val and SFT rows whose id or normalised question is in eval.jsonl
    are never chosen, so the set is disjoint from the reported held-out sets by construction; what is
    chosen is removed from the calibration and healing data. Errors name the file and the parameters.
    """
    from tasks.data.mathgen import normalize_question
    from tasks.training.batches import pack_documents, tokenize_texts

    cfg = params.compress
    n = cfg.loss_batches * cfg.batch_size
    train_file, sft_file = validated_path(params, "corpus_train.jsonl"), validated_path(params, "sft.jsonl")

    val_texts = {r["text"].strip() for r in val_rows}
    order = sorted((i for i, r in enumerate(corpus_rows) if r["text"].strip() not in val_texts),
                   key=lambda i: (_sha(corpus_rows[i]["text"]), i))
    chosen, token_lists, tokens, need = [], [], 0, n * cfg.seq_len
    for start in range(0, len(order), 64):
        part = order[start:start + 64]
        ids = tokenize_texts(tokenizer, [corpus_rows[i]["text"] for i in part], desc="tokenize selection")
        for i, t in zip(part, ids):
            if tokens >= need:
                break
            chosen.append(i)
            token_lists.append(t)
            tokens += len(t) + 1
        if tokens >= need:
            break
    blocks = pack_documents(token_lists, tokenizer.eos_token_id, cfg.seq_len)
    if blocks.shape[0] < n or len(chosen) >= len(corpus_rows):
        raise StageError(f"{train_file}: too little text outside corpus_val for the healing-decision set "
                         f"({n} blocks of {cfg.seq_len} tokens = compress.loss_batches x compress.batch_size) "
                         "plus calibration text; lower compress.loss_batches, compress.batch_size or compress.seq_len")
    blocks = blocks[:n]

    eval_ids = {str(r["id"]) for r in eval_rows}
    eval_questions = {normalize_question(str(r["question"])) for r in eval_rows}
    candidates = sorted((i for i, r in enumerate(sft_rows)
                         if str(r["id"]) not in eval_ids and normalize_question(r["prompt"]) not in eval_questions),
                        key=lambda i: (_sha(str(sft_rows[i]["id"])), i))
    sft_chosen = candidates[:n]
    if len(sft_chosen) < n or len(sft_chosen) >= len(sft_rows):
        raise StageError(f"{sft_file}: {len(candidates)} of {len(sft_rows)} rows are not eval.jsonl problems; the "
                         f"healing-decision set needs {n} (compress.loss_batches x compress.batch_size) and "
                         "calibration/healing needs at least one more; lower compress.loss_batches or "
                         "compress.batch_size")
    sel_corpus, sel_sft = set(chosen), set(sft_chosen)
    return SelectionSplit(
        corpus_texts=[r["text"] for i, r in enumerate(corpus_rows) if i not in sel_corpus],
        sft_rows=[r for i, r in enumerate(sft_rows) if i not in sel_sft],
        selection_corpus=[corpus_rows[i] for i in chosen],
        selection_sft=[sft_rows[i] for i in sft_chosen],
        corpus_blocks=blocks)


def calibration_data(params: Params, tokenizer, corpus_texts: list[str], sft_rows: list[dict]) -> list:
    """`calibration_batches` LongTensor batches (batch_size x seq_len) mixing corpus_train and SFT chat text
    (`corpus_texts`, `sft_rows`: what `carve_selection` left for calibration)."""
    import torch

    cfg = params.compress
    total = cfg.calibration_batches * cfg.batch_size
    n_sft = round(total * cfg.calibration_sft_fraction)
    rng = random.Random(params.seed)
    parts = []
    if total - n_sft > 0:
        path = validated_path(params, "corpus_train.jsonl")
        texts = list(corpus_texts)
        rng.shuffle(texts)
        parts.append((path, total - n_sft, texts))
    if n_sft > 0:
        path = validated_path(params, "sft.jsonl")
        rows = list(sft_rows)
        rng.shuffle(rows)
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                                {"role": "assistant", "content": r["response"]}], tokenize=False)
                 for r in rows]
        parts.append((path, n_sft, texts))
    blocks = []
    for path, wanted, texts in parts:
        if not texts:
            raise StageError(f"{path}: no text left for calibration after the healing-decision set; lower "
                             "compress.loss_batches or compress.batch_size")
        got = first_blocks(tokenizer, texts, cfg.seq_len, wanted, path)
        if got.shape[0] < wanted:
            raise StageError(f"{path}: too little text for {wanted} calibration blocks of {cfg.seq_len} tokens "
                             f"(got {got.shape[0]}; the healing-decision set is excluded); lower "
                             "compress.calibration_batches or compress.seq_len")
        blocks.append(got)
    return list(torch.cat(blocks).split(cfg.batch_size))


def matrix_ratio_for(model, exit_layer: int, ratio: float, include_head: bool, added: int) -> tuple[float, float]:
    """(ratio to ask `decompose` for, the largest removable share) so that `ratio` of the `added`
    parameters go: the decomposable matrices carry the whole reduction (the norms stay dense)."""
    from ruyi_model.dae import _targets
    from ruyi_model.modeling import LowRankLinear

    shapes = [tuple(model.get_submodule(p).weight.shape) for p in _targets(model, exit_layer, include_head)
              if not isinstance(model.get_submodule(p), LowRankLinear)]
    dense = sum(m * n for m, n in shapes)
    if dense == 0:
        return 1.0, 0.0
    removable = sum(m * n - (m + n) for m, n in shapes) / dense      # every matrix at rank 1
    # 1e-6 absorbs float noise in the allocation's bisection and the rank epsilon (see ruyi_model.dae).
    return ratio * added / dense + 1e-6, removable


def heldout_losses(model, exits, corpus_batches, solution_batches) -> dict[int, dict[str, float]]:
    """`{d: {"loss": corpus CE, "solution_loss": eval-solution CE}}` of every member in `exits`."""
    corpus = member_losses(model, exits, corpus_batches)
    solutions = member_losses(model, exits, solution_batches)
    return {d: {"loss": corpus[d], "solution_loss": solutions[d]} for d in exits}


def heal(model, exit_layer: int, examples: dict, cfg, seed: int) -> list[float]:
    """Short fine-tune of the DaE member's low-rank factors + norm on SFT chat examples.

    Args:
        model: the decomposed family (trained in place; every other parameter is frozen meanwhile).
        exit_layer: the DaE member.
        examples: `tasks.training.build_sft_examples` tensors (N x T input_ids, attention_mask, labels).
        cfg: `CompressParams` (heal_steps, heal_lr, batch_size).
        seed: seeds the batch sampler.

    Returns:
        The training loss of every step.
    """
    import torch
    from tqdm.auto import tqdm

    from tasks.training.batches import trim_batch
    from tasks.training.loop import member_loss_fn

    trainable = healing_parameters(model, exit_layer)
    names = {n for n, _ in trainable}
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=cfg.heal_lr, weight_decay=0.0)
    loss_fn = member_loss_fn(exit_layer)
    generator = torch.Generator().manual_seed(seed)
    n = examples["input_ids"].shape[0]
    losses = []
    model.train()
    try:
        for step in tqdm(range(cfg.heal_steps), desc="compress: heal", unit="step"):
            idx = torch.randint(n, (min(cfg.batch_size, n),), generator=generator)
            batch = trim_batch({k: v[idx].to(model.device) for k, v in examples.items()})
            loss, _ = loss_fn(model, batch, step)
            if not torch.isfinite(loss):
                raise StageError(f"healing step {step}: the loss is {float(loss)}; lower compress.heal_lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
    return losses


def _plot(report: dict, heal_losses: list[float], out_dir: Path) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["matrices"]
    with atomic_file(out_dir / "allocation.csv") as f:
        writer = csv.writer(f)
        writer.writerow(["matrix", "group", "rank", "allocated_ratio", "params_before", "params_after",
                         "relative_loss"])
        for m in rows:
            writer.writerow([m["path"], m["group"], m["rank"], m["allocated_ratio"], m["params_before"],
                             m["params_after"], m["relative_loss"]])
    with atomic_file(out_dir / "heal_loss.csv") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss"])
        writer.writerows(enumerate(heal_losses, 1))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    labels = [m["path"].split(".", 2)[-1] for m in rows]
    kept = [m["params_after"] / m["params_before"] for m in rows]
    axes[0].bar(range(len(rows)), kept, color=["C1" if m["group"].endswith("lm_head") else "C0" for m in rows])
    axes[0].set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
    axes[0].set_ylabel("kept parameter fraction")
    axes[0].set_title("allocation per matrix")
    if heal_losses:
        axes[1].plot(range(1, len(heal_losses) + 1), heal_losses)
    axes[1].set_xlabel("healing step")
    axes[1].set_ylabel("SFT loss (DaE member)")
    axes[1].set_title("healing fine-tune")
    fig.tight_layout()
    save_figure(fig, out_dir / "compress.png")


@dataclass
class HeldoutSets:
    """The reported held-out data (the same before and after; they decide nothing)."""

    corpus_batches: list
    solution_batches: list
    problems: list[dict[str, Any]]     # eval rows for the DaE member's accuracy
    val_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]    # every eval.jsonl row (the selection slice must avoid them all)


@dataclass
class MemberState:
    """One member's quality in one state: held-out corpus loss, eval-solution loss (nats), accuracy."""

    loss: float
    solution_loss: float
    accuracy: float | None

    def to_dict(self) -> dict[str, float | None]:
        return {"loss": self.loss, "solution_loss": self.solution_loss, "accuracy": self.accuracy}


@dataclass
class HealOutcome:
    losses: list[float]
    kept: bool | None
    selection: dict[str, Any]


def gain_retained(before: float | None, dense: float | None, svd: float | None) -> float | None:
    """`(svd - before) / (dense - before)`: the share of DaE's gain (dense vs before DaE) the decomposed
    member keeps; 1 for a lossless decomposition, 0 when it falls back to the member before DaE. None when
    a value is missing or DaE changed nothing (no gain to retain)."""
    if before is None or dense is None or svd is None or dense == before:
        return None
    return (svd - before) / (dense - before)


def added_parts(model, exit_layer: int) -> dict[str, int]:
    """Parameters of member `exit_layer`'s DaE blocks and of its head (low-rank: the two factors)."""
    cfg = model.config
    n_branch = cfg.branch_layers(exit_layer)
    blocks = list(model.exits[str(exit_layer)].layers)[n_branch:n_branch + cfg.num_dae_blocks(exit_layer)]
    return {"blocks": sum(p.numel() for m in blocks for p in m.parameters()),
            "head": sum(p.numel() for p in model.exit_head(exit_layer).parameters())}


def removed_fractions(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """Removed share of the DaE blocks alone, of the head alone and of both together."""
    total_b, total_a = sum(before.values()), sum(after.values())
    out = {k: 1.0 - after[k] / before[k] if before[k] else 0.0 for k in before}
    out["blocks_and_head"] = 1.0 - total_a / total_b if total_b else 0.0
    return out


def member_accuracy(model, tokenizer, exit_layer: int, problems: list[dict[str, Any]], max_new_tokens: int,
                    where: Path) -> float | None:
    """Greedy exact-match accuracy of one member on `problems` (None without problems)."""
    from ruyi_model.decoding import greedy_generate
    from tasks.data.mathgen import answers_match, extract_answer

    if not problems:
        return None
    texts = greedy_generate(model, tokenizer, [str(p["question"]) for p in problems], exit_layer, max_new_tokens,
                            batch_size=32, progress=f"compress: decode exit {exit_layer}")
    correct = 0
    for row, (p, text) in enumerate(zip(problems, texts), 1):
        try:
            correct += answers_match(extract_answer(text), str(p["answer"]))
        except ValueError as e:
            raise StageError(f"{where}: row {row} (id={p['id']!r}): {e}") from None
    return correct / len(problems)


def member_state(model, tokenizer, d: int, held: HeldoutSets, cfg, where: Path) -> MemberState:
    losses = heldout_losses(model, [d], held.corpus_batches, held.solution_batches)[d]
    return MemberState(losses["loss"], losses["solution_loss"],
                       member_accuracy(model, tokenizer, d, held.problems, cfg.max_new_tokens, where))


def load_dae_family(params: Params, source: Path):
    """The family with DaE blocks on `params.dae_exit` (on the training device, eval mode), its tokenizer
    and the DaE member; errors name the checkpoint and the parameter."""
    from tasks.training.members import device_for_training

    cfg = params.compress
    model, tokenizer = load_family(source)
    model.to(device_for_training()).eval()
    check_family_inputs(model, tokenizer, source, cfg.seq_len, "compress.seq_len")
    mcfg = model.config
    d = params.dae_exit
    if d not in mcfg.exit_layers:
        raise StageError(f"{source}: the DaE member exit_layer={d} (expand.exit_layer) is not an exit of this "
                         f"family {mcfg.exit_layers}")
    if mcfg.num_dae_blocks(d) == 0:
        raise StageError(f"{source}: member {d} has no DaE blocks (config.dae_blocks={mcfg.dae_blocks}); "
                         "run the expand stage first")
    if cfg.include_head and mcfg.shared_heads:
        raise StageError(f"{source}: compress.include_head=true but the family shares one head among all members "
                         "(decomposing it would change every member); set compress.include_head=false")
    return model, tokenizer, d


def heldout_sets(params: Params, tokenizer) -> HeldoutSets:
    from tasks.training.batches import fixed_batches

    cfg = params.compress
    val_file, eval_file = validated_path(params, "corpus_val.jsonl"), validated_path(params, "eval.jsonl")
    n = cfg.loss_batches * cfg.batch_size
    val_rows = read_corpus(val_file)
    corpus = first_blocks(tokenizer, [r["text"] for r in val_rows], cfg.seq_len, n, val_file)
    all_eval_rows = read_jsonl(eval_file, required=("id", "question", "solution", "answer"))
    solutions = solution_examples(tokenizer, all_eval_rows[:n], cfg.seq_len, eval_file)
    return HeldoutSets(corpus_batches=fixed_batches({"input_ids": corpus}, cfg.batch_size, cfg.loss_batches),
                       solution_batches=fixed_batches(solutions, cfg.batch_size, cfg.loss_batches),
                       problems=all_eval_rows[:cfg.accuracy_problems], val_rows=val_rows, eval_rows=all_eval_rows)


def decompose_member(model, params: Params, d: int, calibration: list, source: Path):
    """Decomposes member `d` so that `compress.ratio` of its added parameters go; returns (model, report,
    matrix_ratio). Errors name compress.ratio / the checkpoint."""
    from ruyi_model.dae import decompose

    cfg = params.compress
    added_before = added_parameters(model, d)
    matrix_ratio, removable = matrix_ratio_for(model, d, cfg.ratio, cfg.include_head, added_before)
    if matrix_ratio >= removable:
        raise StageError(f"compress.ratio={cfg.ratio}: removing that share of member {d}'s {added_before} added "
                         f"parameters needs {matrix_ratio:.3f} of its decomposable matrices, but at most "
                         f"{removable:.3f} can go (include_head={cfg.include_head}); lower compress.ratio"
                         + ("" if cfg.include_head else " or set compress.include_head=true"))
    try:
        model = decompose(model, ratio=matrix_ratio, calibration=calibration, allocation=cfg.allocation,
                          include_head=cfg.include_head, exit_layer=d)
    except ValueError as e:
        raise StageError(f"{source}: cannot decompose member {d}: {e}") from None
    model.eval()
    added_after = added_parameters(model, d)
    if 1.0 - added_after / added_before < cfg.ratio:
        raise RuntimeError(f"compress: added parameters {added_before} -> {added_after} remove less than "
                           f"compress.ratio={cfg.ratio} (matrix ratio {matrix_ratio})")
    return model, model.decompose_report.to_dict(), matrix_ratio


def heal_if_better(model, tokenizer, d: int, params: Params, split: SelectionSplit) -> HealOutcome:
    """Optional healing (`heal_steps` > 0), kept only if it does not hurt on the selection set (module
    docstring, step 5); otherwise the decomposed factors are restored."""
    import torch

    from tasks.training.batches import build_sft_examples, fixed_batches

    cfg = params.compress
    sft_file = validated_path(params, "sft.jsonl")
    sel_corpus = fixed_batches({"input_ids": split.corpus_blocks}, cfg.batch_size, cfg.loss_batches)
    sel_solutions = fixed_batches(build_sft_examples(tokenizer, split.selection_sft, cfg.seq_len, str(sft_file))[0],
                                  cfg.batch_size, cfg.loss_batches)
    selection = {"corpus_blocks": int(split.corpus_blocks.shape[0]), "sft_rows": len(split.selection_sft),
                 "decomposed": heldout_losses(model, [d], sel_corpus, sel_solutions)[d],
                 "healed": None, "worst_ratio": None}
    if cfg.heal_steps == 0:
        return HealOutcome([], None, selection)
    examples, _ = build_sft_examples(tokenizer, split.sft_rows, cfg.seq_len, str(sft_file))
    saved = {n: p.detach().clone() for n, p in healing_parameters(model, d)}
    losses = heal(model, d, examples, cfg, params.seed)
    model.eval()
    healed = heldout_losses(model, [d], sel_corpus, sel_solutions)[d]
    # Kept only if it does not hurt on the selection set (corpus and SFT solutions, worst case): a short
    # fine-tune of the factors on SFT text can also pull the member away from general text.
    worst_ratio = max(healed[k] / selection["decomposed"][k] for k in ("loss", "solution_loss"))
    kept = worst_ratio <= 1.0
    selection.update(healed=healed, worst_ratio=worst_ratio)
    if not kept:
        with torch.no_grad():
            for n, p in healing_parameters(model, d):
                p.copy_(saved[n])
        log.warning("healing made member %d worse on the healing-decision set (%s -> %s): discarded", d,
                    selection["decomposed"], healed)
    return HealOutcome(losses, kept, selection)


def exit_entries(exits: list[int], d: int, before: dict, after: dict, decomposed: dict) -> dict[str, dict]:
    """Per exit: losses before/after and their relative changes (the non-DaE members must not change)."""
    out = {}
    for e in exits:
        entry: dict[str, Any] = {"changed": e == d}
        for key in ("loss", "solution_loss"):
            b, a = before[e][key], after[e][key]
            if e != d and a != b:
                raise RuntimeError(f"member {e} is not the DaE member but its {key} changed: {b} -> {a}")
            entry.update({f"{key}_before": b, f"{key}_after": a, f"{key}_relative_change": (a - b) / b})
        entry["relative_loss_change"] = max(entry["loss_relative_change"], entry["solution_loss_relative_change"])
        if e == d:
            entry.update({f"{key}_decomposed": decomposed[key] for key in ("loss", "solution_loss")})
        out[f"exit_{e}"] = entry
        log.info("exit %d: loss %.4f -> %.4f (%+.2f%%), solution loss %.4f -> %.4f (%+.2f%%)", e,
                 entry["loss_before"], entry["loss_after"], 100 * entry["loss_relative_change"],
                 entry["solution_loss_before"], entry["solution_loss_after"],
                 100 * entry["solution_loss_relative_change"])
    return out


def dae_control(states: dict[str, MemberState]) -> dict[str, Any]:
    """The DaE member in three states (before DaE = family_sft's member, dense, decomposed) and the share
    of DaE's gain the decomposition keeps, per quantity."""
    before, dense, svd = states["before_dae"], states["dense"], states["decomposed"]
    return {**{name: st.to_dict() for name, st in states.items()},
            "gain": {k: (None if getattr(dense, k) is None else getattr(dense, k) - getattr(before, k))
                     for k in ("loss", "solution_loss", "accuracy")},
            "gain_retained": {k: gain_retained(getattr(before, k), getattr(dense, k), getattr(svd, k))
                              for k in ("loss", "solution_loss", "accuracy")}}


def run(params: Params) -> dict:
    """Decomposes the DaE member of artifacts/rl, heals it, writes artifacts/compress; returns the metrics."""
    from ruyi_model.dae import dae_trainable_parameters
    from tasks.training.members import members_unchanged, snapshot_members

    cfg = params.compress
    seed_everything(params.seed)
    source = stage_dir(params, "rl")
    model, tokenizer, d = load_dae_family(params, source)
    exits = list(model.config.exit_layers)
    held = heldout_sets(params, tokenizer)
    eval_file = validated_path(params, "eval.jsonl")
    train_file, sft_file = validated_path(params, "corpus_train.jsonl"), validated_path(params, "sft.jsonl")
    # The healing-decision set: carved out of the training data, used for nothing else (docstring, step 3).
    split = carve_selection(params, tokenizer, read_corpus(train_file), read_sft(sft_file), held.val_rows,
                            held.eval_rows)
    calibration = calibration_data(params, tokenizer, split.corpus_texts, split.sft_rows)

    before = heldout_losses(model, exits, held.corpus_batches, held.solution_batches)
    states = {"dense": MemberState(before[d]["loss"], before[d]["solution_loss"],
                                   member_accuracy(model, tokenizer, d, held.problems, cfg.max_new_tokens, eval_file))}
    tuned, _ = load_family(stage_dir(params, "family_sft"))  # the member before DaE (no blocks)
    states["before_dae"] = member_state(tuned.to(model.device).eval(), tokenizer, d, held, cfg, eval_file)
    del tuned
    owned = [n for n, _ in dae_trainable_parameters(model, d)]
    probe = calibration[0].to(model.device)
    snapshot = snapshot_members(model, [e for e in exits if e != d], probe, exclude=owned)
    parts_before = added_parts(model, d)
    added_before = added_parameters(model, d)

    model, report, matrix_ratio = decompose_member(model, params, d, calibration, source)
    decomposed = heldout_losses(model, [d], held.corpus_batches, held.solution_batches)[d]
    healing = heal_if_better(model, tokenizer, d, params, split)
    unchanged, changed = members_unchanged(model, snapshot, probe)
    if not unchanged:
        raise RuntimeError(f"compress changed tensors or members outside the DaE member {d}: {changed[:8]}")

    after = heldout_losses(model, exits, held.corpus_batches, held.solution_batches)
    states["decomposed"] = MemberState(after[d]["loss"], after[d]["solution_loss"],
                                       member_accuracy(model, tokenizer, d, held.problems, cfg.max_new_tokens,
                                                       eval_file))
    parts_after = added_parts(model, d)
    added_after = added_parameters(model, d)
    metrics = {
        "dae_exit": d,
        "ratio": cfg.ratio,
        "matrix_ratio": matrix_ratio,
        "allocation": report["allocation"],
        "achieved_ratio": report["achieved_ratio"],
        "calibration_tokens": report["calibration_tokens"],
        "added_params_before": added_before,
        "added_params_after": added_after,
        "added_params_reduction": 1.0 - added_after / added_before,
        "added_parts_before": parts_before,
        "added_parts_after": parts_after,
        "removed_fraction": removed_fractions(parts_before, parts_after),
        "dae_control": {**dae_control(states), "accuracy_problems": len(held.problems)},
        "heal_steps": cfg.heal_steps,
        "heal_loss_first": healing.losses[0] if healing.losses else None,
        "heal_loss_last": healing.losses[-1] if healing.losses else None,
        "heal_kept": healing.kept,
        "heal_selection": healing.selection,
        "max_relative_loss_increase": cfg.max_relative_loss_increase,
        **exit_entries(exits, d, before, after, decomposed),
    }
    worst = max(metrics[f"exit_{e}"]["relative_loss_change"] for e in exits)
    metrics["max_relative_loss_change"] = worst
    metrics["within_budget"] = worst <= cfg.max_relative_loss_increase
    log.info("added parameters %d -> %d (-%.1f%%; blocks -%.1f%%); worst relative loss change %+.2f%% (budget "
             "%.1f%%: %s); DaE gain retained %s", added_before, added_after, 100 * metrics["added_params_reduction"],
             100 * metrics["removed_fraction"]["blocks"], 100 * worst, 100 * cfg.max_relative_loss_increase,
             "met" if metrics["within_budget"] else "NOT met", metrics["dae_control"]["gain_retained"])

    save_family(model, tokenizer, stage_dir(params, "compress"))
    write_json(Path(params.paths.reports_dir) / "compress" / "decompose_report.json", report)
    write_json(Path(params.paths.reports_dir) / "compress" / "heal_selection.json", split.report)
    _plot(report, healing.losses, plots_dir(params, "compress"))
    write_metrics(params, "compress", metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("compress", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
