"""The privacy stage's body: the camera's de-identifying mapping trained, audited by attacks, gated.

Library module: `run_privacy(params)` is what `python -m tasks.privacy` runs (params.yaml: the tiny tower
built here, or `privacy.family_dir`), and the vision-language profile's privacy stage
(`tasks.training.vl_pipeline`, params.vl.yaml: the profile's trained family's vision tower) runs it too.
The steps are documented by the stage (tasks/privacy.py); the mapping and the attacks are
`tasks.training.privacy`'s. `gate_failures` / `check_gate`: the privacy gate. Why: docs/choices.md#privacy.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import asdict

import torch

from ruyi_model.camera import EdgeEncoder, build_tiny_tower, save_camera_artifact
from tasks.core.files import LOAD_ERRORS, atomic_dir, pyplot, require_dir, save_figure, write_metrics
from tasks.core.params import Params, PrivacyParams
from tasks.core.paths import Workspace
from tasks.core.stage import ContractViolation, StageError, seed_everything
from tasks.data.camgen import BEHAVIOURS, make_splits
from tasks.training.privacy import (
    AttackConfig,
    AuditData,
    CloudConfig,
    MappingConfig,
    TrainedMapping,
    accuracy,
    audit,
    clip_tensor,
    cloud_qa,
    macro_f1,
    qa_accuracy,
    train_cloud_member,
    train_frame_identifier,
    train_mapping,
    train_raw_head,
    train_tower,
)

log = logging.getLogger("ruyi.privacy")

#: The keys of metrics/privacy.json the gate reads (besides `reid_chance`).
GATED = ("behaviour_f1", "reid_accuracy", "inversion_reid_accuracy")


def gate_failures(
    metrics: dict, min_f1_ratio: float, reid_margin: float, min_qa_ratio: float = 0.9
) -> list[dict]:
    """The privacy gate's failed checks on `metrics` (empty when every target is met); the cloud
    member's QA check applies when the metrics have one (`qa_accuracy_member`)."""
    failures = []
    bar = min_f1_ratio * metrics["behaviour_f1_raw"]
    if metrics["behaviour_f1"] < bar:
        failures.append(
            {
                "check": "utility",
                "description": f"behaviour F1 {metrics['behaviour_f1']:.3f} < {min_f1_ratio:g} x raw-feature "
                f"F1 {metrics['behaviour_f1_raw']:.3f} = {bar:.3f}",
            }
        )
    if "qa_accuracy_member" in metrics:
        qa_bar = min_qa_ratio * metrics["qa_accuracy_member_raw"]
        if metrics["qa_accuracy_member"] < qa_bar:
            failures.append(
                {
                    "check": "utility_qa",
                    "description": f"cloud member QA accuracy {metrics['qa_accuracy_member']:.3f} < "
                    f"{min_qa_ratio:g} x its accuracy on raw features "
                    f"{metrics['qa_accuracy_member_raw']:.3f} = {qa_bar:.3f}",
                }
            )
    limit = metrics["reid_chance"] + reid_margin
    for key, what in (
        ("reid_accuracy", "re-identification from released features (best attacker)"),
        ("inversion_reid_accuracy", "identity accuracy on white-box reconstructions"),
    ):
        if metrics[key] > limit + 1e-6:  # an accuracy equal to the limit passes (float32 noise aside)
            failures.append(
                {
                    "check": key,
                    "description": f"{what} {metrics[key]:.3f} > chance {metrics['reid_chance']:.3f} "
                    f"+ {reid_margin:g} = {limit:.3f}",
                }
            )
    return failures


def check_gate(metrics: dict, min_f1_ratio: float, reid_margin: float, min_qa_ratio: float = 0.9) -> None:
    """Raises ContractViolation naming every failed check of the privacy gate."""
    failures = gate_failures(metrics, min_f1_ratio, reid_margin, min_qa_ratio)
    if failures:
        raise ContractViolation(
            "privacy gate failed (nothing published): " + "; ".join(f["description"] for f in failures),
            failures,
        )


