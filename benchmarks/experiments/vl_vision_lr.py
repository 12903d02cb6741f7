"""The VL profile's family_sft at several vision-tower lr multipliers (`vl.vision_lr_scale`), then
evaluate, and what each leaves in the tower's features: does the tower's lr decide whether the members
read shape?

    python benchmarks/experiments/vl_vision_lr.py --out /tmp/vlr          # scales 1, 0.3, 0.1, 0.03
    python benchmarks/experiments/vl_vision_lr.py --out /tmp/vlr --scales 1,0.1 --set seed=1

Needs the VL profile's validate_data, tokenizer and cpt outputs (`dvc repro profiles/vl/dvc.yaml:cpt`,
with the same `--set` overrides that change data or alignment, e.g. `seed`). For each multiplier the
stage's own `family_sft` runs (same data, stream, schedule, loss; the tower and its mergers, parameter
prefix `model.visual.`, at multiplier x the lr), then `evaluate` on that checkpoint (no RL), everything
under `--out/scale_<s>/`. Feature statistics of the trained tower on up to 256 train scene images, per
occupied cell: the mean norm of the merged image token (what text layer 0 reads) and the share of its
spread that the shape explains (the mean distance of the three shape means from the overall mean over
the mean distance of a feature from it; the same for the deepstack feature). Figures:
benchmarks/RESULTS.md ("The vision tower's learning rate").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def shape_share(feats, labels) -> tuple[float, float]:
    """(mean norm, share of the spread explained by the label) of `feats` `[n, dim]` with `labels` `[n]`."""
    import torch

    mu = feats.mean(0)
    means = torch.stack([feats[labels == k].mean(0) for k in sorted(set(labels.tolist()))])
    between = float((means - mu).norm(dim=-1).mean())
    total = float((feats - mu).norm(dim=-1).mean())
    return float(feats.norm(dim=-1).mean()), between / max(total, 1e-12)


def tower_statistics(family_dir: Path, processor, rows: list[dict], grid: int, limit: int = 256) -> dict:
    """Norm and shape share of the merged token and the deepstack feature of every occupied cell."""
    from vl_shape_probe import cell_examples, gather, tower_features

    from tasks.data.vlgen import SHAPES
    from tasks.training.vl_pipeline import _image

    examples = cell_examples(rows, grid)[:limit]
    feats = tower_features(family_dir, processor, [_image(r) for r, _ in examples], grid)
    out = {}
    for name, f in feats.items():
        x, y = gather(f, examples, lambda shape, colour: SHAPES.index(shape))
        norm, share = shape_share(x, y)
        out[name] = {"norm": round(norm, 3), "shape_share": round(share, 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    from vl_scratch import vl_argparser

    ap = vl_argparser(__doc__)
    ap.add_argument(
        "--scales",
        default="1,0.3,0.1,0.03",
        help="vision lr multipliers, comma-separated (default %(default)s)",
    )
    ap.add_argument("--out", required=True, help="scratch directory for everything this run writes")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    from vl_scratch import scratch_params

    from tasks.core.files import read_jsonl
    from tasks.core.paths import Workspace
    from tasks.core.stage import parse_overrides, set_threads
    from tasks.training import vl_pipeline as vp

    try:
        scales = [float(s) for s in args.scales.split(",")]
    except ValueError:
        ap.error(f"--scales {args.scales!r}: comma-separated numbers expected")
    sets = parse_overrides(args.set)
    results = []
    for scale in scales:
        out = Path(args.out) / f"scale_{scale:g}"
        params = scratch_params(args.params, {**sets, "vl.vision_lr_scale": scale}, out)
        set_threads(params.threads)
        sft = vp.family_sft(params)
        ev = vp.evaluate(params)
        ws = Workspace.from_params(params)
        train_rows = read_jsonl(ws.validated / "train.jsonl")
        grid = params.vl.image_size // (params.vl.vision.patch_size * params.vl.vision.spatial_merge_size)
        stats = tower_statistics(ws.artifacts("family_sft"), vp.load_processor(params), train_rows, grid)
        deepest = f"exit_{max(params.model.exit_layers)}"
        results.append(
            {
                "scale": scale,
                "val_loss": {k: v["val_loss"] for k, v in sft.items() if k.startswith("exit_")},
                "accuracy": {k: v["accuracy"] for k, v in ev.items() if k.startswith("exit_")},
                "deepest_by_task": {t: v["accuracy"] for t, v in ev[deepest]["by_task"].items()},
                "tower": stats,
            }
        )
    print(
        "\n| vision lr x | accuracy per exit % | deepest: count / colour / position / relation % "
        "| merged token: norm, shape share | deepstack: norm, shape share |"
    )
    print("|---|---|---|---|---|")
    for r in results:
        acc = " / ".join(f"{100 * v:.1f}" for v in r["accuracy"].values())
        by = r["deepest_by_task"]
        tasks = " / ".join(
            f"{100 * by.get(t, float('nan')):.1f}"
            for t in ("scene_count", "scene_colour", "scene_position", "scene_relation")
        )
        m, d = r["tower"].get("merger", {}), r["tower"].get("deepstack", {})
        print(
            f"| {r['scale']:g} | {acc} | {tasks} | {m.get('norm')}, {m.get('shape_share')} "
            f"| {d.get('norm')}, {d.get('shape_share')} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
