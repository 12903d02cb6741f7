"""The summary `ruyi run` prints after the pipeline: one row per exit, then where the results are.

python -m flows.report [--params params.yaml]      # the text profile's
python -m flows.report --params params.vl.yaml     # the vision-language profile's (model.modality: vl)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tasks.core.params import load_params


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def summary_rows(metrics_dir: str | Path) -> list[dict[str, Any]]:
    """One row per exit from metrics/eval.json (quality, speed, parameters) and compress.json."""
    metrics_dir = Path(metrics_dir)
    ev = _read(metrics_dir / "eval.json")
    comp = _read(metrics_dir / "compress.json")
    rows = []
    for key in sorted((k for k in ev if k.startswith("exit_")), key=lambda k: int(k.split("_")[1])):
        m = ev[key]
        rows.append(
            {
                "exit": key,
                "loss": m.get("loss"),
                "accuracy": m.get("accuracy"),
                "tokens_per_s": m.get("tokens_per_s"),
                "params": m.get("params"),
                "compress_change": (comp.get(key) or {}).get("relative_loss_change"),
            }
        )
    return rows


def recipe_lines(metrics_dir: str | Path) -> list[str]:
    """The recipe's gains in words: DaE (member before vs after expansion), rl (before/after, the step
    whose weights were kept, steps with a gradient), compression (removed shares, gain retained) and
    the auto tier's router (layers and accuracy vs always-deepest) and the served speculative tier (the
    deploy smoke test's questions: completions equal to the deepest member's, drafts accepted, tokens per
    deepest-member forward); a missing metrics file gives no line."""
    metrics_dir = Path(metrics_dir)
    comp, rl = _read(metrics_dir / "compress.json"), _read(metrics_dir / "rl.json")
    route = _read(metrics_dir / "route.json")
    speculative = (_read(metrics_dir / "deploy_smoke.json").get("tiers") or {}).get("speculative") or {}

    def pct(v, spec=".1%"):
        return "-" if v is None else format(v, spec)

    lines = []
    control = comp.get("dae_control") or {}
    if control:
        before, dense, svd = (control.get(k) or {} for k in ("before_dae", "dense", "decomposed"))
        retained = control.get("gain_retained") or {}
        lines.append(
            f"DaE (exit {comp.get('dae_exit')}): accuracy {pct(before.get('accuracy'))} before DaE -> "
            f"{pct(dense.get('accuracy'))} dense -> {pct(svd.get('accuracy'))} decomposed; gain retained: "
            f"accuracy {pct(retained.get('accuracy'), '.2f')}, solution loss "
            f"{pct(retained.get('solution_loss'), '.2f')}"
        )
    if rl:
        steps = rl.get("steps") or 0
        # The first member's held-out curve, when rl evaluated between the ends (rl.eval_every).
        members = rl.get("members") or []
        first = rl.get(f"exit_{members[0]}") if members else None
        held = (first or {}).get("held_out_curve") or {}
        between = ""
        if len(held.get("step") or []) > 2:
            points = ", ".join(
                f"{int(s)}: {pct(a, '.0%')}" for s, a in zip(held["step"], held["accuracy"], strict=True)
            )
            between = f" (exit {members[0]} by step: {points})"
        # rl.select_prompts: the weights kept are those of the best point on select, maybe not the last.
        selection = rl.get("selection") or {}
        kept = ""
        if selection:
            kept = (
                f"; kept step {selection.get('kept_step')} (best on {selection.get('prompts')} select "
                f"problems: {pct(selection.get('kept_accuracy'))}; the last step scored "
                f"{pct(rl.get('accuracy_last_step'))} held-out)"
            )
        lines.append(
            f"rl ({rl.get('algorithm')}, members {members}): held-out accuracy "
            f"{pct(rl.get('accuracy_start'))} -> {pct(rl.get('accuracy_end'))}{between}{kept}; steps with a "
            f"gradient {rl.get('steps_with_gradient', '-')}/{steps}"
        )
    removed = comp.get("removed_fraction") or {}
    if removed:
        used, asked = comp.get("ratio_used"), comp.get("ratio")
        lowered = (
            f" (ratio {used} of the {asked} asked: the largest within the loss budget on the decision set)"
            if used is not None and asked is not None and used < asked
            else ""
        )
        lines.append(
            f"compression: removed {pct(removed.get('blocks'))} of the DaE blocks, "
            f"{pct(removed.get('head'))} of the head, {pct(removed.get('blocks_and_head'))} of both{lowered}"
        )
    if route:
        deep, at = route.get("always_deepest") or {}, route.get("router") or {}
        goal = "met" if (route.get("goal") or {}).get("met") else "missed"
        lines.append(
            f"router (auto tier, threshold {route.get('threshold')}): {at.get('layers_per_request', '-')} "
            f"layers/request at {pct(at.get('accuracy'))} vs always-deepest "
            f"{deep.get('layers_per_request', '-')} at {pct(deep.get('accuracy'))}: "
            f"{pct(route.get('relative_layer_saving'))} fewer layers, goal {goal}"
        )
    if speculative.get("verifications"):
        requests = speculative.get("requests") or 0
        tokens = round((speculative.get("completion_tokens_mean") or 0) * requests)
        lines.append(
            f"speculative tier (deploy smoke test, {requests} questions): "
            f"{pct(speculative.get('same_as_deepest'), '.0%')} of the completions equal to the deepest "
            f"member's; {pct(speculative.get('acceptance_rate'))} of the drafts accepted, {tokens} tokens in "
            f"{speculative['verifications']} deepest-member forwards "
            f"({tokens / speculative['verifications']:.1f} each)"
        )
    return lines


#: What the tiny default run is meant to reach (benchmarks/RESULTS.md reports each, met or missed):
#: the deepest member's held-out accuracy; how far a deeper member may fall below a shallower one; the
#: DaE member's gain over itself before DaE; rl's held-out gain and its share of steps with a gradient;
#: the share of the DaE blocks SVD removes and the accuracy gain it keeps.
TARGETS = {
    "deepest_accuracy": 0.50,
    "depth_slack": 0.02,
    "dae_gain": 0.10,
    "rl_gain": 0.05,
    "rl_gradient_share": 0.80,
    "svd_removed_blocks": 0.50,
    "svd_gain_retained": 0.95,
}


def target_lines(metrics_dir: str | Path) -> list[str]:
    """One line per target of `TARGETS`: the measured value and whether it is met (a target whose
    metrics file is missing gives no line)."""
    metrics_dir = Path(metrics_dir)
    ev, comp, rl = (_read(metrics_dir / f) for f in ("eval.json", "compress.json", "rl.json"))
    t, out = TARGETS, []

    def line(name: str, measured: str, met: bool) -> None:
        out.append(f"target {name}: {measured} -> {'met' if met else 'MISSED'}")

    accs = [
        (int(k.split("_")[1]), v.get("accuracy"))
        for k, v in ev.items()
        if k.startswith("exit_") and isinstance(v, dict) and v.get("accuracy") is not None
    ]
    if accs:
        accs.sort()
        deepest = accs[-1][1]
        line(
            f"deepest member >= {t['deepest_accuracy']:.0%}",
            f"{deepest:.1%}",
            deepest >= t["deepest_accuracy"],
        )
        drops = [a - b for i, (_, a) in enumerate(accs) for _, b in accs[i + 1 :]]
        worst = max(drops, default=0.0)
        line(
            f"deeper never more than {t['depth_slack'] * 100:.0f} points below shallower",
            f"worst {max(worst, 0.0) * 100:.1f} points below",
            worst <= t["depth_slack"] + 1e-9,
        )

    def gain_line(name: str, start: float | None, end: float | None, target: str) -> bool:
        """The line of an accuracy gain in points; False (no line) when either end is missing."""
        if start is None or end is None:
            return False
        gain = end - start
        line(
            f"{name} gain >= {t[target] * 100:.0f} points",
            f"{gain * 100:+.1f} points",
            gain >= t[target] - 1e-9,
        )
        return True

    control = comp.get("dae_control") or {}
    before, dense = (control.get(k) or {} for k in ("before_dae", "dense"))
    gain_line("DaE", before.get("accuracy"), dense.get("accuracy"), "dae_gain")
    if gain_line("rl", rl.get("accuracy_start"), rl.get("accuracy_end"), "rl_gain"):
        steps, with_grad = rl.get("steps") or 0, rl.get("steps_with_gradient") or 0
        share = with_grad / steps if steps else 0.0
        line(
            f"rl steps with a gradient >= {t['rl_gradient_share']:.0%}",
            f"{with_grad}/{steps}",
            share >= t["rl_gradient_share"] - 1e-9,
        )
    removed = (comp.get("removed_fraction") or {}).get("blocks")
    retained = ((control.get("gain_retained") or {}) if control else {}).get("accuracy")
    if removed is not None and retained is not None:
        line(
            f"SVD removes >= {t['svd_removed_blocks']:.0%} of the DaE blocks keeping >= "
            f"{t['svd_gain_retained']:.2f} of the accuracy gain",
            f"{removed:.1%} removed, {retained:.2f} kept",
            removed >= t["svd_removed_blocks"] and retained >= t["svd_gain_retained"],
        )
    return out


def gates_line(metrics_dir: str | Path) -> str | None:
    """The quality gates' verdict in one line: passed or FAILED (with the failing exits), the rule
    (`gates.verdict`), and every gate whose interval straddles its bar (estimate, interval, bar); None
    before the gates ran."""
    g = _read(Path(metrics_dir) / "gates.json")
    if not g:
        return None
    head = "quality gates passed" if g.get("passed") else "quality gates FAILED"
    if not g.get("passed") and g.get("failing_exits"):
        head += f" ({', '.join(g['failing_exits'])})"
    head += f", verdict {g.get('verdict', 'point')}"
    conf = (g.get("intervals") or {}).get("confidence")
    open_calls = g.get("undecided") or []
    if not open_calls:
        return head + (f"; every per-item gate decided at {conf:.0%}" if conf else "")
    calls = [
        f"{u['exit']} {u['gate']} {u['estimate']:.3f} [{u['interval'][0]:.3f}, {u['interval'][1]:.3f}] "
        f"vs {u['bar']:.3f}"
        for u in open_calls
    ]
    return head + f"; undecided at {conf:.0%} (the draw of the items): " + "; ".join(calls)


def not_this_run(
    workspace: str | Path, ran: list[str] | None, metrics: dict[str, Path], dvc_file: str
) -> dict[str, str]:
    """For each stage of `metrics` (stage -> the metrics file a summary prints from) outside `ran` (the
    stages this run covered; None: a summary without a run) whose file exists: DVC's word on it
    (`stage_freshness`)."""
    if ran is None:
        return {}
    others = [s for s, path in metrics.items() if s not in ran and path.is_file()]
    if not others:
        return {}
    from flows.pipeline import stage_freshness

    try:
        return stage_freshness(workspace, others, dvc_file)
    except RuntimeError as e:  # the summary still prints; the figures are named as unchecked
        first = str(e).splitlines()[0]
        return {s: f"not checked: {first}" for s in others}


def not_this_run_line(status: dict[str, str]) -> str | None:
    if not status:
        return None
    return "figures not from this run: " + "; ".join(f"{stage}: {why}" for stage, why in status.items())


def print_summary(
    params_path: str | Path = "params.yaml", ran: list[str] | None = None, dvc_file: str = "dvc.yaml"
) -> None:
    """The text profile's summary. `ran`: the stages this run covered; the figures of the others are
    named with DVC's word on them (up to date, out of date, not run here)."""
    from rich.console import Console
    from rich.table import Table

    params = load_params(params_path)
    base = Path(params_path).parent  # the workspace: its paths are workspace-relative
    console = Console()
    rows = summary_rows(base / params.paths.metrics_dir)
    table = Table(title="ruyi family: one row per exit (member)")
    for col in ("exit", "held-out loss", "math accuracy", "tokens/s", "params", "compression loss change"):
        table.add_column(col, justify="right")

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    for r in rows:
        table.add_row(
            r["exit"],
            fmt(r["loss"], ".3f"),
            fmt(r["accuracy"], ".1%"),
            fmt(r["tokens_per_s"], ".1f"),
            fmt(r["params"], ","),
            fmt(r["compress_change"], "+.2%"),
        )
    console.print(table)
    for line in recipe_lines(base / params.paths.metrics_dir):
        console.print(line, soft_wrap=True)  # one line each, as logs and greps expect
    for line in target_lines(base / params.paths.metrics_dir):
        console.print(line, markup=False, soft_wrap=True)
    if line := gates_line(base / params.paths.metrics_dir):
        console.print(line, markup=False, soft_wrap=True)
    for name, where in result_paths(params, base).items():
        console.print(f"[bold]{name}[/bold]: {where}")
    m = base / params.paths.metrics_dir
    files = {
        "rl": "rl.json",
        "compress": "compress.json",
        "route": "route.json",
        "evaluate": "eval.json",
        "gates": "gates.json",
    }
    metrics = {stage: m / name for stage, name in files.items()} | {"deploy": m / "deploy_smoke.json"}
    if line := not_this_run_line(not_this_run(base, ran, metrics, dvc_file)):
        console.print(line, markup=False, soft_wrap=True)