def edge_encoder(pp: PrivacyParams, seed: int) -> tuple[EdgeEncoder, str]:
    """The edge encoder and a description of its tower (loaded from the family, or built here)."""
    if pp.family_dir is None:
        return EdgeEncoder(build_tiny_tower(seed), pp.frames, pp.size), "tiny Qwen3-VL tower trained here"
    from ruyi_model.vl import FamilialVLForConditionalGeneration

    path = require_dir(pp.family_dir, "privacy.family_dir (a vision-language family)", "config.json")
    try:
        family = FamilialVLForConditionalGeneration.from_pretrained(path)
    except LOAD_ERRORS as e:
        raise StageError(
            f"privacy.family_dir={path}: not a vision-language family checkpoint ({e})"
        ) from None
    tower = family.model.visual.eval()
    for p in tower.parameters():
        p.requires_grad_(False)
    return EdgeEncoder(tower, pp.frames, pp.size), f"vision tower of {path} (frozen)"


def _row(trained: TrainedMapping, data: AuditData, questions, identifier, attack: AttackConfig) -> dict:
    z = trained.release_fn()(data.test_features, torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = trained.head(z).argmax(-1)
    row = {
        "beta": trained.config.beta,
        "adv_weight": trained.config.adv_weight,
        "behaviour_f1": macro_f1(pred, data.test_behaviour, data.n_behaviours),
        "qa_accuracy": qa_accuracy(pred, questions),
    }
    row.update(
        {k: v for k, v in audit(trained.release_fn(), data, identifier, attack).items() if k[0] != "_"}
    )
    return row


def cloud_tokenizer_dir(pp: PrivacyParams, params: Params):
    """Where the cloud member's tokenizer is: `family_dir` if it holds one, else `<artifacts_dir>/tokenizer`
    (the vision-language profile's tokenizer stage)."""
    from pathlib import Path

    family = Path(pp.family_dir)
    if (family / "tokenizer.json").is_file():
        return family
    return require_dir(
        Workspace.from_params(params).artifacts("tokenizer"),
        "the cloud member's tokenizer (privacy.cloud_member: true; family_dir holds none)",
        "tokenizer.json",
    )


def cloud_member(
    pp: PrivacyParams, params: Params, seed: int, trained: TrainedMapping, feats_train, feats_test, data
):
    """The cloud's deep member (`ruyi_model.camera.CloudMember`, the family's deepest member) trained to
    answer the clips' questions from the gated mapping's releases, and the same member trained on raw
    edge features (the non-private reference). Returns the private one and its metrics."""
    from transformers import AutoTokenizer

    from ruyi_model.camera import CloudMember
    from ruyi_model.vl import FamilialVLForConditionalGeneration

    if pp.family_dir is None:
        raise StageError(
            "privacy.cloud_member: true needs privacy.family_dir (a vision-language family whose deepest "
            "member becomes the cloud); set family_dir or cloud_member: false"
        )
    family = FamilialVLForConditionalGeneration.from_pretrained(pp.family_dir)
    exit_layer = max(family.config.exit_layers)
    tokenizer = AutoTokenizer.from_pretrained(cloud_tokenizer_dir(pp, params))
    cfg = CloudConfig(steps=pp.cloud_steps, batch_size=pp.cloud_batch, lr=pp.cloud_lr, seed=seed)
    q_train = [c.questions for c in data.train.clips]
    q_test = [c.questions for c in data.test.clips]
    out, members = {}, {}
    for name, release in (("private", trained.release_fn()), ("raw", lambda x, g: x)):
        member = CloudMember.from_family(
            family,
            exit_layer,
            tokenizer,
            pp.out_dim if name == "private" else feats_train.shape[1],
            pp.cloud_tokens,
        )
        with torch.no_grad():
            member.fit_standardiser(release(feats_train, torch.Generator().manual_seed(seed + 1)))
        losses = train_cloud_member(member, release, feats_train, q_train, cfg)
        z = release(feats_test, torch.Generator().manual_seed(0))
        out[name] = {
            **cloud_qa(member, z, q_test, cfg.max_new_tokens),
            "loss_first": losses[0],
            "loss_last": losses[-1],
        }
        members[name] = member
        log.info(
            "cloud member (exit %d) on %s features: QA accuracy %.3f", exit_layer, name, out[name]["accuracy"]
        )
    # the best constant answer per question (what a member that ignores the features can reach)
    majority = [
        Counter(a for clip in q_test for q2, a in clip if q2 == q).most_common(1)[0][1] for q, _ in q_test[0]
    ]
    description = f"deepest member exit_{exit_layer} of {pp.family_dir} reading {pp.cloud_tokens} soft tokens"
    return members["private"], {
        "qa_accuracy_member": out["private"]["accuracy"],
        "qa_accuracy_member_raw": out["raw"]["accuracy"],
        "qa_chance_member": sum(majority) / (len(q_test) * len(q_test[0])),
        "cloud_member": {
            "description": description,
            "exit_layer": exit_layer,
            "soft_tokens": pp.cloud_tokens,
            "steps": pp.cloud_steps,
            "parameters": sum(p.numel() for p in members["private"].parameters()),
            "private": out["private"],
            "raw": out["raw"],
        },
    }


def plot_curve(rows: list[dict], metrics: dict, path) -> None:
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    rows = sorted(rows, key=lambda r: r["beta"])
    xs = [max(r["beta"], 1e-4) for r in rows]
    chance = metrics["reid_chance"]
    ax1.plot(xs, [r["behaviour_f1"] for r in rows], "o-", label="behaviour F1 (private)")
    ax1.plot(xs, [r["qa_accuracy"] for r in rows], "d-", label="QA accuracy (private)")
    ax1.axhline(metrics["behaviour_f1_raw"], color="k", ls="--", label="behaviour F1 (raw features)")
    ratio, margin = metrics["gate"]["min_f1_ratio"], metrics["gate"]["reid_margin"]
    ax1.axhline(ratio * metrics["behaviour_f1_raw"], color="k", ls=":", label=f"{ratio:g} x raw")
    ax1.plot(xs, [r["reid_accuracy"] for r in rows], "s-", label="re-id (best of MLP, linear)")
    ax1.plot(xs, [r["inversion_reid_accuracy"] for r in rows], "^-", label="re-id on reconstructions")
    ax1.axhline(chance + margin, color="r", ls=":", label=f"chance + {margin:g}")
    ax1.set_xscale("log")
    ax1.set_xlabel("beta (KL weight; 0 drawn at 1e-4)")
    ax1.set_ylim(0, 1.02)
    ax1.legend(fontsize=7)
    ax1.set_title(f"privacy-utility vs beta (adversary {metrics['adv_weight']:g})")
    ax2.plot([r["reid_accuracy"] for r in rows], [r["behaviour_f1"] for r in rows], "o-")
    for r in rows:
        ax2.annotate(f"{r['beta']:g}", (r["reid_accuracy"], r["behaviour_f1"]), fontsize=7)
    ax2.plot([metrics["reid_accuracy_raw_features"]], [metrics["behaviour_f1_raw"]], "k*", ms=10, label="raw")
    ax2.plot([metrics["reid_accuracy"]], [metrics["behaviour_f1"]], "go", ms=9, mfc="none", label="gated")
    if "no_privacy" in metrics:
        ref = metrics["no_privacy"]
        ax2.plot([ref["reid_accuracy"]], [ref["behaviour_f1"]], "rx", ms=9, label="beta=0, no adversary")
    ax2.axvline(chance + margin, color="r", ls=":")
    ax2.set_xlabel("re-identification accuracy")
    ax2.set_ylabel("behaviour F1")
    ax2.legend(fontsize=7)
    ax2.set_title("utility vs leakage")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def run_privacy(params: Params) -> dict:
    """The privacy stage (tasks/privacy.py documents its steps): clips, edge features, the mapping, the
    audit, the gate; publishes `<artifacts_dir>/privacy` only when the gate passes (else raises
    ContractViolation after writing the metrics)."""
    pp = params.privacy
    ws = Workspace.from_params(params)
    seed = params.seed
    seed_everything(seed)
    t0 = time.perf_counter()
    data = make_splits(
        pp.train_clips, pp.test_clips, n_identities=pp.identities, n_frames=pp.frames, size=pp.size, seed=seed
    )
    log.info(
        "camera clips: %d train / %d held-out, %d identities", len(data.train), len(data.test), pp.identities
    )
    encoder, tower_desc = edge_encoder(pp, seed)
    train_b = torch.as_tensor(data.train.behaviour)
    tower_losses: list[float] = []
    if pp.family_dir is None and pp.tower_steps:
        pv, grid = encoder.pixels(data.train.frames)
        tower_losses = train_tower(
            encoder, pv, grid, train_b, len(BEHAVIOURS), pp.tower_steps, pp.tower_lr, seed=seed
        )
        log.info(
            "tower trained %d steps on behaviour labels: loss %.3f -> %.3f",
            pp.tower_steps,
            tower_losses[0],
            tower_losses[-1],
        )
    feats_train, feats_test = encoder(data.train.frames), encoder(data.test.frames)
    log.info(
        "edge features: %d per clip (%d deepstack features mapped with the merged tokens)",
        feats_train.shape[1],
        encoder.n_deepstack,
    )
    audit_data = AuditData(
        feats_train,
        clip_tensor(data.train.frames),
        train_b,
        torch.as_tensor(data.train.identity),
        feats_test,
        clip_tensor(data.test.frames),
        torch.as_tensor(data.test.behaviour),
        torch.as_tensor(data.test.identity),
        len(BEHAVIOURS),
        pp.identities,
    )
    questions = [c.questions for c in data.test.clips]
    base = MappingConfig(
        out_dim=pp.out_dim,
        hidden=pp.hidden,
        beta=pp.beta,
        adv_weight=pp.adv_weight,
        steps=pp.steps,
        seed=seed,
    )
    attack = AttackConfig(
        max_epochs=pp.attack_max_epochs,
        patience=pp.attack_patience,
        draws=pp.attack_draws,
        decoder_epochs=pp.decoder_epochs,
        seed=seed,
    )
    # the non-private reference: the same head on raw edge features; attackers on raw features
    raw_predict = train_raw_head(feats_train, train_b, len(BEHAVIOURS), base)
    raw_pred = raw_predict(feats_test)
    identifier = train_frame_identifier(
        audit_data.train_frames, audit_data.train_identity, pp.identities, pp.identifier_epochs, seed
    )
    raw = audit(lambda x, g: x, audit_data, identifier, attack, inversion=False)
    metrics: dict = {
        "behaviour_f1_raw": macro_f1(raw_pred, audit_data.test_behaviour, len(BEHAVIOURS)),
        "qa_accuracy_raw": qa_accuracy(raw_pred, questions),
        "reid_accuracy_raw_features": raw["reid_accuracy"],
        "raw_frame_identifier_accuracy": accuracy(
            identifier, audit_data.test_frames, audit_data.test_identity
        ),
    }
    log.info(
        "raw features: F1 %.3f, re-id %.3f (chance %.3f)",
        metrics["behaviour_f1_raw"],
        raw["reid_accuracy"],
        raw["reid_chance"],
    )
    # the gated mapping, then the sweep (reusing the gated row at its beta)
    trained = train_mapping(
        feats_train, train_b, audit_data.train_identity, len(BEHAVIOURS), pp.identities, base
    )
    gated = _row(trained, audit_data, questions, identifier, attack)
    metrics = {**gated, **metrics, "reid_chance": gated["reid_chance"]}
    rows = []
    for beta in pp.betas:
        if beta == pp.beta:
            rows.append(gated)
            continue
        cfg = MappingConfig(**{**asdict(base), "beta": float(beta)})
        t = train_mapping(
            feats_train, train_b, audit_data.train_identity, len(BEHAVIOURS), pp.identities, cfg
        )
        rows.append(_row(t, audit_data, questions, identifier, attack))
        log.info(
            "sweep beta=%g: F1 %.3f re-id %.3f inversion re-id %.3f",
            beta,
            rows[-1]["behaviour_f1"],
            rows[-1]["reid_accuracy"],
            rows[-1]["inversion_reid_accuracy"],
        )
    if pp.audit_reference:
        cfg = MappingConfig(**{**asdict(base), "beta": 0.0, "adv_weight": 0.0})
        t = train_mapping(
            feats_train, train_b, audit_data.train_identity, len(BEHAVIOURS), pp.identities, cfg
        )
        ref = _row(t, audit_data, questions, identifier, attack)
        metrics["no_privacy"] = {
            **ref,
            "targets_met": not gate_failures({**metrics, **ref}, pp.min_f1_ratio, pp.reid_margin),
        }
        log.info(
            "no-privacy reference (beta=0, no adversary): F1 %.3f re-id %.3f",
            ref["behaviour_f1"],
            ref["reid_accuracy"],
        )
    cloud = None
    if pp.cloud_member:
        cloud, member_metrics = cloud_member(pp, params, seed, trained, feats_train, feats_test, data)
        metrics.update(member_metrics)
    failures = gate_failures(metrics, pp.min_f1_ratio, pp.reid_margin, pp.min_qa_ratio)
    metrics.update(
        passed=not failures,
        failures=failures,
        gate={
            "min_f1_ratio": pp.min_f1_ratio,
            "reid_margin": pp.reid_margin,
            "min_qa_ratio": pp.min_qa_ratio,
        },
        tower=tower_desc,
        tower_loss=tower_losses[-1] if tower_losses else None,
        edge_feature_dim=feats_train.shape[1],
        deepstack_features=encoder.n_deepstack,
        released_dim=pp.out_dim,
        n_train_clips=len(data.train),
        n_test_clips=len(data.test),
        n_identities=pp.identities,
        sweep=rows,
        wall_s=round(time.perf_counter() - t0, 1),
    )
    # without a sweep (`betas: []`) the figure shows the gated mapping alone
    plot_curve(rows or [gated], metrics, ws.plots("privacy") / "privacy_utility.png")
    out = ws.artifacts("privacy")
    if failures:
        if out.exists():
            shutil.rmtree(out)
            log.warning("removed the earlier camera release %s: this mapping failed the gate", out)
        write_metrics(params, "privacy", metrics)
        check_gate(metrics, pp.min_f1_ratio, pp.reid_margin, pp.min_qa_ratio)
    summary = {
        k: metrics[k]
        for k in (
            "beta",
            "adv_weight",
            "behaviour_f1",
            "behaviour_f1_raw",
            "reid_accuracy",
            "reid_chance",
            "inversion_reid_accuracy",
        )
    }
    with atomic_dir(out) as tmp:
        save_camera_artifact(
            tmp,
            encoder,
            trained.mapping,
            trained.head,
            pp.hidden,
            BEHAVIOURS,
            {
                **summary,
                "tower": tower_desc,
                "cloud": metrics.get("cloud_member", {}).get("description", "behaviour head"),
                "cloud_exit_layer": metrics.get("cloud_member", {}).get("exit_layer"),
            },
            cloud_member=cloud,
        )
    write_metrics(params, "privacy", metrics)
    log.info(
        "privacy gate passed: F1 %.3f (raw %.3f), re-id %.3f, reconstruction re-id %.3f (chance %.3f) -> %s",
        metrics["behaviour_f1"],
        metrics["behaviour_f1_raw"],
        metrics["reid_accuracy"],
        metrics["inversion_reid_accuracy"],
        metrics["reid_chance"],
        out,
    )
    return metrics
