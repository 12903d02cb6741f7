"""The evaluate stage's per-item results (`reports/evaluate/items.jsonl` and the VL profile's
counterpart): one JSON line per (member, item), written with `item_row` and read back, checked, as
`ItemResults` by `read_items`. The gates resample them (`data_contracts.gates.gate_intervals`). No GX
import: the evaluate stage writes them without loading Great Expectations.
"""

from __future__ import annotations

import json
import math
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
    """One row of the per-item file: `set` "loss" with `loss_sum` and `tokens`, or "accuracy" with
    `correct` (what `read_items` reads back)."""
    return {"set": item_set, "item": str(item), "exit": int(exit_layer), **values}


def read_items(path: str | Path) -> ItemResults:
    """Reads the evaluate stage's per-item file (JSON lines of `item_row`).

    Raises:
        ValueError: the file is unreadable, a line is malformed (named by line number), an item appears
            twice for a member, or a member lacks items another one has (every member must be scored
            on the same items).
    """
    path = Path(path)
    try:
        # "\n" only, as write_jsonl ends lines: str.splitlines() would also split inside an id at U+2028
        lines = path.read_bytes().decode("utf-8").split("\n")
    except OSError as e:
        raise ValueError(f"{path}: cannot read the per-item results ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    values: dict[str, dict[str, dict[int, tuple]]] = {"loss": {}, "accuracy": {}}
    exits: set[int] = set()
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
        if item_set not in values:
            raise ValueError(f"{where}: 'set' must be 'loss' or 'accuracy', got {item_set!r}")
        if not isinstance(item, str) or not item:
            raise ValueError(f"{where}: 'item' must be a non-empty string, got {item!r}")
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"{where}: 'exit' must be a positive integer, got {d!r}")
        if item_set == "loss":
            s, t = row.get("loss_sum"), row.get("tokens")
            # NaN is a result (a member that diverged): its gates fail, the file is not malformed
            if isinstance(s, bool) or not isinstance(s, (int, float)) or math.isinf(s) or s < 0:
                raise ValueError(f"{where}: 'loss_sum' must be a number >= 0 or NaN, got {s!r}")
            if isinstance(t, bool) or not isinstance(t, int) or t < 1:
                raise ValueError(f"{where}: 'tokens' must be a positive integer, got {t!r}")
            value: tuple = (s, t)
        else:
            c = row.get("correct")
            if not isinstance(c, bool):
                raise ValueError(f"{where}: 'correct' must be true or false, got {c!r}")
            value = (float(c),)
        by_exit = values[item_set].setdefault(item, {})
        if d in by_exit:
            raise ValueError(f"{where}: {item_set} item {item!r} of exit {d} appears twice")
        by_exit[d] = value
        exits.add(d)
    for item_set, items in values.items():
        if not items:
            raise ValueError(f"{path}: no {item_set!r} items")
        for item, by_exit in items.items():
            if set(by_exit) != exits:
                raise ValueError(
                    f"{path}: {item_set} item {item!r} has results for exits {sorted(by_exit)}, not for "
                    f"every exit {sorted(exits)} (members must be scored on the same items)"
                )
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
