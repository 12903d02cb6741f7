"""The deploy smoke test's reference: what the evaluate stage decoded, and how a served answer must match it.

The evaluate stage (text: `tasks.evaluate`; vision-language: `tasks.training.vl_pipeline.evaluate`) writes
every member's greedy answer to every eval problem to `Workspace.eval_generations`
(`reports[/vl]/evaluate/generations.jsonl`). The deploy stage of either profile sends the first
`deploy.smoke_prompts` of those problems to every member tier of the served release and, with these
functions, requires each answer to be evaluate's: the same weights, tokenizer, processor, chat template
and stop tokens through the release, the store and HTTP. Choices: docs/choices.md#deploy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tasks.core.files import read_jsonl
from tasks.core.params import Params
from tasks.core.paths import Workspace
from tasks.core.stage import StageError

log = logging.getLogger("ruyi.deploy")


def evaluated_completions(params: Params) -> tuple[Path, dict[tuple[int, str], str]]:
    """evaluate's greedy completions, `(path, {(exit, question id): text})`
    (`Workspace.eval_generations`: the text and the VL evaluate stage write it).

    Raises:
        StageError: the file is missing or a row is malformed (naming the file and row).
    """
    path = Workspace.from_params(params).eval_generations
    if not path.is_file():
        raise StageError(f"{path} not found (run the evaluate stage first)")
    out: dict[tuple[int, str], str] = {}
    for row, r in enumerate(read_jsonl(path, required=("id", "exit", "completion")), 1):
        d, text = r["exit"], r["completion"]
        if isinstance(d, bool) or not isinstance(d, int) or not isinstance(text, str):
            raise StageError(f"{path}: row {row}: `exit` must be an integer and `completion` a string")
        out[(d, str(r["id"]))] = text
    return path, out


def compare_with_evaluate(
    rows: list[dict[str, Any]], evaluated: dict[tuple[int, str], str], same_budget: bool
) -> dict[str, dict[str, Any]]:
    """Per member tier of the smoke rows (a row's `exit_layer` d, as `/v1/models` lists it): does the
    served greedy answer equal evaluate's completion of the same question by member d? With the same
    token budget the two texts must be equal; with different budgets the shorter one must begin the
    longer (one greedy decoding cut at two lengths).

    Returns per tier `{same_as_evaluate: share of the compared questions, compared: their number}` and,
    where one differs, `first_difference: {id, served, evaluated}`; questions evaluate did not decode
    (beyond `evaluate.num_problems`) are not compared.
    """
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        tier, d = r["tier"], r.get("exit_layer")
        if d is None:  # dynamic, speculative, auto: no one member to compare with
            continue
        ref = evaluated.get((d, r["id"]))
        entry = out.setdefault(tier, {"same": 0, "compared": 0})
        if ref is None:
            continue
        served = r["completion"]
        same = served == ref if same_budget else served.startswith(ref) or ref.startswith(served)
        entry["compared"] += 1
        entry["same"] += same
        if not same and "first_difference" not in entry:
            entry["first_difference"] = {"id": r["id"], "served": served, "evaluated": ref}
    for e in out.values():
        same = e.pop("same")
        e["same_as_evaluate"] = same / e["compared"] if e["compared"] else None
    return out


def check_same_as_evaluate(tier: str, checked: dict[str, Any], path: Path, strict: bool) -> None:
    """A served `exit_<d>` tier must answer the smoke questions exactly as evaluate's greedy decoding of
    member d did (`compare_with_evaluate`): the same weights, tokenizer, chat template and stop tokens
    through the release, the store and HTTP. `strict` (serving in float32, as evaluate decodes on CPU):
    a difference is a StageError, raised before the release is marked validated. In a lower precision the
    greedy path may fork at a near tie, so a difference is logged, not raised."""
    diff = checked.get("first_difference")
    if diff is None:
        return
    message = (
        f"smoke test: tier {tier} answered question {diff['id']} with {diff['served']!r}, but evaluate's "
        f"greedy decoding of that member ({path}) was {diff['evaluated']!r} "
        f"({checked['same_as_evaluate']:.0%} of {checked['compared']} questions the same)"
    )
    if strict:
        raise StageError(
            f"{message}: the release does not serve the evaluated member (its weights, tokenizer, chat "
            "template or stop tokens differ); it is not marked validated"
        )
    log.warning("%s (deploy.dtype is not float32: a near tie may fork the greedy path)", message)


__all__ = ["check_same_as_evaluate", "compare_with_evaluate", "evaluated_completions"]
