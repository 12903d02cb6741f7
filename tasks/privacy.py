"""Stage privacy: the edge-cloud camera's de-identifying mapping, trained, audited by attacks, gated.

    python -m tasks.privacy [--set privacy.beta=0.01 --set privacy.family_dir=artifacts/vl/rl ...]
    python -m tasks.privacy --params params.vl.yaml    # the vision-language profile's privacy stage

Not a stage of the default text pipeline (dvc.yaml). The vision-language profile (profiles/vl/dvc.yaml)
runs it after rl and before export, on its own family's vision tower (`privacy.family_dir`, null there
meaning `<artifacts_dir>/rl`); export and deploy depend on its release, so a failed gate stops the flow
before anything is exported or deployed. The body is `tasks.training.privacy_run.run_privacy`.

1. Renders the camera clips (tasks/data/camgen.py: identities, behaviours, questions with exact answers).
2. The edge encoder: the vision tower of `privacy.family_dir` (frozen), or, when that is null, the tiny
   Qwen3-VL tower built here and trained on the training clips' behaviour labels (`tower_steps`), so the
   audit judges a trained tower. Edge features per clip: merged tokens and every deepstack feature.
3. The mapping (ruyi_model/privacy.py) trained with task CE + `beta` x KL + identity adversary; the
   cloud's behaviour head on the released features answers behaviour. With `privacy.cloud_member`, the
   family's deepest member (ruyi_model.camera.CloudMember) learns to answer the clips' questions in text
   from the released features (soft tokens in place of an image), and the same member on raw edge
   features is its reference.
4. The audit (tasks/training/privacy.py): re-identification by fresh MLP and linear attackers trained to
   convergence on released features of the training clips, tested on held-out clips; white-box inversion
   (PSNR/SSIM and a raw-frame identity classifier on the reconstructions); the same for every
   `privacy.betas` (the privacy-utility curve, <plots_dir>/privacy/privacy_utility.png) and for the no-privacy
   reference (beta = 0, no adversary; `no_privacy` in the metrics).
5. The gate: behaviour F1 >= min_f1_ratio x raw-feature F1, re-identification and identity on
   reconstructions <= chance + reid_margin, and (with the member) its QA accuracy >= min_qa_ratio x its
   raw-feature reference's. Passed: <artifacts_dir>/privacy/ (edge: tower + mapping; cloud: head, feature
   contract and the member; served by tasks/release/camera.py). Failed: <metrics_dir>/privacy.json
   is still written (atomically, `"passed": false` and the failed checks), any earlier
   <artifacts_dir>/privacy/ is removed, and the stage exits with the contract-failure code: nothing to
   export or deploy.
Why: docs/choices.md#privacy.
"""

from __future__ import annotations

from tasks.core.stage import stage_main
from tasks.training.privacy_run import GATED, check_gate, edge_encoder, gate_failures, run_privacy

__all__ = ["GATED", "check_gate", "edge_encoder", "gate_failures", "main", "run"]
run = run_privacy


def main(argv: list[str] | None = None) -> int:
    return stage_main("privacy", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
