"""Stage `compress`: DaE "Decompose" (Ruyi2 4.4), low-rank SVD of the DaE member's added blocks and head.

    python -m tasks.compress [--params params.yaml] [--set compress.ratio=0.5] [--set compress.heal_steps=0]

Reads `artifacts/rl/` and the validated files: corpus_train and sft (calibration, healing), select_corpus and
select (the healing decision: prepare_data's split that no stage trains on), corpus_val and eval (reported
held-out losses). Writes `artifacts/compress/`, `metrics/compress.json`
(added parameters before/after, per exit relative loss changes, `within_budget`, healing decision,
`removed_fraction` of blocks / head / both, and `dae_control`: the DaE member's loss and accuracy before
DaE (from `artifacts/family_sft/`), dense and after SVD, with `gain_retained`),
`reports/compress/` (per-matrix ranks, healing-selection ids) and `plots/compress/`.
Choices (added parameters, allocation, calibration, healing): docs/choices.md#compress.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.artifacts import load_family, save_family
from tasks.core.files import atomic_file, pyplot, read_jsonl, save_figure, write_json, write_metrics
from tasks.core.params import Params
from tasks.core.paths import Workspace
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

    lowrank = {
        f"{name}.{p}"
        for name, m in model.named_modules()
        if isinstance(m, LowRankLinear)
        for p in ("weight_a", "weight_b")
    }
    norm = f"exits.{exit_layer}.norm.weight"
    chosen = [(n, p) for n, p in dae_trainable_parameters(model, exit_layer) if n in lowrank or n == norm]
    if not any(n in lowrank for n, _ in chosen):
        raise RuntimeError(f"no low-rank factors found on member {exit_layer} after decomposition")
    return chosen


@dataclass
class SelectionSplit:
    """The healing-decision ("selection") data and the training data (docs/choices.md#compress).

    The decision data is prepare_data's select split (select_corpus.jsonl, select.jsonl): no stage trains
    on it, and validate_data checked that it shares no text with any training file, corpus_val or eval.

    Attributes:
        corpus_texts: every corpus_train text (calibration), file order.
        sft_rows: every sft.jsonl row (calibration and healing), file order.
        selection_corpus: the select_corpus.jsonl documents packed into `corpus_blocks`, file order.
        selection_sft: the first `solution_rows` select.jsonl rows.
        corpus_blocks: the selection documents packed into `loss_batches` x `batch_size` blocks.
    """

    corpus_texts: list[str]
    sft_rows: list[dict[str, Any]]
    selection_corpus: list[dict[str, Any]]
    selection_sft: list[dict[str, Any]]
    corpus_blocks: Any

    @property
    def report(self) -> dict[str, Any]:
        """What reports/compress/heal_selection.json records: the rule and the ids that decided."""
        return {
            "rule": "the first select_corpus.jsonl documents (packed) and select.jsonl rows, file order: "
            "prepare_data's healing-decision split, validated to share no text with corpus_train, "
            "corpus_val, sft, rl or eval; calibration and healing read the whole corpus_train and sft",
            "select_corpus_ids": [str(r["id"]) for r in self.selection_corpus],
            "select_ids": [str(r["id"]) for r in self.selection_sft],
            "healing_sft_rows": len(self.sft_rows),
            "calibration_corpus_documents": len(self.corpus_texts),
        }


def read_selection(
    params: Params, tokenizer, corpus_texts: list[str], sft_rows: list[dict]
) -> SelectionSplit:
    """The healing-decision set from the validated select files: `loss_batches` x `batch_size` packed
    blocks of select_corpus.jsonl (its first documents) and `solution_rows` select.jsonl rows (its first).

    Args:
        corpus_texts, sft_rows: the training data (corpus_train texts, sft.jsonl rows), kept whole.

    Raises:
        StageError: a select file is too small, naming it and the parameters.
    """
    from tasks.training.batches import pack_documents, tokenize_texts

    cfg, ws = params.compress, Workspace.from_params(params)
    n = cfg.loss_batches * cfg.batch_size
    corpus_file, select_file = ws.validated_file("select_corpus.jsonl"), ws.validated_file("select.jsonl")

    docs = read_corpus(corpus_file)
    chosen, token_lists, tokens, need = [], [], 0, n * cfg.seq_len
    for start in range(0, len(docs), 64):
        part = docs[start : start + 64]
        ids = tokenize_texts(tokenizer, [r["text"] for r in part], desc="tokenize select_corpus")
        for row, t in zip(part, ids):
            if tokens >= need:
                break
            chosen.append(row)
            token_lists.append(t)
            tokens += len(t) + 1
        if tokens >= need:
            break
    blocks = pack_documents(token_lists, tokenizer.eos_token_id, cfg.seq_len)
    if blocks.shape[0] < n:
        raise StageError(
            f"{corpus_file}: its {len(docs)} documents make {blocks.shape[0]} blocks of {cfg.seq_len} "
            f"tokens; the healing decision needs {n} (compress.loss_batches x compress.batch_size): raise "
            "data.select_corpus_chars or lower compress.loss_batches, compress.batch_size or compress.seq_len"
        )
    rows = read_sft(select_file)
    if len(rows) < cfg.solution_rows:
        raise StageError(
            f"{select_file}: {len(rows)} rows; the healing decision needs {cfg.solution_rows} "
            "(compress.solution_rows): raise data.num_select or lower compress.solution_rows"
        )
    return SelectionSplit(
        corpus_texts=corpus_texts,
        sft_rows=sft_rows,
        selection_corpus=chosen,
        selection_sft=rows[: cfg.solution_rows],
        corpus_blocks=blocks[:n],
    )


def calibration_data(params: Params, tokenizer, corpus_texts: list[str], sft_rows: list[dict]) -> list:
    """`calibration_batches` LongTensor batches (batch_size x seq_len) mixing corpus_train and SFT chat text
    (`corpus_texts`, `sft_rows`: the whole training files; the healing-decision set is a file of its own)."""
    import torch

    cfg = params.compress
    total = cfg.calibration_batches * cfg.batch_size
    n_sft = round(total * cfg.calibration_sft_fraction)
    rng = random.Random(params.seed)
    parts = []
    if total - n_sft > 0:
        path = Workspace.from_params(params).corpus_train
        texts = list(corpus_texts)
        rng.shuffle(texts)
        parts.append((path, total - n_sft, texts))
    if n_sft > 0:
        path = Workspace.from_params(params).sft_data
        rows = list(sft_rows)
        rng.shuffle(rows)
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}],
                tokenize=False,
            )
            for r in rows
        ]
        parts.append((path, n_sft, texts))
    blocks = []
    for path, wanted, texts in parts:
        if not texts:
            raise StageError(f"{path}: no text for calibration")
        got = first_blocks(tokenizer, texts, cfg.seq_len, wanted, path)
        if got.shape[0] < wanted:
            raise StageError(
                f"{path}: too little text for {wanted} calibration blocks of {cfg.seq_len} tokens "
                f"(got {got.shape[0]}); lower compress.calibration_batches or compress.seq_len"
            )
        blocks.append(got)
    return list(torch.cat(blocks).split(cfg.batch_size))


def matrix_ratio_for(
    model, exit_layer: int, ratio: float, include_head: bool, added: int
) -> tuple[float, float]:
    """(ratio to ask `decompose` for, the largest removable share) so that `ratio` of the `added`
    parameters go: the decomposable matrices carry the whole reduction (the norms stay dense)."""
    from ruyi_model.dae import _targets
    from ruyi_model.modeling import LowRankLinear

    shapes = [
        tuple(model.get_submodule(p).weight.shape)
        for p in _targets(model, exit_layer, include_head)
        if not isinstance(model.get_submodule(p), LowRankLinear)
    ]
    dense = sum(m * n for m, n in shapes)
    if dense == 0:
        return 1.0, 0.0
    removable = sum(m * n - (m + n) for m, n in shapes) / dense  # every matrix at rank 1
    # 1e-6 absorbs float noise in the allocation's bisection and the rank epsilon (see ruyi_model.dae).
    return ratio * added / dense + 1e-6, removable


def heldout_losses(model, exits, corpus_batches, solution_batches) -> dict[int, dict[str, float]]:
    """`{d: {"loss": corpus CE, "solution_loss": eval-solution CE}}` of every member in `exits`."""
    corpus = member_losses(model, exits, corpus_batches)
    solutions = member_losses(model, exits, solution_batches)
    return {d: {"loss": corpus[d], "solution_loss": solutions[d]} for d in exits}


def distillation_kl(model, teacher, exit_layer: int, ids):
    """Token-mean KL(teacher || model) of member `exit_layer`'s next-token distributions on `ids` (a
    LongTensor batch); differentiable in `model`'s parameters."""
    import torch
    import torch.nn.functional as F

    ids = ids.to(model.device)
    with torch.no_grad():
        target = teacher(ids, exit_layer=exit_layer, use_cache=False).logits.float()
    logits = model(ids, exit_layer=exit_layer, use_cache=False).logits.float()
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True, reduction="none")
    # Summed over the vocabulary per position, then averaged over positions (= "batchmean" over the
    # flattened positions): each sum is one thread's work, so the value does not depend on the thread
    # count, while one flat sum over every element is split between threads (tests/unit/test_thread_count.py).
    return kl.sum(-1).mean()


