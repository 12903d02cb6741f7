"""The difficulty router's library (tasks/release/router.py): probe fitting, threshold behaviour, the
cost/quality sweep, the calibrated operating point, router files and the family check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_export import build_tiny_family, tiny_tokenizer

from tasks.release.router import (
    Probe,
    Router,
    auc,
    build_router,
    cross_fitted,
    curve_point,
    fit_probe,
    member_costs,
    operating_point,
    probe_cost,
    prompt_features,
    route,
    shared_depth,
    sweep,
)

COSTS = {2: 4, 5: 5, 8: 8}
THRESHOLDS = [i / 20 for i in range(21)]


def _scores(n: int = 60, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {2: rng.random(n), 5: rng.random(n)}


def test_threshold_extremes_choose_the_cheapest_and_the_deepest():
    scores = _scores()
    assert (route(scores, (2, 5), 8, 0.0) == 2).all()
    assert (route(scores, (2, 5), 8, -1.0) == 2).all()
    assert (route(scores, (2, 5), 8, 1.0) == 8).all()
    # a probability of exactly 1 still goes to the deepest at threshold 1
    assert (route({2: np.ones(3), 5: np.ones(3)}, (2, 5), 8, 1.0) == 8).all()


def test_cheapest_qualifying_member_answers():
    scores = {2: np.array([0.9, 0.2, 0.2, 0.6]), 5: np.array([0.1, 0.7, 0.3, 0.9])}
    assert route(scores, (2, 5), 8, 0.5).tolist() == [2, 5, 8, 2]
    assert route(scores, (2, 5), 8, 0.65).tolist() == [2, 5, 8, 5]


def test_cost_is_monotone_in_the_threshold_per_request_and_on_average():
    scores = _scores(200, seed=3)
    correct = {d: np.random.default_rng(d).random(200) < 0.6 for d in COSTS}
    previous = None
    for t in THRESHOLDS:
        chosen = route(scores, (2, 5), 8, t)
        cost = np.array([COSTS[int(d)] for d in chosen])
        if previous is not None:
            assert (cost >= previous).all()  # no request gets a cheaper member under a higher threshold
        previous = cost
    pts = sweep(scores, (2, 5), 8, THRESHOLDS, correct, COSTS, 1)
    layers = [p["layers_per_request"] for p in pts[:-1]]
    assert layers == sorted(layers)
    assert pts[0]["layers_per_request"] == 4 + 1 and pts[0]["share"]["2"] == 1.0
    # threshold 1: always the deepest and the probe is not run (no router layers)
    assert pts[-1]["layers_per_request"] == 8 and pts[-1]["accuracy"] == pytest.approx(correct[8].mean())


def test_curve_point_counts_member_and_router_layers():
    correct = {2: np.array([True, False]), 5: np.array([True, True]), 8: np.array([False, True])}
    p = curve_point(np.array([2, 8]), correct, COSTS, 1)
    assert p == {"accuracy": 1.0, "layers_per_request": 7.0, "share": {"2": 0.5, "5": 0.0, "8": 0.5}}
    assert probe_cost(3, 0.99) == 3 and probe_cost(3, 1.0) == 0


def test_operating_point_is_the_cheapest_within_the_floor():
    pts = [
        {"threshold": 0.0, "layers_per_request": 4.0, "accuracy": 0.50},
        {"threshold": 0.5, "layers_per_request": 5.0, "accuracy": 0.66},
        {"threshold": 0.6, "layers_per_request": 5.0, "accuracy": 0.67},
        {"threshold": 0.9, "layers_per_request": 6.0, "accuracy": 0.70},
        {"threshold": 1.0, "layers_per_request": 8.0, "accuracy": 0.68},
    ]
    assert operating_point(pts, 0.67)["threshold"] == 0.6
    assert operating_point(pts, 0.40)["threshold"] == 0.0
    assert operating_point(pts, 0.99)["threshold"] == 1.0  # nothing qualifies: always the deepest


def test_probe_is_the_penalised_maximum_likelihood_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = (x[:, 0] + 0.3 * rng.normal(size=200) > 0).astype(float)
    probe = fit_probe(x, y, l2=1e-6)
    assert auc(probe.predict(x), y) > 0.95
    # the Newton fit is the penalised maximum-likelihood one: its gradient vanishes
    z = (x - probe.mean) / probe.scale
    p = probe.predict(x)
    assert np.abs(z.T @ (p - y) + 1e-6 * probe.weights).max() < 1e-8 and abs((p - y).sum()) < 1e-8
    # a strong penalty shrinks the weights towards 0
    assert np.abs(fit_probe(x, y, l2=1e4).weights).max() < 0.05 * np.abs(probe.weights).max()
    # cross-fitted scores are not the training fit's: each row is scored by a probe that never saw it
    oof = cross_fitted(x, y, 1.0, 5, seed=1)
    assert oof.shape == (200,) and auc(oof, y) > 0.9
    assert not np.allclose(oof, fit_probe(x, y, 1.0).predict(x))


def test_constant_labels_give_a_constant_probe():
    x = np.random.default_rng(0).normal(size=(10, 4))
    probe = fit_probe(x, np.ones(10), 10.0)
    assert (probe.weights == 0).all() and (probe.predict(x) > 0.9).all()
    assert auc(probe.predict(x), np.ones(10)) is None


@pytest.fixture(scope="module")
def family():
    tok = tiny_tokenizer()
    return build_tiny_family(tok, seed=0, exit_layers=(2, 4), dae_blocks=1)[0], tok


def test_prompt_features_are_the_shared_hidden_states(family):
    model, _ = family
    ids = [[5, 6, 7, 8], [9, 10]]
    emb = prompt_features(model, ids, 0)
    with torch.no_grad():
        e = model.model.embed_tokens(torch.tensor([ids[0]])).double()[0]
    np.testing.assert_allclose(emb[0], torch.cat([e.mean(0), e[-1]]).numpy(), atol=1e-12)
    assert emb.shape == (2, 2 * model.config.hidden_size)
    # after k layers, the last position's state is what a member's forward computes at that layer: the
    # prompt's prefix gives the same features at its own last position (causality)
    one = prompt_features(model, ids, 1)
    prefix = prompt_features(model, [ids[0][:2]], 1)
    hidden = model.config.hidden_size
    assert not np.allclose(one[0], emb[0])
    full_states = _layer_states(model, ids[0], 1)
    np.testing.assert_allclose(one[0][hidden:], full_states[-1], atol=1e-5)
    np.testing.assert_allclose(prefix[0][hidden:], full_states[1], atol=1e-5)
    with pytest.raises(ValueError, match="probe_layers"):
        prompt_features(model, ids, model.config.num_hidden_layers + 1)
    with pytest.raises(ValueError, match="no tokens"):
        prompt_features(model, [[]], 1)


def _layer_states(model, ids, k):
    """The hidden states after backbone layer k, from the model's own forward (a hook)."""
    out = {}
    handle = model.model.layers[k - 1].register_forward_hook(lambda m, a, o: out.setdefault("h", o))
    try:
        with torch.no_grad():
            model(torch.tensor([ids]), exit_layer=model.config.exit_layers[-1], use_cache=False)
    finally:
        handle.remove()
    h = out["h"][0] if isinstance(out["h"], tuple) else out["h"]
    return h[0].double().numpy()


