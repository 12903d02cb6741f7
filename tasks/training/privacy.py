"""Training the edge's privacy mapping and auditing it by attacks.

Library module (used by the privacy stage, tasks/privacy.py, and benchmarks/experiments/privacy_tradeoff.py):
- `train_mapping`: a `ruyi_model.privacy.PrivacyMapping` plus a behaviour head (the cloud's task
  stand-in) trained with task cross-entropy + `beta * KL` + an identity adversary (alternating
  min-max: the adversary learns identity from z, the mapping is pushed to make its prediction uniform,
  weight `adv_weight`); `train_raw_head`: the same head on raw features (the non-private baseline).
- The attacks, each taking any release function (features -> released tensor), so a deliberately leaky
  or an obviously private mapping can be audited alike: `reid_attack` (a fresh MLP or linear probe
  trained to convergence on released features of the training clips, tested on held-out clips),
  `inversion_attack` (a white-box decoder rebuilding frames from released features: PSNR, SSIM, and
  the identity accuracy of a raw-frame classifier on the reconstructions), `audit` (all of them plus
  behaviour F1), and `beta_sweep` (the privacy-utility curve data).
- `train_tower`: trains the edge's vision tower (ruyi_model.camera.EdgeEncoder) on behaviour labels;
  `qa_accuracy`: the clips' questions answered from predicted behaviours.
Method and figures: docs/choices.md#privacy.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ruyi_model.camera import mlp
from ruyi_model.privacy import PrivacyMapping

ReleaseFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _bar(iterable, desc: str, quiet: bool, total: int | None = None):
    if quiet:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, mininterval=1.0)


_mlp = mlp  # the cloud head / adversary / attacker architecture (ruyi_model.camera)


# ------------------------------------------------------------------------------------------------ metrics
def macro_f1(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> float:
    """Macro-averaged F1 over the classes present in `target` or `pred`."""
    f1s = []
    for c in range(n_classes):
        tp = int(((pred == c) & (target == c)).sum())
        fp = int(((pred == c) & (target != c)).sum())
        fn = int(((pred != c) & (target == c)).sum())
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s) if f1s else 0.0


def chance_accuracy(labels: torch.Tensor) -> float:
    """Accuracy of the best constant guess: the most frequent label's share."""
    counts = Counter(labels.tolist())
    return max(counts.values()) / len(labels)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR (dB) of images in [0, 1], shape [N, ...]."""
    mse = (pred - target).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def ssim(pred: torch.Tensor, target: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Per-sample mean SSIM (Wang et al. 2004, Gaussian window, per channel) of [N, C, H, W] in [0, 1]."""
    c = pred.shape[1]
    ax = torch.arange(window, dtype=pred.dtype) - (window - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(pred), blur(target)
    sxx = blur(pred * pred) - mu_x**2
    syy = blur(target * target) - mu_y**2
    sxy = blur(pred * target) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------- training
@dataclass
class MappingConfig:
    """How the mapping is trained. `beta` weighs the KL, `adv_weight` the identity adversary."""

    out_dim: int = 16
    hidden: int = 128
    beta: float = 1e-2
    adv_weight: float = 1.0
    adv_steps: int = 2  # adversary updates per mapping update
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    adv_lr: float = 3e-3
    min_logvar: float = -6.0
    seed: int = 0


@dataclass
class TrainedMapping:
    mapping: PrivacyMapping
    head: nn.Module  # behaviour classifier on z (the cloud's task stand-in)
    config: MappingConfig
    history: list[dict] = field(default_factory=list)

    def release_fn(self) -> ReleaseFn:
        mapping = self.mapping.eval()

        def release(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            return mapping.release(x, generator=generator)

        return release

    @torch.no_grad()
    def behaviour_f1(
        self, features: torch.Tensor, behaviour: torch.Tensor, n_behaviours: int, seed: int = 0
    ) -> float:
        """Macro F1 of the private pipeline: released (sampled) z -> behaviour head."""
        z = self.release_fn()(features, torch.Generator().manual_seed(seed))
        return macro_f1(self.head.eval()(z).argmax(-1), behaviour, n_behaviours)


def train_mapping(
    features: torch.Tensor,
    behaviour: torch.Tensor,
    identity: torch.Tensor,
    n_behaviours: int,
    n_identities: int,
    cfg: MappingConfig,
    quiet: bool = True,
) -> TrainedMapping:
    """Trains mapping + behaviour head with CE + beta*KL + adv_weight * (adversary pushed to uniform)."""
    torch.manual_seed(cfg.seed)
    mapping = PrivacyMapping(features.shape[1], cfg.out_dim, cfg.hidden, min_logvar=cfg.min_logvar)
    mapping.set_standardization(features)
    head = _mlp(cfg.out_dim, n_behaviours, cfg.hidden)
    adversary = _mlp(cfg.out_dim, n_identities, cfg.hidden)
    opt = torch.optim.Adam([*mapping.parameters(), *head.parameters()], lr=cfg.lr)
    adv_opt = torch.optim.Adam(adversary.parameters(), lr=cfg.adv_lr)
    g = torch.Generator().manual_seed(cfg.seed)
    n = features.shape[0]
    history = []
    mapping.train()
    head.train()
    for step in _bar(range(cfg.steps), f"mapping beta={cfg.beta:g}", quiet):
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=g)
        x, yb, yi = features[idx], behaviour[idx], identity[idx]
        adv_loss = torch.tensor(0.0)
        if cfg.adv_weight > 0:
            with torch.no_grad():
                z_fixed = mapping(x).z
            for _ in range(cfg.adv_steps):
                adv_loss = F.cross_entropy(adversary(z_fixed), yi)
                adv_opt.zero_grad()
                adv_loss.backward()
                adv_opt.step()
        out = mapping(x)
        task = F.cross_entropy(head(out.z), yb)
        kl = out.kl()
        loss = task + cfg.beta * kl
        if cfg.adv_weight > 0:
            # confusion: cross-entropy of the adversary's prediction to the uniform distribution
            confusion = -F.log_softmax(adversary(out.z), dim=-1).mean(-1).mean()
            loss = loss + cfg.adv_weight * confusion
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            history.append({"step": step, "task": task.item(), "kl": kl.item(), "adversary": adv_loss.item()})
    return TrainedMapping(mapping.eval(), head.eval(), cfg, history)


def train_raw_head(
    features: torch.Tensor, behaviour: torch.Tensor, n_behaviours: int, cfg: MappingConfig, quiet: bool = True
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The non-private baseline: the same head architecture on standardised raw features, same budget."""
    torch.manual_seed(cfg.seed)
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    head = _mlp(features.shape[1], n_behaviours, cfg.hidden)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in _bar(range(cfg.steps), "raw baseline", quiet):
        idx = torch.randint(0, features.shape[0], (min(cfg.batch_size, features.shape[0]),), generator=g)
        loss = F.cross_entropy(head((features[idx] - mean) / std), behaviour[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()

    @torch.no_grad()
    def predict(x: torch.Tensor) -> torch.Tensor:
        return head((x - mean) / std).argmax(-1)

    return predict


# ------------------------------------------------------------------------------------------------ attacks
@dataclass
class AttackConfig:
    """Attackers' budgets. `draws` independent releases of every training clip are given to the
    re-identification attacker (stronger than one); training stops at convergence: when validation
    accuracy (a held-out fifth of the training clips) has not improved for `patience` evaluations."""

    mlp_hidden: int = 256
    max_epochs: int = 400
    patience: int = 20
    eval_every: int = 5
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 128
    draws: int = 4
    decoder_epochs: int = 30
    decoder_width: int = 64
    decoder_lr: float = 2e-3
    seed: int = 0


def _release_draws(release: ReleaseFn, x: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return torch.stack([release(x, g).float() for _ in range(draws)])  # [draws, N, k]


def fit_classifier(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    kind: str,
    cfg: AttackConfig,
    groups: torch.Tensor | None = None,
    quiet: bool = True,
) -> tuple[nn.Module, dict]:
    """Trains a fresh classifier (`kind` "mlp" or "linear") on standardised x to convergence, keeping
    the weights with the best accuracy on a held-out fifth of the groups (clips); returns the model
    (standardisation folded in) and training info."""
    if kind not in ("mlp", "linear"):
        raise ValueError(f"unknown attacker kind {kind!r} (mlp or linear)")
    torch.manual_seed(cfg.seed)
    groups = torch.arange(len(y)) if groups is None else groups
    g = torch.Generator().manual_seed(cfg.seed)
    uniq = torch.unique(groups)
    val_groups = uniq[torch.randperm(len(uniq), generator=g)[: max(1, len(uniq) // 5)]]
    is_val = torch.isin(groups, val_groups)
    xt, yt, xv, yv = x[~is_val], y[~is_val], x[is_val], y[is_val]
    mean, std = xt.mean(0), xt.std(0).clamp_min(1e-6)
    d = x.shape[1]
    core = nn.Linear(d, n_classes) if kind == "linear" else _mlp(d, n_classes, cfg.mlp_hidden)
    opt = torch.optim.Adam(core.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state, since, epoch = -1.0, copy.deepcopy(core.state_dict()), 0, 0
    for epoch in _bar(range(cfg.max_epochs), f"{kind} attacker", quiet):
        core.train()
        perm = torch.randperm(len(yt), generator=g)
        for i in range(0, len(yt), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            loss = F.cross_entropy(core((xt[idx] - mean) / std), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % cfg.eval_every == 0:
            core.eval()
            with torch.no_grad():
                acc = float((core((xv - mean) / std).argmax(-1) == yv).float().mean())
            if acc > best:
                best, best_state, since = acc, copy.deepcopy(core.state_dict()), 0
            else:
                since += 1
                if since >= cfg.patience:
                    break
    core.load_state_dict(best_state)
    core.eval()
    model = _Standardised(core, mean, std)
    with torch.no_grad():
        train_acc = float((model(xt).argmax(-1) == yt).float().mean())
    return model, {"epochs": epoch + 1, "val_accuracy": best, "train_accuracy": train_acc}


class _Standardised(nn.Module):
    def __init__(self, core: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.core = core
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core((x - self.mean) / self.std)


def reid_attack(
    release: ReleaseFn,
    train_features: torch.Tensor,
    train_identity: torch.Tensor,
    test_features: torch.Tensor,
    test_identity: torch.Tensor,
    n_identities: int,
    kind: str,
    cfg: AttackConfig,
    quiet: bool = True,
) -> dict:
    """Re-identification: a fresh `kind` attacker on released training features (cfg.draws releases
    each) with identity labels, tested on one release of the held-out clips."""
    z_train = _release_draws(release, train_features, cfg.draws, cfg.seed + 1)
    draws, n, k = z_train.shape
    groups = torch.arange(n).repeat(draws)
    model, info = fit_classifier(
        z_train.reshape(-1, k),
        train_identity.repeat(draws),
        n_identities,
        kind,
        cfg,
        groups=groups,
        quiet=quiet,
    )
    z_test = _release_draws(release, test_features, 1, cfg.seed + 2)[0]
    with torch.no_grad():
        acc = float((model(z_test).argmax(-1) == test_identity).float().mean())
    return {"accuracy": acc, "chance": chance_accuracy(test_identity), **info}


class FrameDecoder(nn.Module):
    """Released features [N, k] -> frames [N, T*3, S, S] in [0, 1] (transposed convolutions from S/8)."""

    def __init__(self, k: int, channels: int, size: int, width: int = 64) -> None:
        super().__init__()
        if size % 8:
            raise ValueError(f"frame size {size} must be a multiple of 8")
        self.start, self.width = size // 8, width
        self.fc = nn.Linear(k, width * self.start * self.start)
        self.net = nn.Sequential(
            nn.GELU(),
            nn.ConvTranspose2d(width, width, 4, 2, 1),
            nn.GELU(),
            nn.ConvTranspose2d(width, width // 2, 4, 2, 1),
            nn.GELU(),
            nn.ConvTranspose2d(width // 2, channels, 4, 2, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, self.width, self.start, self.start)
        return torch.sigmoid(self.net(h))


class FrameIdentifier(nn.Module):
    """The inversion audit's identity classifier: a small CNN on a clip's frames [N, T*3, S, S]
    (batch-normalised convolutions, global max and mean pooling: identity is mostly colours and
    small glyphs, wherever the person stands)."""

    def __init__(self, channels: int, n_identities: int) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.GELU()]

        self.net = nn.Sequential(
            *block(channels, 32, 2), *block(32, 64, 1), nn.MaxPool2d(2), *block(64, 64, 1)
        )
        self.fc = nn.Linear(128, n_identities)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        h = self.net(frames * 2 - 1)
        return self.fc(torch.cat([h.amax((2, 3)), h.mean((2, 3))], 1))


def clip_tensor(frames) -> torch.Tensor:
    """uint8 frames [N, T, H, W, 3] (numpy or torch) -> float [N, T*3, H, W] in [0, 1]."""
    t = torch.as_tensor(frames)
    n, nt, h, w, c = t.shape
    return t.permute(0, 1, 4, 2, 3).reshape(n, nt * c, h, w).float() / 255.0


def train_frame_identifier(
    frames: torch.Tensor,
    identity: torch.Tensor,
    n_identities: int,
    epochs: int = 15,
    seed: int = 0,
    quiet: bool = True,
) -> FrameIdentifier:
    """A raw-frame identity classifier trained on the training clips' pixels (Adam, one-cycle schedule)."""
    torch.manual_seed(seed)
    model = FrameIdentifier(frames.shape[1], n_identities)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches = math.ceil(len(identity) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * batches)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in _bar(range(epochs), "raw-frame identifier", quiet):
        perm = torch.randperm(len(identity), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(frames[idx]), identity[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    pred = torch.cat([model(x[i : i + batch]).argmax(-1) for i in range(0, len(x), batch)])
    return float((pred == y).float().mean())


def inversion_attack(
    release: ReleaseFn,
    train_features: torch.Tensor,
    train_frames: torch.Tensor,
    test_features: torch.Tensor,
    test_frames: torch.Tensor,
    test_identity: torch.Tensor,
    identifier: nn.Module,
    cfg: AttackConfig,
    quiet: bool = True,
) -> dict:
    """White-box inversion: the decoder trains on (fresh release of the training features, frames)
    pairs, a new noise draw every epoch (it may call the mapping at will); evaluated on held-out
    clips: PSNR/SSIM vs the raw frames and the raw-frame identifier's accuracy on the rebuilt frames."""
    torch.manual_seed(cfg.seed)
    k = _release_draws(release, train_features[:1], 1, 0).shape[-1]
    decoder = FrameDecoder(k, train_frames.shape[1], train_frames.shape[-1], cfg.decoder_width)
    opt = torch.optim.Adam(decoder.parameters(), lr=cfg.decoder_lr)
    g = torch.Generator().manual_seed(cfg.seed + 3)
    n = len(train_frames)
    for epoch in _bar(range(cfg.decoder_epochs), "inversion decoder", quiet):
        z = _release_draws(release, train_features, 1, cfg.seed + 100 + epoch)[0]
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, 64):
            idx = perm[i : i + 64]
            loss = F.mse_loss(decoder(z[idx]), train_frames[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    decoder.eval()
    with torch.no_grad():
        z_test = _release_draws(release, test_features, 1, cfg.seed + 2)[0]
        rebuilt = torch.cat([decoder(z_test[i : i + 256]) for i in range(0, len(z_test), 256)])
        ssim_v = ssim(rebuilt, test_frames).mean()
    return {
        "psnr": float(psnr(rebuilt, test_frames).mean()),
        "ssim": float(ssim_v),
        "reid_accuracy": accuracy(identifier, rebuilt, test_identity),
        "rebuilt": rebuilt,
    }


# ------------------------------------------------------------------------------------------------- audit
@dataclass
class AuditData:
    """Edge features, frames (float [N, T*3, S, S]) and labels of both splits."""

    train_features: torch.Tensor
    train_frames: torch.Tensor
    train_behaviour: torch.Tensor
    train_identity: torch.Tensor
    test_features: torch.Tensor
    test_frames: torch.Tensor
    test_behaviour: torch.Tensor
    test_identity: torch.Tensor
    n_behaviours: int
    n_identities: int


def audit(
    release: ReleaseFn,
    data: AuditData,
    identifier: nn.Module,
    cfg: AttackConfig,
    kinds: Sequence[str] = ("mlp", "linear"),
    inversion: bool = True,
    quiet: bool = True,
) -> dict:
    """All attacks on one release function: re-identification per attacker kind and inversion."""
    out: dict = {}
    for kind in kinds:
        r = reid_attack(
            release,
            data.train_features,
            data.train_identity,
            data.test_features,
            data.test_identity,
            data.n_identities,
            kind,
            cfg,
            quiet=quiet,
        )
        out[f"reid_accuracy_{kind}"] = r["accuracy"]
        out[f"reid_{kind}_epochs"] = r["epochs"]
        out[f"reid_{kind}_train_accuracy"] = r["train_accuracy"]
        out["reid_chance"] = r["chance"]
    out["reid_accuracy"] = max(out[f"reid_accuracy_{k}"] for k in kinds)
    if inversion:
        inv = inversion_attack(
            release,
            data.train_features,
            data.train_frames,
            data.test_features,
            data.test_frames,
            data.test_identity,
            identifier,
            cfg,
            quiet=quiet,
        )
        out.update(
            inversion_psnr=inv["psnr"],
            inversion_ssim=inv["ssim"],
            inversion_reid_accuracy=inv["reid_accuracy"],
        )
        out["_rebuilt"] = inv["rebuilt"]
    return out


def beta_sweep(
    data: AuditData,
    betas: Sequence[float],
    base: MappingConfig,
    attack: AttackConfig,
    identifier: nn.Module,
    raw_f1: float,
    inversion: bool = True,
    quiet: bool = True,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Per beta: train the mapping (base config otherwise), then behaviour F1 and every attack."""
    import time

    rows = []
    for beta in betas:
        t0 = time.time()
        cfg = MappingConfig(**{**asdict(base), "beta": float(beta)})
        trained = train_mapping(
            data.train_features,
            data.train_behaviour,
            data.train_identity,
            data.n_behaviours,
            data.n_identities,
            cfg,
            quiet=quiet,
        )
        row = {
            "beta": float(beta),
            "adv_weight": cfg.adv_weight,
            "out_dim": cfg.out_dim,
            "behaviour_f1": trained.behaviour_f1(data.test_features, data.test_behaviour, data.n_behaviours),
            "behaviour_f1_raw": raw_f1,
        }
        row.update(audit(trained.release_fn(), data, identifier, attack, inversion=inversion, quiet=quiet))
        row["_trained"] = trained
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def meets_targets(row: dict, f1_ratio: float = 0.9, margin: float = 0.05) -> dict:
    """The privacy targets on one row: F1 >= ratio x raw, re-id and reconstruction re-id <= chance+margin."""
    checks = {
        "utility": row["behaviour_f1"] >= f1_ratio * row["behaviour_f1_raw"],
        "reid": row["reid_accuracy"] <= row["reid_chance"] + margin,
    }
    if "inversion_reid_accuracy" in row:
        checks["inversion"] = row["inversion_reid_accuracy"] <= row["reid_chance"] + margin
    checks["all"] = all(checks.values())
    return checks


# ------------------------------------------------------------------------------ the edge tower, QA
def train_tower(
    encoder,
    pixel_values: torch.Tensor,
    grid: torch.Tensor,
    behaviour: torch.Tensor,
    n_behaviours: int,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    quiet: bool = True,
) -> list[float]:
    """Trains the tower (and a linear head on its edge features, then dropped) on the clips' behaviour
    labels: a tower that has learned the task, not a random one. Returns the loss every 10 steps."""
    torch.manual_seed(seed)
    with torch.no_grad():
        dim = encoder.features_from_pixels(pixel_values[:1], grid).shape[1]
    head = nn.Linear(dim, n_behaviours)
    opt = torch.optim.AdamW([*encoder.tower.parameters(), *head.parameters()], lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    encoder.tower.train()
    losses = []
    for step in _bar(range(steps), "vision tower", quiet):
        idx = torch.randint(0, len(behaviour), (min(batch_size, len(behaviour)),), generator=g)
        loss = F.cross_entropy(head(encoder.features_from_pixels(pixel_values[idx], grid)), behaviour[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            losses.append(round(loss.item(), 4))
    encoder.tower.eval()
    return losses


def qa_accuracy(pred_behaviour: torch.Tensor, questions: Sequence[Sequence[tuple[str, str]]]) -> float:
    """Share of the clips' questions answered exactly from the predicted behaviours."""
    from tasks.data.camgen import BEHAVIOURS, answers_for

    right = total = 0
    for b, qa in zip(pred_behaviour.tolist(), questions, strict=True):
        answers = dict(answers_for(BEHAVIOURS[b]))
        for q, a in qa:
            right += answers.get(q) == a
            total += 1
    return right / max(total, 1)


# ----------------------------------------------------------------------------------------- the cloud member
@dataclass
class CloudConfig:
    """Training of the cloud's deep member (`ruyi_model.camera.CloudMember`): `steps` AdamW steps of
    `batch_size` clips x every question of each clip, teacher-forced cross-entropy on the answers;
    projector and member train together (the cloud's copy; the family is left unchanged)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    max_new_tokens: int = 4
    seed: int = 0


def train_cloud_member(
    cloud,
    release: ReleaseFn,
    features: torch.Tensor,
    questions: Sequence[Sequence[tuple[str, str]]],
    cfg: CloudConfig,
    quiet: bool = True,
) -> list[float]:
    """Trains `cloud` (a CloudMember whose standardiser is already fitted) to answer the clips'
    `questions` from `release(features)`: a fresh release draw per batch, as the edge sends them.
    Returns the loss per step."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW([p for p in cloud.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    losses = []
    cloud.train()
    for _ in _bar(range(cfg.steps), "cloud member", quiet):
        idx = torch.randint(0, features.shape[0], (min(cfg.batch_size, features.shape[0]),), generator=g)
        with torch.no_grad():
            z = release(features[idx], g)
        rows = [(i, q, a) for i, clip in enumerate(idx.tolist()) for q, a in questions[clip]]
        ids, mask, labels = cloud.encode([q for _, q, _ in rows], [a for _, _, a in rows])
        logits = cloud(z[[i for i, _, _ in rows]], ids, mask)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    cloud.eval()
    return losses


@torch.no_grad()
def cloud_qa(
    cloud, z: torch.Tensor, questions: Sequence[Sequence[tuple[str, str]]], max_new_tokens: int = 4
) -> dict:
    """The cloud member's greedy answers to every clip's questions from its released `z`: exact-match
    accuracy overall and per question, and the first answers (for the report)."""
    rows = [(i, q, a) for i, clip in enumerate(questions) for q, a in clip]
    got: list[str] = []
    for s in range(0, len(rows), 256):
        chunk = rows[s : s + 256]
        got += cloud.answer(z[[i for i, _, _ in chunk]], [q for _, q, _ in chunk], max_new_tokens)
    per_q: dict[str, list[bool]] = {}
    for (_, q, a), g in zip(rows, got, strict=True):
        per_q.setdefault(q, []).append(g == a)
    right = sum(sum(v) for v in per_q.values())
    return {
        "accuracy": right / max(len(rows), 1),
        "by_question": {q: sum(v) / len(v) for q, v in per_q.items()},
        "examples": [[q, a, g] for (_, q, a), g in list(zip(rows, got, strict=True))[:6]],
    }
