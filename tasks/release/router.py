"""The difficulty router of the `auto` tier: per request, the cheapest member expected to answer as well
as the deepest.

Library module, used by the `route` stage (which fits and calibrates it, `python -m tasks.route`) and by
the serving app (which applies it). The signal is read from ONE pass of the prompt through the family's
first `probe_layers` backbone layers (0 = the token embeddings): the hidden states averaged over the
prompt's positions and the last position's, concatenated. For each member cheaper than the deepest, a
logistic-regression probe on that vector predicts the probability that the member answers as well as
the deepest (its answer right, or the deepest's wrong). Threshold t: the cheapest member whose
probability is at least t answers, else the deepest; t <= 0 always picks the cheapest member, t >= 1
always the deepest, and a request never gets a cheaper member under a higher threshold.

    router = Router.load("artifacts/route/router.json")
    router.check_model(family)                               # the probe belongs to this family
    member = router.choose(prompt_features(family, [ids], router.probe_layers)[0])

Cost accounting (docs/choices.md#route): a request costs the decoder layers of the member that answers
plus the `probe_layers` the router ran, counted in full although they run over the prompt only (the
member's decoding does not reuse them); at threshold 1 the probe is not run and costs nothing.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

ROUTER_FILE = "router.json"
ROUTER_FORMAT = 1
#: Features of the check prompt must match the stored ones this closely: float32 round-off, or for a
#: model held in 16 bits (a bfloat16 replica) this share of the largest stored feature.
CHECK_ATOL = 1e-4
CHECK_RTOL_16BIT = 0.05
_CHECK_VALUES = 16


def member_costs(model) -> dict[int, int]:
    """Decoder layers each member runs per token (DaE blocks included), by exit layer."""
    return {int(d): len(model.member_layers(d)) for d in model.config.exit_layers}


def shared_depth(model) -> int:
    """Backbone layers every member runs (the default probe depth)."""
    return min(model.config.backbone_depth(d) for d in model.config.exit_layers)


def prompt_features(model, prompts: Sequence[Sequence[int]], probe_layers: int) -> np.ndarray:
    """The router's signal for each prompt: N x 2H (float64), the hidden state after the first
    `probe_layers` backbone layers, mean over the prompt's positions then the last position's.

    Each prompt runs alone (batch 1, no padding), as a served request does, so the stage and the server
    compute the same numbers."""
    import torch
    from transformers.masking_utils import create_causal_mask

    if not 0 <= probe_layers <= model.config.num_hidden_layers:
        raise ValueError(
            f"probe_layers={probe_layers}: must be in [0, {model.config.num_hidden_layers}] "
            "(the family's backbone layers)"
        )
    rows = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            if len(ids) == 0:
                raise ValueError(f"prompt {i} has no tokens")
            x = torch.tensor([list(ids)], dtype=torch.long, device=device)
            h = model.model.embed_tokens(x)
            if probe_layers:
                pos = torch.arange(h.shape[1], device=device).unsqueeze(0)
                mask = create_causal_mask(
                    config=model.config,
                    inputs_embeds=h,
                    attention_mask=None,
                    past_key_values=None,
                    position_ids=pos,
                )
                pos_emb = model.model.rotary_emb(h, pos)
                for layer in model.model.layers[:probe_layers]:
                    h = layer(h, attention_mask=mask, position_embeddings=pos_emb, position_ids=pos)
            h = h[0].double()
            rows.append(torch.cat([h.mean(0), h[-1]]).cpu().numpy())
    return np.stack(rows)


# --- the probe ---------------------------------------------------------------------------------
_F = TypeVar("_F", bound=Callable[..., Any])


@functools.cache
def _numpy_blas():
    """numpy's BLAS (OpenBLAS in its wheel), found once; torch's thread pool is not among them."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def _one_blas_thread(fn: _F) -> _F:
    """Run `fn` with numpy's BLAS on one thread, so the probe's numbers do not depend on the thread count.

    OpenBLAS splits a product's sums over its threads (OMP_NUM_THREADS), so the fit's last digits
    differed between 1 and 2 threads and `ruyi audit` found the route stage's output changed
    (docs/choices.md#route). The matrices here are at most a few hundred wide: one thread costs nothing."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _numpy_blas().limit(limits=1):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # exact in [0, 1], no overflow warning


@dataclass(frozen=True)
class Probe:
    """A logistic regression on standardized features: p = sigmoid(w . (x - mean) / scale + b)."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float

    @_one_blas_thread
    def predict(self, features: np.ndarray) -> np.ndarray:
        z = ((np.atleast_2d(features) - self.mean) / self.scale) @ self.weights + self.bias
        return _sigmoid(z)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "weights": self.weights.tolist(),
            "bias": float(self.bias),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], dim: int, where: str) -> Probe:
        try:
            arrays = [np.asarray(d[k], dtype=np.float64) for k in ("mean", "scale", "weights")]
            bias = float(d["bias"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: a probe needs mean, scale, weights and bias ({e})") from None
        if any(a.shape != (dim,) for a in arrays) or not all(np.isfinite(a).all() for a in arrays):
            raise ValueError(f"{where}: mean, scale and weights must be {dim} finite numbers each")
        if not math.isfinite(bias) or (arrays[1] <= 0).any():
            raise ValueError(f"{where}: the bias must be finite and every scale positive")
        return cls(*arrays, bias)


@_one_blas_thread
def fit_probe(features: np.ndarray, labels: np.ndarray, l2: float, iters: int = 50) -> Probe:
    """L2-regularised logistic regression (Newton's method; the bias is not penalised), deterministic:
    the same bits at any thread count.

    A label that never varies gives a constant probe (weights 0, the bias of the smoothed base rate)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
        raise ValueError(f"features N x D and N labels expected, got {x.shape} and {y.shape}")
    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    z = (x - mean) / scale
    n, dim = z.shape
    rate = (y.sum() + 0.5) / (n + 1.0)
    if y.min() == y.max():
        return Probe(mean, scale, np.zeros(dim), float(math.log(rate / (1 - rate))))
    a = np.hstack([z, np.ones((n, 1))])
    w = np.zeros(dim + 1)
    w[-1] = math.log(rate / (1 - rate))
    reg = np.full(dim + 1, float(l2))
    reg[-1] = 0.0
    for _ in range(iters):
        p = _sigmoid(a @ w)
        grad = a.T @ (p - y) + reg * w
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(reg) + 1e-9 * np.eye(dim + 1)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return Probe(mean, scale, w[:-1].copy(), float(w[-1]))


@_one_blas_thread
def cross_fitted(features: np.ndarray, labels: np.ndarray, l2: float, folds: int, seed: int) -> np.ndarray:
    """Out-of-fold probabilities: each row scored by a probe fitted without it (`folds` folds of a
    seeded permutation), so a threshold calibrated on them is not tuned on the probe's own training rows."""
    n = len(labels)
    folds = max(2, min(folds, n))
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n)
    for k in range(folds):
        held = order[k::folds]
        keep = np.setdiff1d(np.arange(n), held)
        out[held] = fit_probe(features[keep], labels[keep], l2).predict(features[held])
    return out


# --- routing -----------------------------------------------------------------------------------
def route(scores: dict[int, np.ndarray], order: Sequence[int], deepest: int, threshold: float) -> np.ndarray:
    """The member each request goes to: the first of `order` (cheapest first) whose score is at least
    `threshold`, else `deepest`. threshold <= 0: always order[0]; threshold >= 1: always `deepest`."""
    n = len(next(iter(scores.values()))) if scores else 0
    chosen = np.full(n, deepest, dtype=np.int64)
    if threshold >= 1.0 or not order:
        return chosen
    undecided = np.ones(n, dtype=bool)
    for d in order:
        take = undecided & (scores[d] >= threshold)
        chosen[take] = d
        undecided &= ~take
    return chosen


def probe_cost(probe_layers: int, threshold: float) -> int:
    """The router's own layers at `threshold`: none at threshold >= 1 (always the deepest, nothing to
    decide, so the probe is not run), else `probe_layers`."""
    return 0 if threshold >= 1.0 else probe_layers


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` for binary `labels` (ties count half); None with one class."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return None
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def curve_point(
    chosen: np.ndarray, correct: dict[int, np.ndarray], costs: dict[int, int], overhead: int
) -> dict[str, float]:
    """Accuracy and mean layers per request of one routing (`overhead`: the router's own layers)."""
    acc = float(np.mean([correct[int(d)][i] for i, d in enumerate(chosen)])) if len(chosen) else 0.0
    layers = float(np.mean([costs[int(d)] for d in chosen])) + overhead if len(chosen) else 0.0
    share = {str(d): float(np.mean(chosen == d)) for d in sorted(costs)}
    return {"accuracy": acc, "layers_per_request": layers, "share": share}


def sweep(
    scores: dict[int, np.ndarray],
    order: Sequence[int],
    deepest: int,
    thresholds: Sequence[float],
    correct: dict[int, np.ndarray],
    costs: dict[int, int],
    overhead: int,
) -> list[dict[str, Any]]:
    """`curve_point` at each threshold (the cost/quality curve)."""
    return [
        {
            "threshold": float(t),
            **curve_point(route(scores, order, deepest, t), correct, costs, probe_cost(overhead, t)),
        }
        for t in thresholds
    ]


def operating_point(points: list[dict[str, Any]], floor: float) -> dict[str, Any]:
    """The cheapest point of a sweep whose accuracy is at least `floor` (ties: the more accurate, then
    the higher threshold); the threshold-1 point (always the deepest) when none is."""
    ok = [p for p in points if p["accuracy"] >= floor - 1e-12]
    if not ok:
        return max(points, key=lambda p: p["threshold"])
    return min(ok, key=lambda p: (p["layers_per_request"], -p["accuracy"], -p["threshold"]))


# --- the calibrated router ---------------------------------------------------------------------
@dataclass(frozen=True)
class Router:
    """A calibrated router (`router.json`): probes per cheap member, its threshold and a check prompt."""

    probe_layers: int
    exit_layers: tuple[int, ...]
    costs: dict[int, int]
    order: tuple[int, ...]  # the members cheaper than the deepest, cheapest first
    probes: dict[int, Probe]
    threshold: float
    check_ids: tuple[int, ...]
    check_features: tuple[float, ...]
    info: dict[str, Any]

    @property
    def deepest(self) -> int:
        return self.exit_layers[-1]

    def scores(self, features: np.ndarray) -> dict[int, np.ndarray]:
        return {d: self.probes[d].predict(features) for d in self.order}

    def needs_signal(self, threshold: float | None = None) -> bool:
        """Whether routing at `threshold` (None: the calibrated one) needs the prompt's features."""
        t = self.threshold if threshold is None else float(threshold)
        return t < 1.0 and bool(self.order)

    def choose(self, features: np.ndarray, threshold: float | None = None) -> tuple[int, dict[int, float]]:
        """The member for one request's features (1-D) and each cheap member's probability."""
        t = self.threshold if threshold is None else float(threshold)
        scores = self.scores(np.asarray(features)[None, :])
        member = int(route(scores, self.order, self.deepest, t)[0])
        return member, {d: float(s[0]) for d, s in scores.items()}

    def check_model(self, model) -> None:
        """ValueError unless `model` is the family this router was calibrated on (same members and
        layers, and the check prompt's features agree: the probed weights are the same)."""
        exits = tuple(int(d) for d in model.config.exit_layers)
        if exits != self.exit_layers or member_costs(model) != self.costs:
            raise ValueError(
                f"the router was calibrated for members {list(self.exit_layers)} with layers "
                f"{self.costs}; this family has {list(exits)} with {member_costs(model)}"
            )
        import torch

        got = prompt_features(model, [list(self.check_ids)], self.probe_layers)[0][:_CHECK_VALUES]
        ref = np.asarray(self.check_features)
        diff = float(np.abs(got - ref).max())
        wide = next(model.parameters()).dtype in (torch.float32, torch.float64)
        tol = CHECK_ATOL if wide else max(CHECK_ATOL, CHECK_RTOL_16BIT * float(np.abs(ref).max()))
        if not diff <= tol:
            raise ValueError(
                f"the router's check prompt gives other features on this family (max difference {diff:.3g} "
                f"> {tol:.3g}): it was calibrated on other weights"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ROUTER_FORMAT,
            "signal": (
                f"logistic probes on the hidden state after backbone layer {self.probe_layers} "
                "(0 = embeddings): mean over the prompt's positions, then the last position"
            ),
            "probe_layers": self.probe_layers,
            "exit_layers": list(self.exit_layers),
            "member_layers": {str(d): c for d, c in self.costs.items()},
            "order": list(self.order),
            "threshold": self.threshold,
            "probes": {str(d): p.to_dict() for d, p in self.probes.items()},
            "check": {"input_ids": list(self.check_ids), "features": list(self.check_features)},
            **self.info,
        }

    def save(self, path: str | Path) -> None:
        from tasks.core.files import write_json

        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: Any, where: str = ROUTER_FILE) -> Router:
        if not isinstance(d, dict) or d.get("format") != ROUTER_FORMAT:
            raise ValueError(f"{where}: not a router file of format {ROUTER_FORMAT}")
        try:
            probe_layers = int(d["probe_layers"])
            exits = tuple(int(x) for x in d["exit_layers"])
            costs = {int(k): int(v) for k, v in d["member_layers"].items()}
            order = tuple(int(x) for x in d["order"])
            threshold = float(d["threshold"])
            check_ids = tuple(int(x) for x in d["check"]["input_ids"])
            check_features = tuple(float(x) for x in d["check"]["features"])
            raw_probes = d["probes"]
            if not isinstance(raw_probes, dict) or not all(isinstance(v, dict) for v in raw_probes.values()):
                raise TypeError("probes must map each member to its probe's fields")
            probe_members = sorted(int(k) for k in raw_probes)
            dim = len(next(iter(raw_probes.values()))["mean"]) if raw_probes else 0
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{where}: malformed router ({type(e).__name__}: {e})") from None
        if not exits or sorted(costs) != sorted(exits) or not set(order) <= set(exits[:-1]):
            raise ValueError(f"{where}: exit_layers, member_layers and order disagree")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"{where}: threshold {threshold} is not in [0, 1]")
        if probe_members != sorted(order):
            raise ValueError(f"{where}: probes must be given for exactly the members of order {list(order)}")
        probes = {int(k): Probe.from_dict(v, dim, f"{where}: probe {k}") for k, v in raw_probes.items()}
        known = {"format", "signal", "probe_layers", "exit_layers", "member_layers", "order", "threshold"}
        info = {k: v for k, v in d.items() if k not in known | {"probes", "check"}}
        return cls(probe_layers, exits, costs, order, probes, threshold, check_ids, check_features, info)

    @classmethod
    def load(cls, path: str | Path) -> Router:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the router ({e})") from None
        return cls.from_dict(data, str(path))


def build_router(
    model,
    probes: dict[int, Probe],
    probe_layers: int,
    threshold: float,
    check_ids: Sequence[int],
    info: dict[str, Any] | None = None,
) -> Router:
    """A `Router` for `model` (its members, their layers, the check prompt's features computed now)."""
    costs = member_costs(model)
    exits = tuple(int(d) for d in model.config.exit_layers)
    order = tuple(sorted((d for d in exits[:-1] if costs[d] < costs[exits[-1]]), key=lambda d: (costs[d], d)))
    feats = prompt_features(model, [list(check_ids)], probe_layers)[0][:_CHECK_VALUES]
    return Router(
        probe_layers,
        exits,
        costs,
        order,
        {d: probes[d] for d in order},
        float(threshold),
        tuple(int(i) for i in check_ids),
        tuple(float(v) for v in feats),
        dict(info or {}),
    )