def test_router_file_round_trip_and_family_check(family, tmp_path):
    model, _ = family
    costs = member_costs(model)
    assert costs == {d: len(model.member_layers(d)) for d in (2, 4)}
    assert shared_depth(model) == min(model.config.backbone_depth(d) for d in (2, 4))
    x = prompt_features(model, [[3, 4, 5], [6, 7], [8, 9, 10, 11]] * 3, 1)
    probes = {2: fit_probe(x, np.arange(len(x)) % 2, 1.0)}
    router = build_router(model, probes, 1, 0.4, [3, 4, 5], {"calibration": {"rows": len(x)}})
    path = tmp_path / "router.json"
    router.save(path)
    loaded = Router.load(path)
    assert (
        loaded.order == router.order and loaded.threshold == 0.4 and loaded.info["calibration"]["rows"] == 9
    )
    np.testing.assert_allclose(loaded.scores(x)[2], router.scores(x)[2])
    loaded.check_model(model)
    member, scores = loaded.choose(x[0])
    assert member == (2 if scores[2] >= 0.4 else 4)
    assert loaded.choose(x[0], threshold=0.0)[0] == 2 and loaded.choose(x[0], threshold=1.0)[0] == 4
    assert loaded.needs_signal() and not loaded.needs_signal(1.0)

    other = build_tiny_family(tiny_tokenizer(), seed=1, exit_layers=(2, 4), dae_blocks=1)[0]
    with pytest.raises(ValueError, match="other weights"):
        loaded.check_model(other)
    # a replica in bfloat16 (paper scale) passes with the 16-bit tolerance; other weights still fail
    import copy

    loaded.check_model(copy.deepcopy(model).to(torch.bfloat16))
    with pytest.raises(ValueError, match="other weights"):
        loaded.check_model(other.to(torch.bfloat16))

    raw = json.loads(path.read_text())
    for mutate, match in (
        (lambda d: d.update(format=99), "format"),
        (lambda d: d.update(threshold=1.5), "threshold"),
        (lambda d: d["probes"]["2"].update(weights=[1.0]), "finite numbers"),
        (lambda d: d["probes"].pop("2"), "probes must be given"),
        (lambda d: d.pop("check"), "malformed"),
        # the probes' shapes are read inside the checks too: a malformed router, not a KeyError/TypeError
        (lambda d: d["probes"]["2"].pop("mean"), "malformed"),
        (lambda d: d["probes"]["2"].update(mean=3.0), "malformed"),
        (lambda d: d.update(probes=list(d["probes"].values())), "malformed"),
        (lambda d: d["probes"].update({"2": [1.0]}), "malformed"),
    ):
        bad = json.loads(json.dumps(raw))
        mutate(bad)
        with pytest.raises(ValueError, match=match):
            Router.from_dict(bad, "router.json")


