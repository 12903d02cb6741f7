"""Stage `deploy`: publish the export as a versioned release, serve it, smoke-test every tier, stop.

    python -m tasks.deploy [--params params.yaml] [--set deploy.version=v7] [--set deploy.store.backend=s3]

Reads `artifacts/export/`, the first `deploy.smoke_prompts` rows of `data/validated/eval.jsonl`, the
per exit `params` of `metrics/eval_quality.json` (evaluate's reproducible metrics) and evaluate's greedy
completions (`reports/evaluate/generations.jsonl`). Before publishing, the factored tiers
(`exit_<d>_factored/`) must give the family's logits on a probe; once served, every `exit_<d>` tier must
run exactly the evaluated member's parameter count (`/v1/models`) and answer each smoke question with
evaluate's completion of it (served in float32; in another dtype a difference is logged), and every
`auto` answer must be the output of the member it names (the release ships the route stage's router, so the
`auto` tier is served; `speculative` too, with `deploy.speculative_draft_*`). For a vision-language export
every tier also answers a generated image question exactly as its exported stock member does under plain
transformers (`tasks.release.vision.vl_smoke_test`). Writes the release
to the store (`tasks.release.store`), its fetched copy under `<artifacts_dir>/releases/`,
`metrics/deploy.json` (version, URIs, per-tier smoke results, served params and latency), and, once every
check passed, marks the release validated in the store (`VALIDATED.json`: what `ruyi serve` and a serve
config with `version: null` follow; a release that failed its smoke test is published but never served
by default),
`metrics/deploy_smoke.json` (the reproducible part), `reports/deploy/smoke.jsonl` and
`plots/deploy/latency.{png,csv}`. `ruyi serve` keeps a release running. Publishing (reuse of identical
content) is `tasks.release.store.publish_dir`, the serving arguments and the served-parameter check are
`tasks.release.serving`'s, the comparison with evaluate's completions `tasks.release.smoke`'s: the
vision-language profile's deploy (`model.modality: vl`, `tasks.training.vl_pipeline.deploy`) is built
from the same pieces. Choices: docs/choices.md#deploy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.core.files import (
    atomic_file,
    pyplot,
    read_jsonl,
    require_dir,
    save_figure,
    sha256_file,
    write_jsonl,
    write_metrics,
)
from tasks.core.params import Params, ParamsError
from tasks.core.paths import Workspace
from tasks.core.stage import StageError, setup_logging, stage_main
from tasks.release.smoke import check_same_as_evaluate, compare_with_evaluate, evaluated_completions
from tasks.release.store import ArtifactStore, Release, content_digest, open_store, publish_dir, scan_dir
from tasks.release.vision import is_vl_release, vl_smoke_test

log = logging.getLogger("ruyi.deploy")


def release_cache_dir(params: Params) -> Path:
    """Where fetched releases are kept: `deploy.store.cache_dir` or `<artifacts_dir>/releases`."""
    return Path(params.deploy.store.cache_dir or Workspace.from_params(params).releases)


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def export_dir(params: Params) -> Path:
    """`artifacts/export/` (StageError if it is not a complete export)."""
    return require_dir(
        Workspace.from_params(params).artifacts("export"),
        "export (run the export stage first)",
        marker="manifest.json",
    )


def publish_export(params: Params, store: ArtifactStore) -> tuple[Release, bool]:
    """Publishes `artifacts/export/` (`tasks.release.store.publish_dir`) once every file is what the export
    stage listed in its manifest (`ruyi_model.export.verify_export`: a file changed, added or lost since is
    a StageError naming it, and nothing is published). The export is hashed once (`scan_dir`), for both
    the check and the release manifest. Returns `(release, reused)`."""
    from ruyi_model.export import verify_export

    cfg = params.deploy
    export_dir_ = export_dir(params)
    files = scan_dir(export_dir_)
    try:
        verify_export(export_dir_, hashes={f.path: f.sha256 for f in files})
    except ValueError as e:
        raise StageError(
            f"{export_dir_} does not match its export manifest, so it is not published: {e}; re-run the "
            "export stage"
        ) from None
    export_manifest = json.loads((export_dir_ / "manifest.json").read_text())
    metadata = {
        "git_revision": _git_revision(),
        "seed": params.seed,
        "exit_layers": export_manifest.get("exit_layers"),
        "export_manifest_sha256": sha256_file(export_dir_ / "manifest.json"),
    }
    return publish_dir(store, cfg.model_name, export_dir_, cfg.version, metadata, files)


#: Max |logit difference| allowed between a factored tier and the family at its exit (both fp32, CPU).
FACTORED_PARITY_ATOL = 1e-5
EVAL_METRICS = "eval_quality.json"  # evaluate's reproducible metrics: per exit `params`


def evaluated_params(params: Params, exits: list[int]) -> dict[int, int]:
    """`{d: params}` of every exit in `metrics/eval_quality.json` (what the evaluated member runs).

    Raises:
        StageError: the file is missing or unreadable, or lacks an exit's `params` (naming both).
    """
    path = Workspace.from_params(params).metrics_dir / EVAL_METRICS
    if not path.is_file():
        raise StageError(f"{path} not found (run the evaluate stage first)")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StageError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    out = {}
    for d in exits:
        value = (metrics.get(f"exit_{d}") or {}).get("params") if isinstance(metrics, dict) else None
        if isinstance(value, bool) or not isinstance(value, int):
            raise StageError(
                f"{path}: no integer exit_{d}.params (the export has exits {exits}; evaluated: "
                f"{metrics.get('exits') if isinstance(metrics, dict) else None}); rerun evaluate"
            )
        out[d] = value
    return out


def check_export_tiers(root: Path, eval_params: dict[int, int], question: str) -> dict[str, dict[str, Any]]:
    """What each `exit_<d>` tier will serve from the export at `root`, checked before anything is published.

    Every tier's parameter count (its factored copy's where the manifest lists one, else the dense
    export's) must equal the evaluated `params`; each factored tier, loaded as the server loads it
    (`tasks.release.store.load_member`, fp32), must give the family's logits at its exit on a chat probe
    (`question`) within `FACTORED_PARITY_ATOL`. Returns per tier `{weights, params, max_abs_logit_diff}`
    (the last for factored tiers only).

    Raises:
        StageError: naming the tier and what differs.
    """
    import torch

    from tasks.release.store import load_member

    manifest = json.loads((root / "manifest.json").read_text())
    checks: dict[str, dict[str, Any]] = {}
    family = None
    for key, member in sorted(manifest["members"].items(), key=lambda kv: int(kv[0])):
        d, factored = int(key), member.get("factored")
        tier = f"exit_{d}"
        served = factored["num_parameters"] if factored else member["num_parameters"]
        if served != eval_params[d]:
            raise StageError(
                f"tier {tier} would serve {served} parameters ({'factored' if factored else 'dense'}) but "
                f"the evaluated member runs {eval_params[d]} (metrics/{EVAL_METRICS}): the export is not "
                "the evaluated family, or its factored copy is missing"
            )
        checks[tier] = {"weights": "factored" if factored else "dense", "params": served}
        if not factored:
            continue
        if family is None:
            family, _ = load_member(root, None, dtype="float32")
        model, tokenizer = load_member(root, d, dtype="float32")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            ours = model(input_ids=ids, use_cache=False).logits
            theirs = family(input_ids=ids, exit_layer=d, use_cache=False).logits
        diff = float((ours - theirs).abs().max())
        if not diff <= FACTORED_PARITY_ATOL:
            raise StageError(
                f"tier {tier}: the factored weights ({root / factored['dir']}) give logits that differ from "
                f"the family's at exit {d} by {diff:.3g} (> {FACTORED_PARITY_ATOL})"
            )
        checks[tier]["max_abs_logit_diff"] = diff
        log.info("tier %s: factored, %d params, max |logit diff| vs the family %.2e", tier, served, diff)
        del model
    return checks


def check_served_params(url: str, eval_params: dict[int, int], expected: dict[str, dict[str, Any]]) -> None:
    """`tasks.release.serving.check_served_params` against `metrics/eval_quality.json`'s counts."""
    from tasks.release.serving import check_served_params as check

    check(url, eval_params, expected, where=f"metrics/{EVAL_METRICS}")