#: The VL profile's figures under its plots_dir (profiles/vl/dvc.yaml lists them for `dvc plots show`).
VL_PLOTS = (
    "cpt/loss.png",
    "family_sft/loss.png",
    "rl/curves.png",
    "evaluate/tradeoff.png",
    "privacy/privacy_utility.png",
)


def print_vl_summary(
    params_path: str | Path = "params.vl.yaml",
    ran: list[str] | None = None,
    dvc_file: str = "profiles/vl/dvc.yaml",
) -> None:
    """The vision-language profile's table (accuracy per exit and task type, tokens/s, parameters), the
    privacy gate's figures and the releases, once those stages have run. `ran`: the stages this run
    covered; a figure of another stage says so, with DVC's word on it (up to date, out of date, not run
    here)."""
    from tasks.training.vl_pipeline import format_table

    params = load_params(params_path)
    base = Path(params_path).parent  # the workspace: its paths are workspace-relative
    path = base / params.paths.metrics_dir / "eval.json"
    if not path.is_file():
        print(f"(no {path}: the evaluate stage has not run)")
        return
    metrics = {
        "evaluate": path,
        "gates": path.parent / "gates.json",
        "privacy": path.parent / "privacy.json",
        "deploy": path.parent / "deploy.json",
    }
    status = not_this_run(base, ran, metrics, dvc_file)

    def tag(stage: str) -> str:
        return f" [not from this run: {status[stage]}]" if stage in status else ""

    print(f"VL family, held-out generated VQA, accuracy % per exit and task type ({path}){tag('evaluate')}:")
    print(format_table(json.loads(path.read_text()), params.model.exit_layers))
    if line := gates_line(path.parent):
        print(line + tag("gates"))
    privacy = _read(metrics["privacy"])
    if privacy:
        print(
            f"privacy gate {'passed' if privacy['passed'] else 'FAILED'} ({metrics['privacy']}"
            f"{tag('privacy')}): "
            f"behaviour F1 {privacy['behaviour_f1']:.3f} (raw features {privacy['behaviour_f1_raw']:.3f}), "
            f"re-identification {privacy['reid_accuracy']:.3f} and on reconstructions "
            f"{privacy['inversion_reid_accuracy']:.3f} (chance {privacy['reid_chance']:.3f})"
        )
        if "qa_accuracy_member" in privacy:
            print(
                f"cloud member ({privacy['cloud_member']['description']}): QA accuracy "
                f"{privacy['qa_accuracy_member']:.3f} on released features, "
                f"{privacy['qa_accuracy_member_raw']:.3f} on raw features "
                f"(best constant answers {privacy['qa_chance_member']:.3f}){tag('privacy')}"
            )
    plots = Path(params_path).parent / params.paths.plots_dir
    written = [p for p in VL_PLOTS if (plots / p).is_file()]
    if written:
        print(f"plots ({plots}): " + ", ".join(written))
    deploy = _read(metrics["deploy"])
    if deploy:
        print(
            f"release: {deploy['release_uri']}; camera release: {deploy['camera_release_uri']}{tag('deploy')}"
        )