def test_probe_refuses_bad_arrays():
    with pytest.raises(ValueError, match="positive"):
        Probe.from_dict({"mean": [0.0], "scale": [0.0], "weights": [1.0], "bias": 0.0}, 1, "p")
    with pytest.raises(ValueError, match="needs mean"):
        Probe.from_dict({"mean": [0.0]}, 1, "p")


def test_probe_fit_has_the_same_bits_at_one_and_two_threads():
    """OpenBLAS splits a product's sums over OMP_NUM_THREADS threads: without the one-thread limit the
    fit's last digits differed between 1 and 2 threads (ruyi audit found the route stage changed)."""
    import hashlib
    import os
    import subprocess
    import sys

    script = (
        "import hashlib, numpy as np\n"
        "from tasks.release.router import cross_fitted, fit_probe\n"
        "rng = np.random.default_rng(0)\n"
        "x = rng.normal(size=(200, 256)); y = (rng.random(200) < 0.4).astype(float)\n"
        "p = fit_probe(x, y, 1.0)\n"
        "blob = p.weights.tobytes() + np.float64(p.bias).tobytes() + p.predict(x).tobytes()\n"
        "blob += cross_fitted(x, y, 1.0, 5, 0).tobytes()\n"
        "print(hashlib.sha256(blob).hexdigest())\n"
    )
    digests = set()
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
        cmd = [sys.executable, "-c", script]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1, digests
    assert hashlib.sha256(b"").hexdigest() not in digests