def mean_distillation_kl(model, teacher, exit_layer: int, batches: list) -> float:
    """`distillation_kl` averaged over `batches` (what healing minimises, measured without training)."""
    import torch

    with torch.no_grad():
        return sum(float(distillation_kl(model, teacher, exit_layer, b)) for b in batches) / len(batches)


def heal(model, teacher, exit_layer: int, batches: list, cfg, seed: int) -> list[float]:
    """Self-distillation of the decomposed member toward its dense self (docs/choices.md#compress).

    Only the DaE member's low-rank factors and final norm train (`healing_parameters`); the loss is the
    token-mean KL(dense || decomposed) of member `exit_layer`'s next-token distributions, so healing
    pulls the factors back to what DaE trained instead of fitting any data anew.

    Args:
        model: the decomposed family (trained in place; every other parameter is frozen meanwhile).
        teacher: the dense family before decomposition (frozen, eval mode).
        exit_layer: the DaE member.
        batches: LongTensor batches of packed token blocks (the calibration batches).
        cfg: `CompressParams` (heal_steps, heal_lr).
        seed: seeds the batch order.

    Returns:
        The distillation loss (nats per token) of every step.
    """
    import torch
    from tqdm.auto import tqdm

    trainable = healing_parameters(model, exit_layer)
    names = {n for n, _ in trainable}
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=cfg.heal_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    teacher.eval()
    model.train()
    try:
        for step in tqdm(range(cfg.heal_steps), desc="compress: heal", unit="step"):
            if not order:  # epochs over the batches, each in a seeded random order
                order = torch.randperm(len(batches), generator=generator).tolist()
            loss = distillation_kl(model, teacher, exit_layer, batches[order.pop()])
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

    plt = pyplot()

    rows = report["matrices"]
    with atomic_file(out_dir / "allocation.csv") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["matrix", "group", "rank", "allocated_ratio", "params_before", "params_after", "relative_loss"]
        )
        for m in rows:
            writer.writerow(
                [
                    m["path"],
                    m["group"],
                    m["rank"],
                    m["allocated_ratio"],
                    m["params_before"],
                    m["params_after"],
                    m["relative_loss"],
                ]
            )
    with atomic_file(out_dir / "heal_loss.csv") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss"])
        writer.writerows(enumerate(heal_losses, 1))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    labels = [m["path"].split(".", 2)[-1] for m in rows]
    kept = [m["params_after"] / m["params_before"] for m in rows]
    axes[0].bar(
        range(len(rows)), kept, color=["C1" if m["group"].endswith("lm_head") else "C0" for m in rows]
    )
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
    problems: list[dict[str, Any]]  # eval rows for the DaE member's accuracy


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
    blocks = list(model.exits[str(exit_layer)].layers)[n_branch : n_branch + cfg.num_dae_blocks(exit_layer)]
    return {
        "blocks": sum(p.numel() for m in blocks for p in m.parameters()),
        "head": sum(p.numel() for p in model.exit_head(exit_layer).parameters()),
    }