def smoke_test(
    url: str, questions: list[dict[str, Any]], max_tokens: int
) -> tuple[dict[str, Any], list[dict]]:
    """Sends every question to every tier of the app at `url`.

    Returns:
        `(per_tier, rows)`: per tier `{requests, ok, accuracy, answered, completion_tokens_mean,
        latency_ms_p50, latency_ms_max, completions_sha256}` (the dynamic tier also `mean_exit_layer`;
        the speculative tier `same_as_deepest`, the share of its completions equal to the deepest member
        tier's, its `acceptance_rate`, `drafts_per_token` and `verifications` (the deepest member's
        verification forwards, over all questions); the auto tier `members`, requests per member that
        answered), and one row per request.

    Raises:
        StageError: a tier answers with an error, or an `auto` completion differs from the completion of
            the member it names (greedy: it must be that member's own output).
    """
    from tasks.data.mathgen import answers_match, extract_answer
    from tasks.release.serving import AUTO_TIER, DYNAMIC_TIER, SPECULATIVE_TIER, http_json

    status, health = http_json(f"{url}/healthz")
    if status != 200:
        raise StageError(f"smoke test: {url}/healthz answered {status}: {health}")
    status, models = http_json(f"{url}/v1/models")
    if status != 200:
        raise StageError(f"smoke test: {url}/v1/models answered {status}: {models}")
    exit_of = {m["id"]: m.get("exit_layer") for m in models["data"]}
    tiers = [t for t, d in exit_of.items() if d is not None]
    served = {m["id"] for m in models["data"]}
    tiers += [t for t in (DYNAMIC_TIER, SPECULATIVE_TIER, AUTO_TIER) if t in served]
    per_tier: dict[str, Any] = {}
    rows: list[dict] = []
    by_tier: dict[str, dict[str, str]] = {}  # tier -> question id -> completion
    from tqdm.auto import tqdm

    with tqdm(total=len(tiers) * len(questions), desc="deploy: smoke test", unit="req", disable=None) as bar:
        for tier in tiers:
            latencies, tokens, correct, answered, texts, exit_means = [], [], 0, 0, [], []
            members: dict[str, int] = {}
            drafts = {"proposed": 0, "accepted": 0, "target_forwards": 0, "tokens": 0}
            for q in questions:
                body = {
                    "model": tier,
                    "messages": [{"role": "user", "content": q["question"]}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                }
                t0 = time.perf_counter()
                status, answer = http_json(f"{url}/v1/chat/completions", body)
                latency = 1000 * (time.perf_counter() - t0)
                bar.update(1)
                if status != 200:
                    raise StageError(
                        f"smoke test: tier {tier} answered HTTP {status} to question {q['id']}: {answer}"
                    )
                text = answer["choices"][0]["message"]["content"]
                pred = extract_answer(text)
                ok = answers_match(pred, str(q["answer"]))
                correct += ok
                answered += pred is not None
                latencies.append(latency)
                tokens.append(answer["usage"]["completion_tokens"])
                texts.append(text)
                if tier == DYNAMIC_TIER and answer["ruyi"]["choices"][0].get("mean_exit_layer") is not None:
                    exit_means.append(answer["ruyi"]["choices"][0]["mean_exit_layer"])
                by_tier.setdefault(tier, {})[q["id"]] = text
                if tier == SPECULATIVE_TIER:
                    stats = answer["ruyi"]["choices"][0]
                    for key in ("proposed", "accepted", "target_forwards"):
                        drafts[key] += stats[key]
                    drafts["tokens"] += answer["usage"]["completion_tokens"]
                member = answer["ruyi"]["choices"][0].get("member") if tier == AUTO_TIER else None
                if member is not None:
                    members[member] = members.get(member, 0) + 1
                    if by_tier.get(member, {}).get(q["id"], text) != text:
                        raise StageError(
                            f"smoke test: tier {AUTO_TIER} answered question {q['id']} with member {member}, "
                            f"but not with its output: {text!r} vs {by_tier[member][q['id']]!r}"
                        )
                rows.append(
                    {
                        "tier": tier,
                        "exit_layer": exit_of[tier],
                        "id": q["id"],
                        "question": q["question"],
                        "completion": text,
                        "answer": pred,
                        "gold": str(q["answer"]),
                        "correct": ok,
                        "finish_reason": answer["choices"][0]["finish_reason"],
                        "completion_tokens": answer["usage"]["completion_tokens"],
                        "latency_ms": round(latency, 3),
                    }
                )
            per_tier[tier] = {
                "requests": len(questions),
                "ok": len(questions),
                "accuracy": correct / len(questions),
                "answered": answered / len(questions),
                "completion_tokens_mean": statistics.fmean(tokens),
                "latency_ms_p50": round(statistics.median(latencies), 3),
                "latency_ms_max": round(max(latencies), 3),
                "completions_sha256": hashlib.sha256(json.dumps(texts).encode()).hexdigest(),
            }
            if exit_means:  # dynamic early exit: the average member depth that emitted the tokens
                per_tier[tier]["mean_exit_layer"] = statistics.fmean(exit_means)
            if tier == AUTO_TIER:
                per_tier[tier]["members"] = dict(sorted(members.items()))
            if tier == SPECULATIVE_TIER:
                member_tiers = [t for t in by_tier if exit_of[t] is not None]
                ref = by_tier[max(member_tiers, key=lambda t: exit_of[t])] if member_tiers else {}
                same = [ref.get(q["id"]) == by_tier[tier][q["id"]] for q in questions]
                per_tier[tier]["same_as_deepest"] = sum(same) / len(same)
                per_tier[tier]["acceptance_rate"] = (
                    drafts["accepted"] / drafts["proposed"] if drafts["proposed"] else None
                )
                # drafts per completion token: below 1 where rounds were cut by the gate or a rejection
                per_tier[tier]["drafts_per_token"] = drafts["proposed"] / max(drafts["tokens"], 1)
                per_tier[tier]["verifications"] = drafts["target_forwards"]
    return per_tier, rows


def _plot_latency(per_tier: dict[str, Any], out_dir: Path) -> None:
    import csv

    plt = pyplot()

    rows = [
        {
            "tier": t,
            "latency_ms_p50": r["latency_ms_p50"],
            "latency_ms_max": r["latency_ms_max"],
            "accuracy": r["accuracy"],
        }
        for t, r in per_tier.items()
        if "latency_ms_p50" in r
    ]
    with atomic_file(out_dir / "latency.csv") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["tier"])
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([r["tier"] for r in rows], [r["latency_ms_p50"] for r in rows], label="p50")
    ax.scatter(
        [r["tier"] for r in rows],
        [r["latency_ms_max"] for r in rows],
        color="black",
        marker="_",
        s=200,
        label="max",
        zorder=3,
    )
    ax.set_ylabel("chat completion latency (ms)")
    ax.set_title("deploy smoke test")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out_dir / "latency.png")


