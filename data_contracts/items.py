"""Per-item results the gates resample (`data_contracts.gates.gate_intervals`): one JSON line per
(member, item), written with `item_row`.

- The evaluate stage's (`reports/evaluate/items.jsonl` and the VL profile's counterpart): sets "loss"
  and "accuracy", read back, checked, as `ItemResults` by `read_items`.
- The rl stage's (`reports/rl/items.jsonl` and the VL profile's counterpart): set "rl", each held-out
  prompt's greedy verdict before rl and at the step whose weights the stage kept, read back as
  `RLItemResults` by `read_rl_items`.

No GX import: the stages write them without loading Great Expectations.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ItemResults:
    """The evaluate stage's per-item results (`read_items`), every member paired on the same items.

    Attributes:
        exits: the members, by depth.
        loss_items: ids of the loss items (text: corpus_val blocks; VL: eval answers).
        loss_sums: items x exits summed next-token losses (nats).
        tokens: items: the targets each loss sum covers (the same for every member).
        accuracy_items: ids of the eval problems.
        correct: problems x exits, 1.0 where the member's greedy answer is right.
    """

    exits: tuple[int, ...]
    loss_items: tuple[str, ...]
    loss_sums: np.ndarray
    tokens: np.ndarray
    accuracy_items: tuple[str, ...]
    correct: np.ndarray

    def losses(self) -> np.ndarray:
        """Per exit: the token-mean loss over all loss items."""
        return self.loss_sums.sum(axis=0) / self.tokens.sum()

    def accuracies(self) -> np.ndarray:
        return self.correct.mean(axis=0)


def item_row(item_set: str, item: str, exit_layer: int, **values: Any) -> dict[str, Any]:
    """One row of a per-item file: `set` "loss" with `loss_sum` and `tokens`, or "accuracy" with
    `correct` (what `read_items` reads back); "rl" with `correct_start` and `correct_end` (what
    `read_rl_items` reads back)."""
    return {"set": item_set, "item": str(item), "exit": int(exit_layer), **values}


def rl_item_rows(
    curve: dict[int, list[dict[str, Any]]],
    members: Sequence[int],
    rows: Sequence[dict[str, Any]],
    kept_step: int,
) -> list[dict[str, Any]]:
    """rl's per-prompt verdicts, one `item_row("rl", ...)` per (member, held-out prompt): the greedy
    verdict before rl (the curve's first point) and at `kept_step` (the weights the stage saved); the
    gates resample them for the interval of rl's accuracy change (`read_rl_items` reads them back).

    Args:
        curve: each member's held-out evaluations (`tasks.training.curves.HeldOut`), each point with
            `correct`, a verdict per row of `rows`.
        rows: the held-out prompts (their `id`s name the items).

    Raises:
        ValueError: a member has no point at `kept_step`, or a point's verdicts are not one per row.
    """
    out = []
    for d in members:
        start = curve[d][0]
        end = next((p for p in curve[d] if p["step"] == kept_step), None)
        if end is None:
            raise ValueError(f"exit {d} has no held-out evaluation at the kept step {kept_step}")
        for point in (start, end):
            if len(point.get("correct") or ()) != len(rows):
                raise ValueError(
                    f"exit {d}'s held-out evaluation at step {point['step']} holds "
                    f"{len(point.get('correct') or ())} verdicts for {len(rows)} prompts"
                )
        out += [
            item_row("rl", r["id"], d, correct_start=bool(a), correct_end=bool(b))
            for r, a, b in zip(rows, start["correct"], end["correct"], strict=True)
        ]
    return out


def read_items(path: str | Path) -> ItemResults:
    """Reads the evaluate stage's per-item file (JSON lines of `item_row`).

    Raises:
        ValueError: the file is unreadable, a line is malformed (named by line number), an item appears
            twice for a member, or a member lacks items another one has (every member must be scored
            on the same items).
    """
    path = Path(path)
    values: dict[str, dict[str, dict[int, tuple]]] = {"loss": {}, "accuracy": {}}
    exits: set[int] = set()
    for where, item_set, item, d, row in _item_lines(path, tuple(values)):
        if item_set == "loss":
            s, t = row.get("loss_sum"), row.get("tokens")
            # NaN is a result (a member that diverged): its gates fail, the file is not malformed
            if isinstance(s, bool) or not isinstance(s, (int, float)) or math.isinf(s) or s < 0:
                raise ValueError(f"{where}: 'loss_sum' must be a number >= 0 or NaN, got {s!r}")
            if isinstance(t, bool) or not isinstance(t, int) or t < 1:
                raise ValueError(f"{where}: 'tokens' must be a positive integer, got {t!r}")
            value: tuple = (s, t)
        else:
            value = (float(_verdict(row, "correct", where)),)
        _put(values[item_set], item, d, value, where, item_set)
        exits.add(d)
    for item_set, items in values.items():
        _check_paired(path, item_set, items, exits)
    order = sorted(exits)
    loss_ids = tuple(values["loss"])
    tokens = []
    for item in loss_ids:
        counts = {values["loss"][item][d][1] for d in order}
        if len(counts) != 1:
            raise ValueError(f"{path}: loss item {item!r}: token counts {sorted(counts)} differ by exit")
        tokens.append(counts.pop())
    acc_ids = tuple(values["accuracy"])
    return ItemResults(
        exits=tuple(order),
        loss_items=loss_ids,
        loss_sums=np.array([[values["loss"][i][d][0] for d in order] for i in loss_ids]),
        tokens=np.array(tokens, dtype=float),
        accuracy_items=acc_ids,
        correct=np.array([[values["accuracy"][i][d][0] for d in order] for i in acc_ids]),
    )


@dataclass(frozen=True)
class RLItemResults:
    """The rl stage's per-prompt verdicts (`read_rl_items`), every trained member on the same prompts.

    Attributes:
        exits: the members rl trained, by depth.
        items: ids of the held-out prompts.
        start: prompts x exits, 1.0 where the member's greedy answer was right before rl.
        end: prompts x exits, the same at the step whose weights the stage kept.
    """

    exits: tuple[int, ...]
    items: tuple[str, ...]
    start: np.ndarray
    end: np.ndarray

    def changes(self) -> np.ndarray:
        """Per exit: held-out accuracy at the kept step minus before rl."""
        return self.end.mean(axis=0) - self.start.mean(axis=0)


def read_rl_items(path: str | Path) -> RLItemResults:
    """Reads the rl stage's per-prompt file (JSON lines of `item_row("rl", id, exit, correct_start=...,
    correct_end=...)`).

    Raises:
        ValueError: as `read_items`: unreadable, a malformed line (by number), a prompt twice for a
            member, members not scored on the same prompts, or no prompts at all.
    """
    path = Path(path)
    values: dict[str, dict[int, tuple]] = {}
    exits: set[int] = set()
    for where, _, item, d, row in _item_lines(path, ("rl",)):
        value = (float(_verdict(row, "correct_start", where)), float(_verdict(row, "correct_end", where)))
        _put(values, item, d, value, where, "rl")
        exits.add(d)
    _check_paired(path, "rl", values, exits)
    order = sorted(exits)
    ids = tuple(values)
    return RLItemResults(
        exits=tuple(order),
        items=ids,
        start=np.array([[values[i][d][0] for d in order] for i in ids]),
        end=np.array([[values[i][d][1] for d in order] for i in ids]),
    )


def _item_lines(path: Path, sets: tuple[str, ...]) -> Iterator[tuple[str, str, str, int, dict]]:
    """(where, set, item, exit, row) of each non-blank line of a per-item file, its common fields checked."""
    try:
        # "\n" only, as write_jsonl ends lines: str.splitlines() would also split inside an id at U+2028
        lines = path.read_bytes().decode("utf-8").split("\n")
    except OSError as e:
        raise ValueError(f"{path}: cannot read the per-item results ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object")
        item_set, item, d = row.get("set"), row.get("item"), row.get("exit")
        if item_set not in sets:
            named = " or ".join(repr(s) for s in sets)
            raise ValueError(f"{where}: 'set' must be {named}, got {item_set!r}")
        if not isinstance(item, str) or not item:
            raise ValueError(f"{where}: 'item' must be a non-empty string, got {item!r}")
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"{where}: 'exit' must be a positive integer, got {d!r}")
        yield where, item_set, item, d, row


def _verdict(row: dict, key: str, where: str) -> bool:
    value = row.get(key)
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {key!r} must be true or false, got {value!r}")
    return value


def _put(
    items: dict[str, dict[int, tuple]], item: str, d: int, value: tuple, where: str, item_set: str
) -> None:
    by_exit = items.setdefault(item, {})
    if d in by_exit:
        raise ValueError(f"{where}: {item_set} item {item!r} of exit {d} appears twice")
    by_exit[d] = value


def _check_paired(path: Path, item_set: str, items: dict[str, dict[int, tuple]], exits: set[int]) -> None:
    """Items of `item_set` exist, and every one has a result for every exit."""
    if not items:
        raise ValueError(f"{path}: no {item_set!r} items")
    for item, by_exit in items.items():
        if set(by_exit) != exits:
            raise ValueError(
                f"{path}: {item_set} item {item!r} has results for exits {sorted(by_exit)}, not for "
                f"every exit {sorted(exits)} (members must be scored on the same items)"
            )