def removed_fractions(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """Removed share of the DaE blocks alone, of the head alone and of both together."""
    total_b, total_a = sum(before.values()), sum(after.values())
    out = {k: 1.0 - after[k] / before[k] if before[k] else 0.0 for k in before}
    out["blocks_and_head"] = 1.0 - total_a / total_b if total_b else 0.0
    return out


def member_accuracy(
    model, tokenizer, exit_layer: int, problems: list[dict[str, Any]], max_new_tokens: int, where: Path
) -> float | None:
    """Greedy exact-match accuracy of one member on `problems` (None without problems)."""
    from ruyi_model.decoding import greedy_generate
    from tasks.data.mathgen import answers_match, extract_answer

    if not problems:
        return None
    texts = greedy_generate(
        model,
        tokenizer,
        [str(p["question"]) for p in problems],
        exit_layer,
        max_new_tokens,
        batch_size=32,
        progress=f"compress: decode exit {exit_layer}",
    )
    correct = 0
    for row, (p, text) in enumerate(zip(problems, texts), 1):
        try:
            correct += answers_match(extract_answer(text), str(p["answer"]))
        except ValueError as e:
            raise StageError(f"{where}: row {row} (id={p['id']!r}): {e}") from None
    return correct / len(problems)


def member_state(model, tokenizer, d: int, held: HeldoutSets, cfg, where: Path) -> MemberState:
    losses = heldout_losses(model, [d], held.corpus_batches, held.solution_batches)[d]
    return MemberState(
        losses["loss"],
        losses["solution_loss"],
        member_accuracy(model, tokenizer, d, held.problems, cfg.max_new_tokens, where),
    )


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
        raise StageError(
            f"{source}: the DaE member exit_layer={d} (expand.exit_layer) is not an exit of this "
            f"family {mcfg.exit_layers}"
        )
    if mcfg.num_dae_blocks(d) == 0:
        raise StageError(
            f"{source}: member {d} has no DaE blocks (config.dae_blocks={mcfg.dae_blocks}); "
            "run the expand stage first"
        )
    if cfg.include_head and mcfg.shared_heads:
        raise StageError(
            f"{source}: compress.include_head=true but the family shares one head among all members "
            "(decomposing it would change every member); set compress.include_head=false"
        )
    return model, tokenizer, d


def heldout_sets(params: Params, tokenizer) -> HeldoutSets:
    from tasks.training.batches import fixed_batches

    cfg = params.compress
    val_file, eval_file = (
        Workspace.from_params(params).validated_file("corpus_val.jsonl"),
        Workspace.from_params(params).validated_file("eval.jsonl"),
    )
    n = cfg.loss_batches * cfg.batch_size
    val_rows = read_corpus(val_file)
    corpus = first_blocks(tokenizer, [r["text"] for r in val_rows], cfg.seq_len, n, val_file)
    all_eval_rows = read_jsonl(eval_file, required=("id", "question", "solution", "answer"))
    if len(all_eval_rows) < cfg.solution_rows:
        log.warning(
            "%s has only %d rows (compress.solution_rows=%d): the reported solution losses use them all",
            eval_file,
            len(all_eval_rows),
            cfg.solution_rows,
        )
    solutions = solution_examples(tokenizer, all_eval_rows[: cfg.solution_rows], cfg.seq_len, eval_file)
    return HeldoutSets(
        corpus_batches=fixed_batches({"input_ids": corpus}, cfg.batch_size, cfg.loss_batches),
        solution_batches=solution_batches(solutions, cfg),
        problems=all_eval_rows[: cfg.accuracy_problems],
    )


def solution_batches(examples: dict, cfg) -> list:
    """Every solution example, in order, in batches of `compress.batch_size` (the last one may be
    partial); the callers choose the rows (the first `compress.solution_rows` of their file)."""
    from tasks.training.batches import fixed_batches

    rows = int(examples["input_ids"].shape[0])
    return fixed_batches(examples, cfg.batch_size, -(-rows // cfg.batch_size))


def decompose_member(
    model, params: Params, d: int, calibration: list, source: Path, ratio: float | None = None
):
    """Decomposes member `d` so that `ratio` (default `compress.ratio`) of its added parameters go; returns
    a new (model, report, matrix_ratio), `model` unchanged. Errors name compress.ratio (and the budget
    search's ratio where it is another) / the checkpoint."""
    from ruyi_model.dae import decompose

    cfg = params.compress
    ratio = cfg.ratio if ratio is None else ratio
    added_before = added_parameters(model, d)
    matrix_ratio, removable = matrix_ratio_for(model, d, ratio, cfg.include_head, added_before)
    if matrix_ratio >= removable:
        asked = f"compress.ratio={cfg.ratio}" + (
            "" if ratio == cfg.ratio else f" (the budget search's ratio {ratio})"
        )
        raise StageError(
            f"{asked}: removing that share of member {d}'s {added_before} added "
            f"parameters needs {matrix_ratio:.3f} of its decomposable matrices, but at most "
            f"{removable:.3f} can go (include_head={cfg.include_head}); lower compress.ratio"
            + ("" if cfg.include_head else " or set compress.include_head=true")
        )
    try:
        decomposed = decompose(
            model,
            ratio=matrix_ratio,
            calibration=calibration,
            allocation=cfg.allocation,
            include_head=cfg.include_head,
            exit_layer=d,
        )
    except ValueError as e:
        raise StageError(f"{source}: cannot decompose member {d}: {e}") from None
    model, report = decomposed.model, decomposed.report.to_dict()
    model.eval()
    added_after = added_parameters(model, d)
    if 1.0 - added_after / added_before < ratio:
        raise RuntimeError(
            f"compress: added parameters {added_before} -> {added_after} remove less than "
            f"the ratio {ratio} (matrix ratio {matrix_ratio})"
        )
    return model, report, matrix_ratio


def relative_increase(losses: dict[str, float], reference: dict[str, float]) -> float:
    """The larger relative increase of the corpus and the solution loss over `reference` (the budget's
    measure, as `relative_loss_change` in the metrics)."""
    return max((losses[k] - reference[k]) / reference[k] for k in ("loss", "solution_loss"))


def budget_ratios(cfg) -> list[float]:
    """The ratios the budget search tries, largest first: `ratio`, then down by `ratio_step` to no less
    than `min_ratio`; `ratio` alone without `fit_budget`."""
    if not cfg.fit_budget:
        return [cfg.ratio]
    out, i = [], 0
    while (r := round(cfg.ratio - i * cfg.ratio_step, 6)) >= cfg.min_ratio - 1e-9:
        out.append(r)
        i += 1
    return out


def fit_to_budget(
    dense, params: Params, d: int, calibration: list, source: Path, selection: tuple[list, list]
):
    """Decomposes member `d` at the largest ratio of `budget_ratios` whose loss increase on the
    healing-decision set (`selection`: its corpus and solution batches) is within
    `max_relative_loss_increase` (the smallest ratio tried when none is); returns (model, report,
    matrix_ratio, search), `search` listing every ratio tried with its increase."""
    cfg = params.compress
    reference = heldout_losses(dense, [d], *selection)[d]
    search: dict[str, Any] = {"selection_dense": reference, "tried": [], "ratio_used": None}
    for ratio in budget_ratios(cfg):
        model, report, matrix_ratio = decompose_member(dense, params, d, calibration, source, ratio)
        losses = heldout_losses(model, [d], *selection)[d]
        increase = relative_increase(losses, reference)
        fits = increase <= cfg.max_relative_loss_increase
        search["tried"].append(
            {"ratio": ratio, "selection": losses, "relative_increase": increase, "fits": fits}
        )
        log.info(
            "ratio %.3f: loss increase on the healing-decision set %+.2f%% (budget %.1f%%)%s",
            ratio,
            100 * increase,
            100 * cfg.max_relative_loss_increase,
            "" if fits or not cfg.fit_budget else ": over, trying a smaller ratio",
        )
        if fits:
            break
    search["ratio_used"] = ratio
    search["fits"] = fits
    if not fits and cfg.fit_budget:
        log.warning(
            "no ratio down to compress.min_ratio=%s keeps member %d within the budget on the "
            "healing-decision set; publishing ratio %s for the gates to judge",
            cfg.min_ratio,
            d,
            ratio,
        )
    return model, report, matrix_ratio, search


def selection_batches(params: Params, tokenizer, split: SelectionSplit) -> tuple[list, list]:
    """The healing-decision set as (corpus batches, solution batches): `loss_batches` batches of
    `batch_size` select_corpus blocks, and the first `solution_rows` select.jsonl rows in batches."""
    from tasks.training.batches import build_sft_examples, fixed_batches

    cfg = params.compress
    select_file = Workspace.from_params(params).validated_file("select.jsonl")
    sel_corpus = fixed_batches({"input_ids": split.corpus_blocks}, cfg.batch_size, cfg.loss_batches)
    sel_solutions = solution_batches(
        build_sft_examples(tokenizer, split.selection_sft, cfg.seq_len, str(select_file))[0], cfg
    )
    return sel_corpus, sel_solutions


def heal_if_better(
    model,
    teacher,
    d: int,
    params: Params,
    split: SelectionSplit,
    selection_set: tuple[list, list],
    calibration: list,
    decomposed: dict[str, float],
) -> HealOutcome:
    """Optional healing (`heal_steps` > 0): distillation from the dense `teacher` on the `calibration`
    batches, kept only if it does not hurt on the selection set (`selection_set`: select_corpus blocks
    and select.jsonl solutions, worst case); otherwise the decomposed factors are restored.
    `decomposed`: `model`'s losses on the selection set as it comes (the budget search measured them)."""
    import torch

    cfg = params.compress
    sel_corpus, sel_solutions = selection_set
    selection = {
        "corpus_blocks": int(split.corpus_blocks.shape[0]),
        "sft_rows": len(split.selection_sft),
        "decomposed": decomposed,
        "healed": None,
        "worst_ratio": None,
        "calibration_kl": None,
    }
    if cfg.heal_steps == 0:
        return HealOutcome([], None, selection)
    saved = {n: p.detach().clone() for n, p in healing_parameters(model, d)}
    kl_before = mean_distillation_kl(model, teacher, d, calibration)
    losses = heal(model, teacher, d, calibration, cfg, params.seed)
    model.eval()
    selection["calibration_kl"] = {
        "decomposed": kl_before,
        "healed": mean_distillation_kl(model, teacher, d, calibration),
    }
    healed = heldout_losses(model, [d], sel_corpus, sel_solutions)[d]
    # Kept only if it does not hurt on the selection set (corpus and SFT solutions, worst case): healing
    # fits the dense member on calibration text, which need not help on unseen text.
    worst_ratio = max(healed[k] / selection["decomposed"][k] for k in ("loss", "solution_loss"))
    kept = worst_ratio <= 1.0
    selection.update(healed=healed, worst_ratio=worst_ratio)
    if not kept:
        with torch.no_grad():
            for n, p in healing_parameters(model, d):
                p.copy_(saved[n])
        log.warning(
            "healing made member %d worse on the healing-decision set (%s -> %s): discarded",
            d,
            selection["decomposed"],
            healed,
        )
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
        entry["relative_loss_change"] = max(
            entry["loss_relative_change"], entry["solution_loss_relative_change"]
        )
        if e == d:
            entry.update({f"{key}_decomposed": decomposed[key] for key in ("loss", "solution_loss")})
        out[f"exit_{e}"] = entry
        log.info(
            "exit %d: loss %.4f -> %.4f (%+.2f%%), solution loss %.4f -> %.4f (%+.2f%%)",
            e,
            entry["loss_before"],
            entry["loss_after"],
            100 * entry["loss_relative_change"],
            entry["solution_loss_before"],
            entry["solution_loss_after"],
            100 * entry["solution_loss_relative_change"],
        )
    return out


def dae_control(states: dict[str, MemberState]) -> dict[str, Any]:
    """The DaE member in three states (before DaE = family_sft's member, dense, decomposed) and the share
    of DaE's gain the decomposition keeps, per quantity."""
    before, dense, svd = states["before_dae"], states["dense"], states["decomposed"]
    return {
        **{name: st.to_dict() for name, st in states.items()},
        "gain": {
            k: (None if getattr(dense, k) is None else getattr(dense, k) - getattr(before, k))
            for k in ("loss", "solution_loss", "accuracy")
        },
        "gain_retained": {
            k: gain_retained(getattr(before, k), getattr(dense, k), getattr(svd, k))
            for k in ("loss", "solution_loss", "accuracy")
        },
    }


def run(params: Params) -> dict:
    """Decomposes the DaE member of artifacts/rl, heals it, writes artifacts/compress; returns the metrics."""
    from ruyi_model.dae import dae_trainable_parameters
    from tasks.training.members import members_unchanged, snapshot_members

    cfg = params.compress
    seed_everything(params.seed)
    source = Workspace.from_params(params).artifacts("rl")
    model, tokenizer, d = load_dae_family(params, source)
    exits = list(model.config.exit_layers)
    held = heldout_sets(params, tokenizer)
    eval_file = Workspace.from_params(params).validated_file("eval.jsonl")
    train_file, sft_file = (
        Workspace.from_params(params).validated_file("corpus_train.jsonl"),
        Workspace.from_params(params).validated_file("sft.jsonl"),
    )
    # The healing-decision set: prepare_data's select split (no stage trains on it), used for nothing else.
    split = read_selection(
        params, tokenizer, [r["text"] for r in read_corpus(train_file)], read_sft(sft_file)
    )
    calibration = calibration_data(params, tokenizer, split.corpus_texts, split.sft_rows)

    before = heldout_losses(model, exits, held.corpus_batches, held.solution_batches)
    states = {
        "dense": MemberState(
            before[d]["loss"],
            before[d]["solution_loss"],
            member_accuracy(model, tokenizer, d, held.problems, cfg.max_new_tokens, eval_file),
        )
    }
    tuned, _ = load_family(
        Workspace.from_params(params).artifacts("family_sft")
    )  # the member before DaE (no blocks)
    states["before_dae"] = member_state(tuned.to(model.device).eval(), tokenizer, d, held, cfg, eval_file)
    del tuned
    owned = [n for n, _ in dae_trainable_parameters(model, d)]
    probe = calibration[0].to(model.device)
    snapshot = snapshot_members(model, [e for e in exits if e != d], probe, exclude=owned)
    parts_before = added_parts(model, d)
    added_before = added_parameters(model, d)

    dense = model  # decompose builds a new model: the dense one is healing's teacher
    selection_set = selection_batches(params, tokenizer, split)
    model, report, matrix_ratio, search = fit_to_budget(dense, params, d, calibration, source, selection_set)
    decomposed = heldout_losses(model, [d], held.corpus_batches, held.solution_batches)[d]
    healing = heal_if_better(
        model, dense, d, params, split, selection_set, calibration, search["tried"][-1]["selection"]
    )
    del dense
    unchanged, changed = members_unchanged(model, snapshot, probe)
    if not unchanged:
        raise RuntimeError(f"compress changed tensors or members outside the DaE member {d}: {changed[:8]}")

    after = heldout_losses(model, exits, held.corpus_batches, held.solution_batches)
    states["decomposed"] = MemberState(
        after[d]["loss"],
        after[d]["solution_loss"],
        member_accuracy(model, tokenizer, d, held.problems, cfg.max_new_tokens, eval_file),
    )
    parts_after = added_parts(model, d)
    added_after = added_parameters(model, d)
    metrics = {
        "dae_exit": d,
        "ratio": cfg.ratio,
        "ratio_used": search["ratio_used"],
        "budget_search": search,
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
        # the reported losses' eval rows (the decision's select rows: heal_selection.sft_rows)
        "eval_solution_rows": sum(int(b["input_ids"].shape[0]) for b in held.solution_batches),
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
    log.info(
        "added parameters %d -> %d (-%.1f%%; blocks -%.1f%%); worst relative loss change %+.2f%% (budget "
        "%.1f%%: %s); DaE gain retained %s",
        added_before,
        added_after,
        100 * metrics["added_params_reduction"],
        100 * metrics["removed_fraction"]["blocks"],
        100 * worst,
        100 * cfg.max_relative_loss_increase,
        "met" if metrics["within_budget"] else "NOT met",
        metrics["dae_control"]["gain_retained"],
    )

    save_family(model, tokenizer, Workspace.from_params(params).artifacts("compress"))
    write_json(Workspace.from_params(params).reports("compress") / "decompose_report.json", report)
    write_json(Workspace.from_params(params).reports("compress") / "heal_selection.json", split.report)
    _plot(report, healing.losses, Workspace.from_params(params).plots("compress"))
    write_metrics(params, "compress", metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("compress", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
