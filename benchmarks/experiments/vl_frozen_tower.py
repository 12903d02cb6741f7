"""The VL profile's family_sft with the vision tower frozen, then evaluate on that checkpoint: does shape
kept in the tower's features (benchmarks/experiments/vl_shape_probe.py) teach the members to count?

    python benchmarks/experiments/vl_frozen_tower.py --out /tmp/frozen            # params.vl.yaml
    python benchmarks/experiments/vl_frozen_tower.py --out /tmp/frozen --set family_sft.max_steps=400

Needs the VL profile's validate_data, tokenizer and cpt outputs (`ruyi run --profile vl`, or `dvc repro
profiles/vl/dvc.yaml:cpt`). It trains exactly as the profile's family_sft stage (`vl_pipeline._train`:
same data, stream, schedule and multi-exit loss) from `<artifacts_dir>/cpt`, except that the vision
blocks, patch and position embeddings do not train (the merger, the deepstack mergers and the text
backbone do). Everything it writes goes under `--out` (checkpoints, the family, metrics, the
evaluation table); the workspace's artifacts are only read. Figures: benchmarks/RESULTS.md ("Is the
tower shape-blind?").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

#: Names (under `model.visual`) of the parts that still train.
TRAINED_VISION_PARTS = ("merger", "deepstack_merger_list")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument(
        "--params", default="params.vl.yaml", help="the VL profile's params file (default %(default)s)"
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="params override (repeatable)"
    )
    ap.add_argument("--out", required=True, help="scratch directory for everything this run writes")
    args = ap.parse_args(argv)

    from tasks.core.params import load_params
    from tasks.core.paths import Workspace
    from tasks.core.stage import parse_overrides, set_threads
    from tasks.training import vl_pipeline as vp

    params = load_params(Path(args.params), parse_overrides(args.set))
    ws = Workspace.from_params(params)
    out = Path(args.out)
    for name in ("cpt", "tokenizer"):
        if not ws.artifacts(name).is_dir():
            raise SystemExit(f"{ws.artifacts(name)} not found: run the VL profile up to cpt first")
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    for name in ("cpt", "tokenizer"):
        link = out / "artifacts" / name
        if not link.exists():
            link.symlink_to(ws.artifacts(name).resolve())
    scratch = {
        "paths.artifacts_dir": str(out / "artifacts"),
        "paths.metrics_dir": str(out / "metrics"),
        "paths.plots_dir": str(out / "plots"),
        "paths.reports_dir": str(out / "reports"),
        "paths.data_dir": str(ws.data_dir.resolve()),
        "evaluate.checkpoint": "family_sft",
    }
    params = load_params(Path(args.params), {**parse_overrides(args.set), **scratch})
    set_threads(params.threads)

    model = vp.load_family(params, "cpt")
    model.requires_grad_(True)
    for name, p in model.model.visual.named_parameters():
        if not name.startswith(TRAINED_VISION_PARTS):
            p.requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    print(f"training {sum(p.numel() for _, p in named):,} of {total:,} parameters (vision tower frozen)")
    tasks = [*params.vl.tasks, *([vp.CAPTION] if params.vl.sft_captions else [])]
    rows = vp._rows(params, "train", tasks)
    val = vp._rows(params, "select", params.vl.tasks)
    metrics = vp._train(
        params, "family_sft", model, params.family_sft, named, rows, val, {"part": "sft-frozen-tower"}
    )
    vp._save_family(params, "family_sft", model)
    print(json.dumps({k: v for k, v in metrics.items() if k.startswith("exit_")}))
    vp.evaluate(params)  # prints the table per exit and task type; writes under --out/metrics
    return 0


if __name__ == "__main__":
    sys.exit(main())
