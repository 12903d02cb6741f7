"""Privacy-utility trade-off of the edge mapping, judged by attacks (Ruyi2.5-Camera stand-in).

    python benchmarks/experiments/privacy_tradeoff.py [--betas 0.001,0.01,0.1] [--adv-weight 1.0]
        [--train 840] [--test 336] [--identities 24] [--frames 3] [--size 64] [--steps 600]
        [--out benchmarks/experiments/privacy_tradeoff.png] [--threads 1] [--no-inversion]

Renders clips (tasks/data/camgen.py), encodes every frame with a tiny stock Qwen3-VL vision tower built
offline (`Qwen3VLVisionModel`, random init, seeded: no trained tower exists yet) through the stock
image processor, flattens each clip's merged tokens into one edge feature vector, then for each beta
trains the mapping (task CE + beta*KL + identity adversary) and runs the attacks: behaviour F1 private
vs raw, re-identification by an MLP and a linear probe vs chance, white-box inversion (PSNR/SSIM and
the re-identification of rebuilt frames by a raw-frame classifier). A first row trains the same
mapping with beta = 0 and no adversary (the no-privacy reference). Prints a table and whether the
targets (F1 >= 0.9 x raw, re-identification and reconstruction re-identification <= chance + 5
points) are met; writes the rows as JSON beside `--out` and the privacy-utility curve to `--out`
(PNG). Progress bars unless `--quiet`. Method and figures: docs/choices.md#privacy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from tasks.data.camgen import BEHAVIOURS, FRAME_MULTIPLE, make_splits  # noqa: E402
from tasks.training.privacy import (  # noqa: E402
    AttackConfig,
    AuditData,
    MappingConfig,
    accuracy,
    audit,
    beta_sweep,
    clip_tensor,
    macro_f1,
    meets_targets,
    train_frame_identifier,
    train_raw_head,
)


def vision_tower(seed: int):
    """The tiny Qwen3-VL vision tower (patch 8, merge 2, temporal 2, 3 blocks, 64 wide), random init."""
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    cfg = Qwen3VLVisionConfig(
        depth=3,
        hidden_size=64,
        num_heads=4,
        intermediate_size=128,
        patch_size=8,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=64,
        deepstack_visual_indexes=[0, 1, 2],
        num_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return Qwen3VLVisionModel(cfg).eval()


def tower_features(frames, seed: int, size: int, quiet: bool) -> torch.Tensor:
    """Edge features per clip: the merger output tokens of every frame, flattened: [N, T*tokens*64]."""
    from PIL import Image
    from tqdm.auto import tqdm
    from transformers import Qwen2VLImageProcessorPil

    tower = vision_tower(seed)
    proc = Qwen2VLImageProcessorPil(
        patch_size=8,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={"shortest_edge": 16 * 16, "longest_edge": size * size},
    )
    n, t = frames.shape[:2]
    out = []
    for i in tqdm(range(0, n, 64), desc="vision tower", leave=False, disable=quiet, mininterval=1.0):
        chunk = frames[i : i + 64]
        images = [Image.fromarray(f) for clip in chunk for f in clip]
        batch = proc(images=images, return_tensors="pt")
        with torch.no_grad():
            pooled = tower(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
        out.append(pooled.reshape(len(chunk), -1))
    return torch.cat(out)


def plot(rows: list[dict], raw: dict, no_privacy: dict, path: Path) -> None:
    from tasks.core.files import pyplot

    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    betas = [r["beta"] for r in rows]
    chance = rows[0]["reid_chance"]
    ax1.plot(betas, [r["behaviour_f1"] for r in rows], "o-", label="behaviour F1 (private)")
    ax1.axhline(raw["behaviour_f1_raw"], color="k", ls="--", label="behaviour F1 (raw features)")
    ax1.axhline(0.9 * raw["behaviour_f1_raw"], color="k", ls=":", label="0.9 x raw")
    ax1.plot(betas, [r["reid_accuracy"] for r in rows], "s-", label="re-id (best of MLP, linear)")
    if "inversion_reid_accuracy" in rows[0]:
        ax1.plot(betas, [r["inversion_reid_accuracy"] for r in rows], "^-", label="re-id on reconstructions")
    ax1.axhline(chance + 0.05, color="r", ls=":", label="chance + 5 pts")
    ax1.set_xscale("log")
    ax1.set_xlabel("beta (KL weight)")
    ax1.set_ylim(0, 1.02)
    ax1.legend(fontsize=7)
    ax1.set_title("privacy-utility vs beta")
    ax2.plot([r["reid_accuracy"] for r in rows], [r["behaviour_f1"] for r in rows], "o-")
    for r in rows:
        ax2.annotate(f"{r['beta']:g}", (r["reid_accuracy"], r["behaviour_f1"]), fontsize=7)
    ax2.plot([raw["reid_accuracy"]], [raw["behaviour_f1_raw"]], "k*", ms=10, label="raw features")
    ax2.plot(
        [no_privacy["reid_accuracy"]],
        [no_privacy["behaviour_f1"]],
        "rx",
        ms=9,
        label="mapping, beta=0, no adversary",
    )
    ax2.axvline(chance + 0.05, color="r", ls=":")
    ax2.set_xlabel("re-identification accuracy")
    ax2.set_ylabel("behaviour F1")
    ax2.legend(fontsize=7)
    ax2.set_title("utility vs leakage")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--betas", default="0.001,0.01,0.1", help="comma-separated KL weights")
    parser.add_argument("--adv-weight", type=float, default=1.0, help="identity adversary weight (0: none)")
    parser.add_argument("--out-dim", type=int, default=16, help="released feature dimension k")
    parser.add_argument("--steps", type=int, default=600, help="mapping training steps")
    parser.add_argument("--train", type=int, default=840, help="training clips")
    parser.add_argument("--test", type=int, default=336, help="held-out clips")
    parser.add_argument(
        "--identities", type=int, default=24, help="number of identities (>= 20 in the issue)"
    )
    parser.add_argument("--frames", type=int, default=3, help="frames per clip (2-4)")
    parser.add_argument("--size", type=int, default=64, help=f"frame side, a multiple of {FRAME_MULTIPLE}")
    parser.add_argument("--decoder-epochs", type=int, default=30, help="inversion decoder epochs")
    parser.add_argument("--no-inversion", action="store_true", help="skip the inversion attack")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--out", default="benchmarks/experiments/privacy_tradeoff.png", help="curve PNG path")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    betas = [float(b) for b in args.betas.split(",") if b.strip()]
    t0 = time.time()
    data = make_splits(
        args.train,
        args.test,
        n_identities=args.identities,
        n_frames=args.frames,
        size=args.size,
        seed=args.seed,
    )
    print(
        f"data: {len(data.train)} train / {len(data.test)} test clips, {args.identities} identities, "
        f"{args.frames} x {args.size}x{args.size} frames ({time.time() - t0:.1f} s)"
    )
    t1 = time.time()
    feats = tower_features(
        torch.cat([torch.as_tensor(data.train.frames), torch.as_tensor(data.test.frames)]).numpy(),
        args.seed,
        args.size,
        args.quiet,
    )
    print(f"edge features (random-init tiny Qwen3-VL tower): {list(feats.shape)} ({time.time() - t1:.1f} s)")
    n_tr = len(data.train)
    audit_data = AuditData(
        feats[:n_tr],
        clip_tensor(data.train.frames),
        torch.as_tensor(data.train.behaviour),
        torch.as_tensor(data.train.identity),
        feats[n_tr:],
        clip_tensor(data.test.frames),
        torch.as_tensor(data.test.behaviour),
        torch.as_tensor(data.test.identity),
        len(BEHAVIOURS),
        args.identities,
    )
    base = MappingConfig(out_dim=args.out_dim, adv_weight=args.adv_weight, steps=args.steps, seed=args.seed)
    attack = AttackConfig(decoder_epochs=args.decoder_epochs, seed=args.seed)
    quiet = args.quiet
    predict = train_raw_head(
        audit_data.train_features, audit_data.train_behaviour, len(BEHAVIOURS), base, quiet
    )
    raw_f1 = macro_f1(predict(audit_data.test_features), audit_data.test_behaviour, len(BEHAVIOURS))
    identifier = train_frame_identifier(
        audit_data.train_frames, audit_data.train_identity, args.identities, seed=args.seed, quiet=quiet
    )
    raw_frame_acc = accuracy(identifier, audit_data.test_frames, audit_data.test_identity)

    def raw_release(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return x

    raw = {"behaviour_f1_raw": raw_f1, "raw_frame_identifier_accuracy": raw_frame_acc}
    raw.update(
        {
            k: v
            for k, v in audit(
                raw_release, audit_data, identifier, attack, inversion=False, quiet=quiet
            ).items()
            if not k.startswith("_")
        }
    )
    print(
        f"raw features: behaviour F1 {raw_f1:.3f}; re-id MLP {raw['reid_accuracy_mlp']:.3f} "
        f"linear {raw['reid_accuracy_linear']:.3f} (chance {raw['reid_chance']:.3f}); "
        f"raw-frame identifier on raw test frames {raw_frame_acc:.3f}"
    )
    header = (
        f"{'beta':>7} {'F1':>6} {'F1/raw':>6} {'reid_mlp':>8} {'reid_lin':>8} {'psnr':>6} {'ssim':>6} "
        f"{'inv_reid':>8} {'targets':>8}"
    )
    print(header)

    def show(row: dict) -> None:
        ok = meets_targets(row)
        inv = (
            f"{row['inversion_psnr']:6.2f} {row['inversion_ssim']:6.3f} {row['inversion_reid_accuracy']:8.3f}"
            if "inversion_psnr" in row
            else f"{'-':>6} {'-':>6} {'-':>8}"
        )
        print(
            f"{row['beta']:7g} {row['behaviour_f1']:6.3f} {row['behaviour_f1'] / max(raw_f1, 1e-9):6.2f} "
            f"{row['reid_accuracy_mlp']:8.3f} {row['reid_accuracy_linear']:8.3f} {inv} "
            f"{'met' if ok['all'] else 'missed':>8}",
            flush=True,
        )

    # the no-privacy reference: the same mapping with beta = 0 and no adversary (dimension reduction only)
    no_adv = MappingConfig(**{**asdict(base), "adv_weight": 0.0})
    leaky = beta_sweep(
        audit_data,
        [0.0],
        no_adv,
        attack,
        identifier,
        raw_f1,
        inversion=not args.no_inversion,
        quiet=quiet,
        on_row=show,
    )
    rows = beta_sweep(
        audit_data,
        betas,
        base,
        attack,
        identifier,
        raw_f1,
        inversion=not args.no_inversion,
        quiet=quiet,
        on_row=show,
    )
    clean = [
        {k: v for k, v in r.items() if not k.startswith("_")} | {"targets": meets_targets(r)} for r in rows
    ]
    no_privacy = {k: v for k, v in leaky[0].items() if not k.startswith("_")} | {
        "targets": meets_targets(leaky[0])
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "encoder": "tiny Qwen3-VL vision tower, random init (seeded)",
        "args": vars(args),
        "raw": raw,
        "no_privacy": no_privacy,
        "rows": clean,
        "seconds": round(time.time() - t0, 1),
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(clean, raw, no_privacy, out)
    met = [r["beta"] for r in clean if r["targets"]["all"]]
    print(f"targets met at beta in {met}" if met else "targets met at no beta tried")
    print(
        f"(first row: beta=0 and no adversary, the no-privacy reference; raw-frame identifier on raw test "
        f"frames {raw_frame_acc:.3f})"
    )
    print(f"wrote {out} and {out.with_suffix('.json')} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
