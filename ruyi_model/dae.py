"""DaE, Decompose-after-Expansion (Ruyi2 section 4.4): grow one member, train it alone, then shrink it.

Used by the `expand` and `compress` stages; callable on any `FamilialForCausalLM`:
- `expand(model, exit_layer, num_blocks, init="random")`: zero-residual decoder blocks appended to one
  member (every member's logits bit-identical right after); returns a new model.
- `dae_trainable_parameters` / `freeze_for_dae`: what DaE trains (the member's blocks, norm and head).
- `decompose(model, ratio=0.4, calibration=None, ...)`: activation-whitened SVD (after SVD-LLM v2) of
  the DaE blocks' linears (and head) into `LowRankLinear`s with loss-aware rank allocation; returns a
  `DecomposeResult` (the new model and its `DecomposeReport`).
Maths and deviations from the paper: docs/choices.md#expand and #compress.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ruyi_model.config import FamilialConfig
from ruyi_model.modeling import FamilialForCausalLM, LowRankLinear
from ruyi_model.threads import one_thread

log = logging.getLogger(__name__)

#: The linear layers of a Qwen3 decoder block, by path inside the block, and their group (matrix type).
BLOCK_LINEARS: dict[str, str] = {
    "self_attn.q_proj": "q_proj",
    "self_attn.k_proj": "k_proj",
    "self_attn.v_proj": "v_proj",
    "self_attn.o_proj": "o_proj",
    "mlp.gate_proj": "gate_proj",
    "mlp.up_proj": "up_proj",
    "mlp.down_proj": "down_proj",
}
#: Zero at expansion: the block's residual contributions (Ruyi2 Eq. 3).
ZERO_RESIDUAL_LINEARS = ("self_attn.o_proj", "mlp.down_proj")
#: The block's RMSNorms (set to 1 in a random block, copied in a clone).
BLOCK_NORMS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")
EXPAND_INITS = ("random", "clone")
ALLOCATIONS = ("loss_aware", "uniform")
#: Relative damping of the calibration Gram matrix's eigenvalues (times their mean).
DEFAULT_DAMPING = 1e-6


# --- shared helpers -----------------------------------------------------------------------------
def _check_model(model) -> FamilialForCausalLM:
    if not isinstance(model, FamilialForCausalLM):
        raise TypeError(f"expected a FamilialForCausalLM, got {type(model).__name__}")
    return model


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """out x in weight of an `nn.Linear` or (multiplied back) of a `LowRankLinear`."""
    return module.dense_weight() if isinstance(module, LowRankLinear) else module.weight


def _rebuild(
    model: FamilialForCausalLM, config: FamilialConfig
) -> tuple[FamilialForCausalLM, set[str], set[str]]:
    """Builds a model from `config` (same dtype/device/mode as `model`) and copies every tensor whose
    name matches. Returns the new model, the new keys that were not filled and the old keys not used."""
    config.validate_family()
    device = next(model.parameters()).device
    new = FamilialForCausalLM._from_config(config, dtype=model.dtype).to(device)
    result = new.load_state_dict(model.state_dict(), strict=False)
    # Non-persistent buffers (rotary inv_freq) too, dtype included: `.to(bfloat16)` casts them, a fresh model
    # keeps them fp32, and the rebuilt model must compute exactly what the source computes.
    old_buffers = dict(model.named_buffers())
    for name, _ in list(new.named_buffers()):
        if name in old_buffers:
            owner, _, attr = name.rpartition(".")
            setattr(new.get_submodule(owner), attr, old_buffers[name].clone())
    new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new, set(result.missing_keys), set(result.unexpected_keys)


# --- expansion --------------------------------------------------------------------------------
def expand(
    model: FamilialForCausalLM, exit_layer: int, num_blocks: int, init: str = "random"
) -> FamilialForCausalLM:
    """Appends `num_blocks` zero-residual decoder blocks to member `exit_layer` (DaE expansion).

    The blocks go after the member's existing layers (branch layer(s) and earlier DaE blocks) and before
    its norm and head; every member's function is unchanged (docs/choices.md#expand for the init).

    Args:
        model: the family; left unchanged.
        exit_layer: the member to grow (any member, the deepest included; repeated calls append more).
        num_blocks: blocks to append (Ruyi2: 3), >= 1.
        init: "random" (Gaussian q/k/v/gate/up, std `config.initializer_range`, torch's global RNG) or
            "clone" (copies of the member's last layer, low-rank factors multiplied back).

    Returns:
        A new FamilialForCausalLM with `config.dae_blocks` increased for that member (every parameter
        requires grad, as in any fresh model: call `freeze_for_dae` before DaE training).
    """
    model = _check_model(model)
    cfg = model.config
    d = cfg.check_exit(exit_layer)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"expand(num_blocks={num_blocks!r}): must be an integer >= 1")
    if init not in EXPAND_INITS:
        raise ValueError(f"expand(init={init!r}): must be one of {EXPAND_INITS}")
    source_block = model.member_layers(d)[-1]  # the block right before the new ones
    old_count = len(model.exits[str(d)].layers)

    new_cfg = copy.deepcopy(cfg)
    dae = list(cfg.dae_blocks)
    dae[cfg.exit_layers.index(d)] += num_blocks
    new_cfg.dae_blocks = dae
    new, missing, unexpected = _rebuild(model, new_cfg)
    new_prefixes = tuple(f"exits.{d}.layers.{old_count + k}." for k in range(num_blocks))
    if unexpected or any(not key.startswith(new_prefixes) for key in missing):
        raise RuntimeError(
            f"expand: internal error, tensors not carried over: missing={sorted(missing)[:8]} "
            f"unexpected={sorted(unexpected)[:8]}"
        )

    std = cfg.initializer_range
    with torch.no_grad():
        for k in range(num_blocks):
            block = new.exits[str(d)].layers[old_count + k]
            for path in BLOCK_LINEARS:
                weight = block.get_submodule(path).weight
                if path in ZERO_RESIDUAL_LINEARS:
                    weight.zero_()
                elif init == "random":
                    weight.normal_(mean=0.0, std=std)
                else:
                    weight.copy_(_dense_weight(source_block.get_submodule(path)))
            for path in BLOCK_NORMS:
                norm_weight = block.get_submodule(path).weight
                if init == "random":
                    norm_weight.fill_(1.0)
                else:
                    norm_weight.copy_(source_block.get_submodule(path).weight)
    log.info(
        "expand: member %d +%d %s zero-residual blocks (dae_blocks %s -> %s)",
        d,
        num_blocks,
        init,
        cfg.dae_blocks,
        new_cfg.dae_blocks,
    )
    return new


def dae_trainable_parameters(model: FamilialForCausalLM, exit_layer: int) -> list[tuple[str, nn.Parameter]]:
    """What DaE trains on member `exit_layer`: its DaE blocks, its norm and its head.

    Returns:
        `(name, parameter)` pairs, names as in `model.named_parameters()`, in model order.

    Raises:
        ValueError: the member has no DaE blocks, or the family shares one head among all members
            (training it would change every other member).
    """
    model = _check_model(model)
    cfg = model.config
    d = cfg.check_exit(exit_layer)
    if cfg.shared_heads:
        raise ValueError(
            "DaE trains the member's LM head, but this family has shared_heads=True: the head is "
            "used by every member, so training it would change all of them. Use a family with "
            "separate heads (shared_heads=False)."
        )
    if cfg.num_dae_blocks(d) == 0:
        raise ValueError(
            f"member exit_layer={d} has no DaE blocks (config.dae_blocks={cfg.dae_blocks}); "
            "call ruyi_model.dae.expand first"
        )
    n_branch = cfg.branch_layers(d)
    prefixes = tuple(f"exits.{d}.layers.{i}." for i in range(n_branch, n_branch + cfg.num_dae_blocks(d)))
    prefixes += (f"exits.{d}.norm.", f"exits.{d}.lm_head.")
    return [(name, p) for name, p in model.named_parameters() if name.startswith(prefixes)]


def freeze_for_dae(model: FamilialForCausalLM, exit_layer: int) -> list[tuple[str, nn.Parameter]]:
    """Sets `requires_grad` True on `dae_trainable_parameters(model, exit_layer)` and False elsewhere.

    Returns:
        The trainable `(name, parameter)` pairs (pass them to the optimizer).
    """
    trainable = dae_trainable_parameters(model, exit_layer)
    names = {name for name, _ in trainable}
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    return trainable


# --- low-rank factorisation --------------------------------------------------------------------
def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Rank that removes the fraction `ratio` of an out x in matrix's parameters (SVD-LLM).

    k = floor((1 - ratio) * m * n / (m + n)), clipped to [1, min(m, n)].
    """
    m, n = out_features, in_features
    k = math.floor(
        (1.0 - ratio) * m * n / (m + n) + 1e-9
    )  # the epsilon absorbs float noise at exact integers
    return max(1, min(k, m, n))


@dataclass
class _Spectrum:
    """SVD of a (whitened) weight: W' at rank k = u[:, :k] diag(s_k) vh[:k] (vh already mapped back)."""

    u: torch.Tensor  # out x r
    s: torch.Tensor  # r
    vh: torch.Tensor  # r x in

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        root = self.s[:rank].sqrt()
        return root[:, None] * self.vh[:rank], self.u[:, :rank] * root[None, :]

    def tail_loss(self, rank: int) -> float:
        return float(self.s[rank:].square().sum().sqrt())

    def total(self) -> float:
        return float(self.s.square().sum().sqrt())


def _spectrum(weight: torch.Tensor, gram: torch.Tensor | None, damping: float) -> _Spectrum:
    """The (whitened) SVD in float64, on one thread: the same bits at any thread count."""
    w = weight.detach().to(torch.float64)
    with one_thread():
        if gram is None:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            return _Spectrum(u, s, vh)
        gram = gram.to(device=w.device, dtype=torch.float64)
        gram = 0.5 * (gram + gram.T)
        evals, evecs = torch.linalg.eigh(gram)
        evals = evals.clamp_min(0.0)
        evals = evals + damping * max(float(evals.mean()), torch.finfo(torch.float64).tiny)
        root = evals.sqrt()
        u, s, vh = torch.linalg.svd(w @ (evecs * root[None, :]), full_matrices=False)
        return _Spectrum(u, s, (vh / root[None, :]) @ evecs.T)


def svd_lowrank(
    weight: torch.Tensor, rank: int, gram: torch.Tensor | None = None, damping: float = DEFAULT_DAMPING
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-`rank` factors of `weight`, plain or activation-aware (whitened by `gram`).

    Args:
        weight: out x in.
        rank: kept rank, 1..min(out, in).
        gram: in x in `X^T X` of the matrix's calibration inputs X (N x in), or None for plain SVD.
        damping: added to the Gram eigenvalues, relative to their mean.

    Returns:
        `(weight_a, weight_b, loss)`: A (rank x in) and B (out x rank) in `weight`'s dtype with
        `B @ A ~ weight`, and the truncation loss: `||(W - BA) X^T||_F` with a Gram matrix (exact up to
        the damping), `||W - BA||_F` without.
    """
    if weight.ndim != 2:
        raise ValueError(f"svd_lowrank: weight must be 2-D (out x in), got shape {tuple(weight.shape)}")
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(
            f"svd_lowrank: rank={rank} must be in 1..{min(weight.shape)} for shape {tuple(weight.shape)}"
        )
    if gram is not None and tuple(gram.shape) != (weight.shape[1],) * 2:
        raise ValueError(
            f"svd_lowrank: gram must be {weight.shape[1]} x {weight.shape[1]}, got {tuple(gram.shape)}"
        )
    spec = _spectrum(weight, gram, damping)
    a, b = spec.factors(rank)
    return a.to(weight.dtype), b.to(weight.dtype), spec.tail_loss(rank)


# --- decomposition ----------------------------------------------------------------------------
@dataclass
class MatrixDecomposition:
    """One target matrix of `decompose`.

    Attributes:
        path: module path (e.g. "exits.2.layers.1.mlp.down_proj").
        group: allocation group, "exits.<d>.<type>" (type: q_proj ... down_proj, lm_head).
        exit_layer: the member it belongs to.
        shape: (out, in).
        rank: kept rank (None when skipped).
        allocated_ratio: the removed fraction the allocation asked for.
        params_before, params_after: dense parameters and factor parameters (= before when skipped).
        truncation_loss: ||(W - W') X^T||_F (calibrated) or ||W - W'||_F (plain) at `rank`.
        relative_loss: truncation_loss / ||W X^T||_F (or / ||W||_F).
        uniform_loss: the loss at the uniform-ratio rank (the allocation's input, Eq. 5).
        skipped: why the matrix was left dense, or None.
    """

    path: str
    group: str
    exit_layer: int
    shape: tuple[int, int]
    rank: int | None
    allocated_ratio: float
    params_before: int
    params_after: int
    truncation_loss: float
    relative_loss: float
    uniform_loss: float
    skipped: str | None = None


@dataclass
class DecomposeReport:
    """What `decompose` did (`DecomposeResult.report`).

    `params_before`/`params_after` count the target matrices only (skipped ones count the same before
    and after); `achieved_ratio = 1 - after / before`; `group_ratios` is the achieved ratio per group.
    """

    target_ratio: float
    allocation: str
    calibrated: bool
    calibration_tokens: int
    params_before: int
    params_after: int
    matrices: list[MatrixDecomposition] = field(default_factory=list)
    group_ratios: dict[str, float] = field(default_factory=dict)

    @property
    def achieved_ratio(self) -> float:
        return 1.0 - self.params_after / self.params_before

    def to_dict(self) -> dict:
        out = asdict(self)
        out["achieved_ratio"] = self.achieved_ratio
        return out


def _targets(
    model: FamilialForCausalLM, exit_layer: int | None, include_head: bool
) -> dict[str, tuple[int, str]]:
    """`{module path: (member, group type)}` of the matrices to decompose."""
    cfg = model.config
    if exit_layer is not None:
        members = [cfg.check_exit(exit_layer)]
    else:
        members = [d for d in cfg.exit_layers if cfg.num_dae_blocks(d) > 0]
        if not members:
            raise ValueError(
                f"decompose: no member has DaE blocks (config.dae_blocks={cfg.dae_blocks}); "
                "expand a member first or pass exit_layer="
            )
    if include_head and cfg.shared_heads:
        raise ValueError(
            "decompose(include_head=True) on a family with shared_heads=True would change every "
            "member's head; pass include_head=False"
        )
    targets: dict[str, tuple[int, str]] = {}
    for d in members:
        n_branch = cfg.branch_layers(d)
        for i in range(n_branch, n_branch + cfg.num_dae_blocks(d)):
            for path, group in BLOCK_LINEARS.items():
                targets[f"exits.{d}.layers.{i}.{path}"] = (d, group)
        if include_head:
            targets[f"exits.{d}.lm_head"] = (d, "lm_head")
    if not targets:
        raise ValueError(
            f"decompose: member exit_layer={members[0]} has no DaE blocks and include_head=False: "
            "nothing to decompose"
        )
    return targets


def _calibration_batches(calibration, vocab_size: int) -> list[torch.Tensor]:
    batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    if not batches:
        raise ValueError("decompose: calibration is empty")
    for i, batch in enumerate(batches):
        if (
            not isinstance(batch, torch.Tensor)
            or batch.ndim != 2
            or batch.dtype not in (torch.long, torch.int32)
        ):
            what = (
                f"shape {tuple(batch.shape)} {batch.dtype}"
                if isinstance(batch, torch.Tensor)
                else type(batch).__name__
            )
            raise ValueError(
                f"decompose: calibration batch {i} must be a B x T LongTensor of token ids, got {what}"
            )
        if batch.numel() == 0:
            raise ValueError(f"decompose: calibration batch {i} is empty")
        lo, hi = int(batch.min()), int(batch.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"decompose: calibration batch {i} has token ids in [{lo}, {hi}], outside the "
                f"vocabulary 0..{vocab_size - 1}"
            )
    return batches


@torch.no_grad()
def collect_input_grams(
    model: FamilialForCausalLM, paths: dict[str, int], calibration
) -> tuple[dict[str, torch.Tensor], int]:
    """Runs each member on the calibration tokens and accumulates `X^T X` of each module's input.

    Args:
        model: the family (its train/eval mode is restored afterwards).
        paths: `{module path: member}`; a module's inputs are collected while its member runs.
        calibration: a B x T LongTensor of token ids or an iterable of them.

    Returns:
        `({path: in x in float64 Gram matrix}, number of calibration tokens)`.
    """
    from tqdm.auto import tqdm

    batches = _calibration_batches(calibration, model.config.vocab_size)
    device = next(model.parameters()).device
    grams: dict[str, torch.Tensor] = {}
    active = {"member": None}
    hooks = []

    def make_hook(path: str, member: int):
        def hook(module, args):
            if active["member"] != member:
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            grams[path] = grams[path] + x.T @ x if path in grams else x.T @ x

        return hook

    for path, member in paths.items():
        hooks.append(model.get_submodule(path).register_forward_pre_hook(make_hook(path, member)))
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        members = sorted(set(paths.values()))
        for batch in tqdm(batches, desc="decompose: calibration", unit="batch", disable=None):
            batch = batch.to(device=device, dtype=torch.long)
            tokens += batch.numel()
            for d in members:
                active["member"] = d
                model(batch, exit_layer=d, use_cache=False)
    finally:
        active["member"] = None
        for h in hooks:
            h.remove()
        model.train(was_training)
    never = sorted(set(paths) - set(grams))
    if never:
        raise RuntimeError(f"decompose: modules {never} received no input during calibration")
    return grams, tokens


def _allocate(scores: list[float], params: list[int], upper: list[float], ratio: float) -> list[float]:
    """Ratios r_i = clip(c * scores_i, 0, upper_i) whose parameter-weighted mean is `ratio` (bisection
    on c)."""
    total = sum(params)

    def mean_ratio(c: float) -> float:
        return sum(p * min(c * s, u) for s, p, u in zip(scores, params, upper)) / total

    hi = max(u / s for s, u in zip(scores, upper))
    if mean_ratio(hi) <= ratio:  # infeasible or exactly at the bound: everything at rank 1
        return list(upper)
    lo = 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_ratio(mid) < ratio else (lo, mid)
    return [min(hi * s, u) for s, u in zip(scores, upper)]


@dataclass
class DecomposeResult:
    """What `decompose` returns: the new (compressed) model and the report of what was done."""

    model: FamilialForCausalLM
    report: DecomposeReport


@dataclass
class _Allocation:
    """The removed fraction each target matrix is asked for (`ratios`), with the allocation's inputs."""

    groups: dict[str, list[str]]  # "exits.<d>.<type>" -> module paths
    uniform_loss: dict[str, float]  # truncation loss at the uniform-ratio rank (Eq. 5's L_min)
    ratios: dict[str, float]


@dataclass
class _Plan:
    """The per-matrix outcome: every target's entry; ranks and (A, B) factors of those made low rank."""

    matrices: list[MatrixDecomposition]
    ranks: dict[str, int]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]


def decompose(
    model: FamilialForCausalLM,
    ratio: float = 0.4,
    calibration=None,
    allocation: str = "loss_aware",
    include_head: bool = True,
    exit_layer: int | None = None,
    damping: float = DEFAULT_DAMPING,
) -> DecomposeResult:
    """Replaces the DaE blocks' linear weights (and the member's head) by low-rank factors (DaE "Decompose").

    Args:
        model: the family; left unchanged.
        ratio: fraction of the target matrices' parameters to remove, in (0, 1) (Ruyi2: 0.4).
        calibration: token ids (B x T LongTensor or an iterable of them) for activation-aware
            (whitened) truncation and loss-aware allocation; None: plain SVD, uniform ratio.
        allocation: "loss_aware" (Eq. 5-6, needs calibration) or "uniform".
        include_head: also decompose each target member's own LM head.
        exit_layer: decompose this member (its DaE blocks, if any, and head); None: every member with
            DaE blocks.
        damping: relative damping of the calibration Gram eigenvalues.

    Returns:
        DecomposeResult: `.model`, a new FamilialForCausalLM with `config.lowrank_ranks` extended
        (matrices that are already low rank are not touched), and `.report`, its `DecomposeReport`.
    """
    model = _check_model(model)
    _check_decompose_args(ratio, allocation, damping)
    targets = _decompose_targets(model, exit_layer, include_head)
    if calibration is None and allocation == "loss_aware":
        log.warning(
            "decompose: allocation='loss_aware' needs calibration activations; none given, so every "
            "matrix gets the uniform ratio %.3f (plain SVD)",
            ratio,
        )
        allocation = "uniform"

    grams, tokens = ({}, 0)
    if calibration is not None:
        grams, tokens = collect_input_grams(model, {p: d for p, (d, _) in targets.items()}, calibration)
    spectra = _spectra(model, targets, grams, damping)
    shapes = {p: tuple(model.get_submodule(p).weight.shape) for p in targets}
    alloc = _allocate_ratios(targets, shapes, spectra, ratio, allocation)
    plan = _plan_matrices(targets, shapes, spectra, alloc)
    if not plan.ranks:
        raise ValueError(
            f"decompose(ratio={ratio}): no target matrix gets smaller at this ratio; raise the ratio"
        )
    new = _build_lowrank(model, plan)
    report = _report(plan, alloc, ratio, allocation, calibration is not None, tokens)
    skipped = [e.path for e in plan.matrices if e.skipped]
    log.info(
        "decompose: %d matrices, %d -> %d params (%.1f%% removed, target %.1f%%, %s%s)%s",
        len(plan.ranks),
        report.params_before,
        report.params_after,
        100 * report.achieved_ratio,
        100 * ratio,
        allocation,
        ", whitened" if calibration is not None else ", plain SVD",
        f"; left dense: {skipped}" if skipped else "",
    )
    return DecomposeResult(new, report)


def _check_decompose_args(ratio, allocation: str, damping: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise ValueError(
            f"decompose(ratio={ratio!r}): must be a fraction in (0, 1) of the parameters to remove"
        )
    if allocation not in ALLOCATIONS:
        raise ValueError(f"decompose(allocation={allocation!r}): must be one of {ALLOCATIONS}")
    if not damping >= 0.0:
        raise ValueError(f"decompose(damping={damping!r}): must be >= 0")


def _decompose_targets(
    model: FamilialForCausalLM, exit_layer: int | None, include_head: bool
) -> dict[str, tuple[int, str]]:
    """`_targets` less the matrices that are already low rank (an error when none is left)."""
    targets = {
        path: v
        for path, v in _targets(model, exit_layer, include_head).items()
        if not isinstance(model.get_submodule(path), LowRankLinear)
    }
    if not targets:
        raise ValueError(
            "decompose: every target matrix is already low rank (config.lowrank_ranks); nothing to do"
        )
    return targets


def _spectra(
    model: FamilialForCausalLM,
    targets: dict[str, tuple[int, str]],
    grams: dict[str, torch.Tensor],
    damping: float,
) -> dict[str, _Spectrum]:
    from tqdm.auto import tqdm

    spectra: dict[str, _Spectrum] = {}
    for path in tqdm(targets, desc="decompose: SVD", unit="matrix", disable=None):
        spectra[path] = _spectrum(_dense_weight(model.get_submodule(path)), grams.get(path), damping)
    return spectra


def _allocate_ratios(
    targets: dict[str, tuple[int, str]],
    shapes: dict[str, tuple[int, int]],
    spectra: dict[str, _Spectrum],
    ratio: float,
    allocation: str,
) -> _Allocation:
    """Uniform: `ratio` everywhere; loss-aware: Eq. 5-6 within each group (see the module docstring)."""
    uniform_loss = {p: spectra[p].tail_loss(rank_for_ratio(*shapes[p], ratio)) for p in targets}
    allocated = {p: float(ratio) for p in targets}
    groups: dict[str, list[str]] = {}
    for path, (d, kind) in targets.items():
        groups.setdefault(f"exits.{d}.{kind}", []).append(path)
    if allocation == "loss_aware":
        for paths in groups.values():
            scores = [1.0 / math.log(max(uniform_loss[p], math.e)) for p in paths]  # Eq. 6's 1/log, clamped
            params = [shapes[p][0] * shapes[p][1] for p in paths]
            upper = [1.0 - (shapes[p][0] + shapes[p][1]) / (shapes[p][0] * shapes[p][1]) for p in paths]
            for p, r in zip(paths, _allocate(scores, params, upper, ratio)):
                allocated[p] = r
    return _Allocation(groups=groups, uniform_loss=uniform_loss, ratios=allocated)


def _plan_matrices(
    targets: dict[str, tuple[int, str]],
    shapes: dict[str, tuple[int, int]],
    spectra: dict[str, _Spectrum],
    alloc: _Allocation,
) -> _Plan:
    """Each matrix's rank at its allocated ratio; a matrix whose factors would not be smaller stays dense."""
    plan = _Plan(matrices=[], ranks={}, factors={})
    for path, (d, kind) in targets.items():
        m, n = shapes[path]
        spec = spectra[path]
        rank = rank_for_ratio(m, n, alloc.ratios[path])
        total = spec.total()
        entry = MatrixDecomposition(
            path=path,
            group=f"exits.{d}.{kind}",
            exit_layer=d,
            shape=(m, n),
            rank=rank,
            allocated_ratio=alloc.ratios[path],
            params_before=m * n,
            params_after=rank * (m + n),
            truncation_loss=spec.tail_loss(rank),
            relative_loss=0.0,
            uniform_loss=alloc.uniform_loss[path],
        )
        if rank * (m + n) >= m * n:
            entry.rank, entry.params_after, entry.truncation_loss = None, m * n, 0.0
            entry.skipped = (
                f"rank {rank} factors ({rank * (m + n)} params) are not smaller than the dense {m}x{n}"
            )
        else:
            plan.ranks[path] = rank
            plan.factors[path] = spec.factors(rank)
        entry.relative_loss = entry.truncation_loss / total if total > 0 else 0.0
        plan.matrices.append(entry)
    return plan


def _build_lowrank(model: FamilialForCausalLM, plan: _Plan) -> FamilialForCausalLM:
    """A copy of `model` whose planned matrices are `LowRankLinear`s holding the planned factors."""
    new_cfg = copy.deepcopy(model.config)
    new_cfg.lowrank_ranks = {**model.config.lowrank_ranks, **plan.ranks}
    new, missing, unexpected = _rebuild(model, new_cfg)
    want_missing = {f"{p}.weight_{x}" for p in plan.ranks for x in "ab"}
    want_unexpected = {f"{p}.weight" for p in plan.ranks}
    if missing != want_missing or unexpected != want_unexpected:
        raise RuntimeError(
            f"decompose: internal error rebuilding the model: missing={sorted(missing - want_missing)[:8]} "
            f"unexpected={sorted(unexpected - want_unexpected)[:8]}"
        )
    with torch.no_grad():
        for path, (a, b) in plan.factors.items():
            module = new.get_submodule(path)
            module.weight_a.copy_(a)
            module.weight_b.copy_(b)
    return new


def _report(
    plan: _Plan, alloc: _Allocation, ratio: float, allocation: str, calibrated: bool, tokens: int
) -> DecomposeReport:
    matrices = plan.matrices
    group_ratios = {}
    for name, paths in alloc.groups.items():
        before = sum(e.params_before for e in matrices if e.path in paths)
        after = sum(e.params_after for e in matrices if e.path in paths)
        group_ratios[name] = 1.0 - after / before
    return DecomposeReport(
        target_ratio=float(ratio),
        allocation=allocation,
        calibrated=calibrated,
        calibration_tokens=tokens,
        params_before=sum(e.params_before for e in matrices),
        params_after=sum(e.params_after for e in matrices),
        matrices=matrices,
        group_ratios=group_ratios,
    )


__all__ = [
    "expand",
    "dae_trainable_parameters",
    "freeze_for_dae",
    "decompose",
    "DecomposeReport",
    "DecomposeResult",
    "MatrixDecomposition",
    "svd_lowrank",
    "rank_for_ratio",
    "collect_input_grams",
]