def result_paths(params, base: str | Path = ".") -> dict[str, str]:
    """Where a person finds each result of the run (its paths taken relative to the workspace `base`);
    what a partial run has not written is marked."""
    base = Path(base)
    deploy = _read(base / params.paths.metrics_dir / "deploy.json")
    reports, plots = base / params.paths.reports_dir, base / params.paths.plots_dir
    local = {
        "metrics": base / params.paths.metrics_dir,
        "plots (PNG + CSV per stage)": plots,
        "trade-off plot (quality vs latency per exit)": plots / "evaluate" / "tradeoff.png",
        "router cost/quality plot (auto tier)": plots / "route" / "cost_quality.png",
        "data contracts (Data Docs)": reports / "contracts",
        "quality gates (Data Docs)": reports / "gates",
        "evaluation report": reports / "evaluate",
        "compression report": reports / "compress",
        "deploy smoke test": reports / "deploy",
        "exports (stock Qwen3 per exit)": base / params.paths.artifacts_dir / "export",
    }
    out = {name: str(path) + ("" if path.exists() else " (not written yet)") for name, path in local.items()}
    out["release"] = deploy.get("release_uri") or deploy.get("store_uri") or "- (not deployed yet)"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m flows.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--params",
        default="params.yaml",
        help=(
            "the run's params file (default params.yaml); its paths are relative to the file's folder. "
            "A vision-language profile's (model.modality: vl, e.g. params.vl.yaml) prints that profile's "
            "summary"
        ),
    )
    args = ap.parse_args(argv)
    if load_params(args.params).model.modality == "vl":
        print_vl_summary(args.params)
    else:
        print_summary(args.params)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