def _serving_kwargs(params: Params, host: str | None = None, port: int | None = None) -> dict[str, Any]:
    from tasks.release.serving import serving_kwargs

    return serving_kwargs(params.deploy, host, port)


def run(params: Params) -> dict[str, Any]:
    from tasks.release.serving import start_serving

    cfg, ws = params.deploy, Workspace.from_params(params)
    eval_path = ws.eval_data
    questions = read_jsonl(eval_path, required=("id", "question", "answer"))[: cfg.smoke_prompts]
    if not questions:
        raise StageError(f"{eval_path}: no questions for the smoke test")
    store = open_store(cfg.store, cache_dir=release_cache_dir(params))
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    root = export_dir(params)
    exits = json.loads((root / "manifest.json").read_text())["exit_layers"]
    eval_params = evaluated_params(params, exits)
    generations_path, evaluated = evaluated_completions(params)
    tier_checks = check_export_tiers(root, eval_params, questions[0]["question"])
    timings["tier_check_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    release, reused = publish_export(params, store)
    timings["publish_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    release_dir = store.fetch(cfg.model_name, release.version)
    timings["fetch_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    session = start_serving(release_dir, **_serving_kwargs(params))
    try:
        timings["serve_start_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        check_served_params(session.url, eval_params, tier_checks)
        per_tier, rows = smoke_test(session.url, questions, cfg.smoke_max_tokens)
        if is_vl_release(root):  # an image request per tier, answered exactly as its exported member does
            from tasks.data.vlgen import generate_vqa

            item = generate_vqa(1, params.seed, "heldout")[0]
            vl = vl_smoke_test(session.url, root, item.question, item.png_bytes(), cfg.smoke_max_tokens)
            for tier, checked in vl.items():
                per_tier[tier].update(checked)
        for tier, checked in tier_checks.items():
            per_tier[tier].update(checked)
        for tier, checked in compare_with_evaluate(
            rows, evaluated, cfg.smoke_max_tokens == params.evaluate.max_new_tokens
        ).items():
            per_tier[tier].update(checked)
            check_same_as_evaluate(tier, checked, generations_path, strict=cfg.dtype == "float32")
        timings["smoke_s"] = time.perf_counter() - t0
    finally:
        t0 = time.perf_counter()
        session.stop()
        timings["serve_stop_s"] = time.perf_counter() - t0

    # Only now does `ruyi serve` (no --version) or a serve config with `version: null` follow this release.
    validation = store.mark_validated(
        cfg.model_name,
        release.version,
        {
            "stage": "deploy",
            "git_revision": _git_revision(),
            "smoke_prompts": len(questions),
            "smoke_max_tokens": cfg.smoke_max_tokens,
            "tiers": sorted(per_tier),
        },
    )
    digest = content_digest(release.files)
    reproducible = {
        "model": cfg.model_name,
        "content_sha256": digest,
        "smoke_prompts": len(questions),
        "smoke_max_tokens": cfg.smoke_max_tokens,
        "tiers": {
            t: {k: v for k, v in r.items() if not k.startswith("latency")} for t, r in per_tier.items()
        },
    }
    metrics = {
        "model": cfg.model_name,
        "version": release.version,
        "release_uri": release.uri,
        "store_uri": store.uri,
        "reused_release": reused,
        "created": release.created,
        "validated": validation["validated"],
        "files": len(release.files),
        "bytes": release.total_bytes,
        "content_sha256": digest,
        "serving_url": session.url,
        "smoke_prompts": len(questions),
        "smoke_max_tokens": cfg.smoke_max_tokens,
        "tiers": per_tier,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    write_jsonl(ws.reports("deploy") / "smoke.jsonl", rows)
    _plot_latency(per_tier, ws.plots("deploy"))
    write_metrics(params, "deploy_smoke", reproducible, split=False)
    write_metrics(params, "deploy", metrics, split=False)
    log.info(
        "deployed %s (%s): %s",
        release.uri,
        "reused" if reused else "new",
        ", ".join(
            f"{t} p50 {r['latency_ms_p50']:.0f} ms" for t, r in per_tier.items() if "latency_ms_p50" in r
        ),
    )
    return metrics


def serve_release(
    params: Params,
    version: str | None = None,
    host: str | None = None,
    port: int | None = None,
    on_ready: Callable[[str], None] | None = None,
    stop_event: threading.Event | None = None,
) -> str:
    """`ruyi serve`: fetches a release and serves it until Ctrl-C/SIGTERM.

    `version` None serves the newest release that passed the deploy stage's smoke test (its
    `VALIDATED.json`); a named version is served as it is, validated or not (a warning says which).

    Args:
        on_ready: called with the base URL once the app answers (in this thread).
        stop_event: stops serving when set (besides SIGINT/SIGTERM).

    Returns:
        The URL it served at.
    """
    from tasks.release.serving import start_serving

    cfg = params.deploy
    store = open_store(cfg.store, cache_dir=release_cache_dir(params))
    release = store.get_release(cfg.model_name, version, validated=True)
    if store.validation(cfg.model_name, release.version) is None:
        log.warning("serving %s, which has not passed the deploy smoke test (named explicitly)", release.uri)
    release_dir = store.fetch(cfg.model_name, release.version)
    stop_event = stop_event or threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop_event.set())
    session = start_serving(release_dir, **_serving_kwargs(params, host, port))
    try:
        print(
            f"serving {release.uri} at {session.url}  (OpenAI-style: /v1/completions, /v1/chat/completions, "
            "/v1/models, /healthz; Ctrl-C stops)",
            flush=True,
        )
        if on_ready is not None:
            on_ready(session.url)
        while not stop_event.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        session.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return session.url


def serve_main(
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    version: str | None = None,
    host: str | None = None,
    port: int | None = None,
) -> int:
    """The `ruyi serve` command: errors are printed (not raised) and give exit code 2.

    `host`/`port` are applied as `deploy.host`/`deploy.port` overrides, so they are validated like
    params.yaml values (e.g. a port in Ray's worker range is refused before anything starts).
    """
    import sys

    from tasks.core.params import load_params
    from tasks.core.stage import parse_overrides

    setup_logging()
    try:
        sets = parse_overrides(overrides or [])
        if host is not None:
            sets["deploy.host"] = host
        if port is not None:
            sets["deploy.port"] = port
        params = load_params(params_path, sets)
        serve_release(params, version=version)
        return 0
    except (ParamsError, StageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return stage_main("deploy", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
