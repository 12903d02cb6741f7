"""Is the VL family's vision tower shape-blind, or does the text side fail to read shape? Linear probes on
what the tower hands the text model, one image token per scene cell, against the same probes on the raw
pixels of the cell.

    python benchmarks/experiments/vl_shape_probe.py                     # params.vl.yaml: cpt vs family_sft
    python benchmarks/experiments/vl_shape_probe.py --families artifacts/vl/cpt artifacts/vl/rl
    python benchmarks/experiments/vl_shape_probe.py --params params.vl.yaml --set paths.artifacts_dir=...

For every scene image of the validated train and eval splits (one row per distinct image), every
occupied cell gives one example: its object's shape (square / circle / triangle) and colour. Features
per cell: `pixels` (the cell's RGB values, 16 x 16 x 3 at the profile's 32 px), and per family the merged
image token of that cell (`merger`, what the text model's first layer reads) and the deepstack feature
of that cell (`deepstack`, added after text layer 0). A multinomial logistic regression (standardised
features, L2, full-batch L-BFGS) is fitted on the train cells and scored on the eval cells; `majority`
is the most common train label. The colour probe doubles as a check that token i is cell i. Figures:
benchmarks/RESULTS.md ("VL profile", "Is the tower shape-blind").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def cell_examples(rows: list[dict], grid: int) -> list[tuple[dict, list[tuple[int, str, str]]]]:
    """(row, [(token index, shape, colour) per occupied cell]) for each distinct scene image."""
    seen, out = set(), []
    for row in rows:
        spec = row.get("spec") or {}
        if spec.get("kind") != "scene" or row["image"] in seen:
            continue
        seen.add(row["image"])
        cells = [(o["cell"][1] * grid + o["cell"][0], o["shape"], o["colour"]) for o in spec["objects"]]
        out.append((row, cells))
    return out


def pixel_features(images, side: int, grid: int):
    """The raw RGB values of each cell, `[n_images, grid * grid, cell * cell * 3]` in [0, 1]."""
    import numpy as np
    import torch

    cell = side // grid
    arr = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images]))
    arr = arr.reshape(len(images), grid, cell, grid, cell, 3).permute(0, 1, 3, 2, 4, 5)
    return arr.reshape(len(images), grid * grid, -1)


def tower_features(family_dir: Path, processor, images, grid: int) -> dict:
    """Per cell: the merger's token and the deepstack features, `[n_images, grid * grid, dim]` each."""
    import torch

    from ruyi_model.vl import FamilialVLForConditionalGeneration

    model = FamilialVLForConditionalGeneration.from_pretrained(family_dir, dtype=torch.float32).eval()
    visual = model.model.visual
    merger, deepstack = [], []
    with torch.no_grad():
        for i in range(0, len(images), 128):
            batch = processor.image_processor(images=images[i : i + 128], return_tensors="pt")
            out = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
            n = len(images[i : i + 128])
            merger.append(out.pooler_output.reshape(n, grid * grid, -1))
            if out.deepstack_features:
                deepstack.append(
                    torch.cat([f.reshape(n, grid * grid, -1) for f in out.deepstack_features], -1)
                )
    feats = {"merger": torch.cat(merger)}
    if deepstack:
        feats["deepstack"] = torch.cat(deepstack)
    return feats


def probe(train_x, train_y, test_x, test_y, n_classes: int, l2: float = 1e-3) -> float:
    """Held-out accuracy of a multinomial logistic regression fitted by full-batch L-BFGS."""
    import torch

    torch.manual_seed(0)
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr, xte = (train_x - mu) / sd, (test_x - mu) / sd
    lin = torch.nn.Linear(xtr.shape[1], n_classes)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xtr), train_y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((lin(xte).argmax(-1) == test_y).float().mean())


def gather(feats, examples, labels_of):
    """Stack the occupied cells' features and labels."""
    import torch

    xs, ys = [], []
    for i, (_, cells) in enumerate(examples):
        for token, shape, colour in cells:
            xs.append(feats[i, token])
            ys.append(labels_of(shape, colour))
    return torch.stack(xs), torch.tensor(ys)


def main(argv: list[str] | None = None) -> int:
    from vl_scratch import vl_argparser

    ap = vl_argparser(__doc__)
    ap.add_argument(
        "--families",
        nargs="+",
        default=None,
        help="VL family checkpoints to probe (default: <artifacts_dir>/cpt and <artifacts_dir>/family_sft)",
    )
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    import torch

    from tasks.core.files import read_jsonl
    from tasks.core.params import load_params
    from tasks.core.paths import Workspace
    from tasks.core.stage import parse_overrides
    from tasks.data.vlgen import COLOURS, SHAPES
    from tasks.training.vl_pipeline import _image, load_processor

    params = load_params(Path(args.params), parse_overrides(args.set))
    ws = Workspace.from_params(params)
    side = params.vl.image_size
    grid = side // (params.vl.vision.patch_size * params.vl.vision.spatial_merge_size)
    families = (
        [Path(f) for f in args.families]
        if args.families
        else [ws.artifacts("cpt"), ws.artifacts("family_sft")]
    )
    for f in families:
        if not (f / "config.json").is_file():
            raise SystemExit(f"--families: {f} is not a VL family checkpoint (no config.json)")
    splits = {}
    for split in ("train", "eval"):
        path = ws.validated / f"{split}.jsonl"
        if not path.is_file():
            raise SystemExit(f"{path} not found: run the VL profile's validate_data stage first")
        splits[split] = cell_examples(read_jsonl(path), grid)
    images = {s: [_image(row) for row, _ in ex] for s, ex in splits.items()}
    colours, shapes = sorted(COLOURS), list(SHAPES)
    targets = {
        "shape": (len(shapes), lambda s, c: shapes.index(s)),
        "colour": (len(colours), lambda s, c: colours.index(c)),
    }
    feats = {"pixels": {s: pixel_features(images[s], side, grid) for s in splits}}
    processor = load_processor(params)
    for fam in families:
        per = {s: tower_features(fam, processor, images[s], grid) for s in splits}
        for kind in per["train"]:
            feats[f"{fam.name}:{kind}"] = {s: per[s][kind] for s in splits}
    n_cells = {s: sum(len(c) for _, c in splits[s]) for s in splits}
    print(
        f"{len(images['train'])} train / {len(images['eval'])} eval scene images, "
        f"{n_cells['train']} / {n_cells['eval']} occupied cells"
    )
    results: dict = {"cells": n_cells, "probes": {}}
    print(f"{'features':32s} {'dim':>5s} {'shape':>7s} {'colour':>7s}")
    for target, (_, labels_of) in targets.items():
        _, ytr = gather(feats["pixels"]["train"], splits["train"], labels_of)
        _, yte = gather(feats["pixels"]["eval"], splits["eval"], labels_of)
        results.setdefault("majority", {})[target] = float(
            (yte == torch.bincount(ytr).argmax()).float().mean()
        )
    for name, f in feats.items():
        row = {"dim": int(f["train"].shape[-1])}
        for target, (k, labels_of) in targets.items():
            xtr, ytr = gather(f["train"], splits["train"], labels_of)
            xte, yte = gather(f["eval"], splits["eval"], labels_of)
            row[target] = probe(xtr, ytr, xte, yte, k)
        results["probes"][name] = row
        print(f"{name:32s} {row['dim']:5d} {100 * row['shape']:6.1f}% {100 * row['colour']:6.1f}%")
    maj = results["majority"]
    print(f"{'majority (no features)':32s} {'':5s} {100 * maj['shape']:6.1f}% {100 * maj['colour']:6.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
