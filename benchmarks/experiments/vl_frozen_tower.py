"""The VL profile's family_sft with the vision tower frozen, then evaluate on that checkpoint: does shape
kept in the tower's features (benchmarks/experiments/vl_shape_probe.py) teach the members to count?

    python benchmarks/experiments/vl_frozen_tower.py --out /tmp/frozen            # params.vl.yaml
    python benchmarks/experiments/vl_frozen_tower.py --out /tmp/frozen --set family_sft.max_steps=400

Needs the VL profile's validate_data, tokenizer and cpt outputs (`ruyi run --profile vl`, or `dvc repro
profiles/vl/dvc.yaml:cpt`). It trains exactly as the profile's family_sft stage (`vl_pipeline._train`:
same data, stream, schedule and multi-exit loss) from `<artifacts_dir>/cpt`, except that the vision
blocks, patch and position embeddings do not train (the merger, the deepstack mergers and the text
backbone do, every one at the full lr: this was measured before `vl.vision_lr_scale`). Everything it
writes goes under `--out` (checkpoints, the family, metrics, the evaluation table); the workspace's
artifacts are only read. Figures: benchmarks/RESULTS.md ("Is the tower shape-blind?").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: Names (under `model.visual`) of the parts that still train.
TRAINED_VISION_PARTS = ("merger", "deepstack_merger_list")


def main(argv: list[str] | None = None) -> int:
    from vl_scratch import vl_argparser

    ap = vl_argparser(__doc__)
    ap.add_argument("--out", required=True, help="scratch directory for everything this run writes")
    args = ap.parse_args(argv)

    from vl_scratch import scratch_params

    from tasks.core.stage import parse_overrides, set_threads
    from tasks.training import vl_pipeline as vp

    params = scratch_params(args.params, parse_overrides(args.set), Path(args.out))
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
