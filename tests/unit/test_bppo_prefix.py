"""BPPO's prefix rules (tasks/training/rl_algos.py): the spans each rule trains, and the sign of the
gradient on the pair's shared prefix (the correct answer's direction, whatever the group's accuracy)."""

from __future__ import annotations

import pytest
import torch

from tasks.training import rl_algos as A

COMP = torch.tensor(
    [
        [5, 6, 7, 8, 9, 1],  # correct, length 6
        [5, 6, 2, 2, 1, 0],  # incorrect, length 5: common prefix with row 0 = 2 tokens
        [3, 4, 1, 0, 0, 0],  # correct, length 3
        [9, 4, 4, 4, 4, 1],  # incorrect, length 6: empty common prefix
        [3, 4, 1, 0, 0, 0],  # correct, length 3 (a prefix of row 5)
        [3, 4, 1, 5, 5, 5],  # incorrect, length 6
    ]
)
LENGTHS = torch.tensor([6, 5, 3, 6, 3, 6])
PAIRS = [(0, 1), (2, 3), (4, 5)]


def spans(rule: str, k: int = 16) -> list[tuple[int, int]]:
    s, e = A.prefix_spans(COMP, LENGTHS, PAIRS, rule, k=k)
    return list(zip(s.tolist(), e.tolist()))


def test_spans_of_every_rule():
    assert spans("common") == [(0, 3), (0, 3), (0, 1), (0, 1), (0, 3), (0, 4)]
    # shared_correct: the shared prefix on the correct row only, k tokens past the divergence on both.
    assert spans("shared_correct", k=2) == [(0, 4), (2, 4), (0, 2), (0, 2), (0, 3), (3, 5)]
    assert spans("shared_correct") == [(0, 6), (2, 5), (0, 3), (0, 6), (0, 3), (3, 6)]
    # divergent: only past the divergence; a correct response that ends inside the shared prefix
    # trains its last token (>= 1 token per row).
    assert spans("divergent", k=2) == [(2, 4), (2, 4), (0, 2), (0, 2), (2, 3), (3, 5)]
    assert spans("first_k", k=4) == [(0, 4), (0, 4), (0, 3), (0, 4), (0, 3), (0, 4)]
    s, e = A.prefix_spans(COMP, LENGTHS, PAIRS, "shared_correct", k=2)
    assert A.span_mask(s[:2], e[:2], 6).tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]]
    assert torch.equal(A.prefix_lengths(COMP, LENGTHS, PAIRS, "common"), torch.tensor([3, 3, 1, 1, 3, 4]))
    with pytest.raises(ValueError, match="prefix rule"):
        A.prefix_spans(COMP, LENGTHS, PAIRS, "suffix")


def shared_prefix_push(rule: str, n_correct: int, group_size: int = 8) -> float:
    """d(-loss)/d log p of one shared-prefix token, summed over the rows it appears on: > 0 means the
    update raises the shared prefix's probability. The group has `n_correct` correct responses; the
    pair is (row 0 correct, row 1 incorrect) with a 2-token shared prefix."""
    correct = torch.zeros(group_size, dtype=torch.bool)
    correct[0] = True
    correct[2 : 2 + n_correct - 1] = True
    adv = A.group_advantages(correct.float(), group_size)[:2]
    assert adv[0] > 0 > adv[1]
    comp = COMP[:2]
    s, e = A.prefix_spans(comp, LENGTHS[:2], [(0, 1)], rule, k=2)
    mask = A.span_mask(s, e, comp.shape[1])
    logps = torch.zeros(2, comp.shape[1], requires_grad=True)
    loss, _ = A.policy_loss(logps, adv, mask, loss_type="dapo")
    loss.backward()
    return float(-logps.grad[:, 0].sum())  # token 0 is shared by both responses


@pytest.mark.parametrize("n_correct", [1, 4, 7])
def test_shared_prefix_is_pushed_toward_the_correct_answer(n_correct):
    assert shared_prefix_push("shared_correct", n_correct) > 0
    assert shared_prefix_push("divergent", n_correct) == 0  # not trained at all


def test_common_rule_pushes_the_shared_prefix_by_group_accuracy():
    # The old rule: (A_correct + A_incorrect) = (1 - 2p)/sigma: down when most answers are right.
    assert shared_prefix_push("common", 7) < 0
    assert shared_prefix_push("common", 1) > 0
