"""`ruyi`: the command line of ruyi-pipeline (run, stage, server, deployments, serve).

Heavy libraries are imported inside the commands, so `ruyi --help` answers instantly.
"""

from __future__ import annotations

import importlib
import sys

import typer

STAGES = [
    "prepare_data",
    "validate_data",
    "tokenizer",
    "cpt",
    "family_sft",
    "expand",
    "sft",
    "rl",
    "compress",
    "evaluate",
    "route",
    "gates",
    "export",
    "deploy",
]
#: Stages that only the vision-language profile runs (profiles/vl/dvc.yaml).
VL_ONLY_STAGES = ["privacy"]
#: Every stage `ruyi stage NAME` runs.
RUNNABLE = STAGES + VL_ONLY_STAGES

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="ruyi-pipeline: train once, deploy many (familial Ruyi2-style models).",
)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
)
def stage(
    ctx: typer.Context,
    name: str = typer.Argument(..., help=f"one of: {', '.join(RUNNABLE)}"),
) -> None:
    """Run one pipeline stage without Prefect or DVC (`ruyi stage cpt --help` for its options)."""
    if name in (
        "--help",
        "-h",
    ):  # help_option_names is empty so that `ruyi stage cpt --help` reaches the stage
        typer.echo(
            "Usage: ruyi stage NAME [--params FILE] [--set KEY=VALUE ...]\n\n"
            "Run one pipeline stage without Prefect or DVC; `ruyi stage NAME --help` lists its options.\n\n"
            f"Stages, in pipeline order: {', '.join(STAGES)}; the vision-language profile also runs "
            f"{', '.join(VL_ONLY_STAGES)} (--params params.vl.yaml)"
        )
        raise typer.Exit(0)
    if name not in RUNNABLE:
        typer.echo(f"error: unknown stage {name!r}; stages: {', '.join(RUNNABLE)}", err=True)
        raise typer.Exit(2)
    module = importlib.import_module(f"tasks.{name}")
    raise typer.Exit(module.main(list(ctx.args)))


def _parse_sets(items: list[str]) -> dict:
    """`--set` pairs as `parse_overrides` reads them; a flow mapping written without the space YAML
    needs after `:` (`{2:0.1}`, a key "2:0.1" with no value) is refused with the spelling that works."""
    from tasks.core.params import ParamsError
    from tasks.core.stage import parse_overrides

    sets = parse_overrides(items)
    for item in items:
        key = item.split("=", 1)[0].strip()
        if glued := _glued_key(sets.get(key)):
            raise ParamsError(
                f"--set {item}: {glued!r} reads as a mapping key without a value; YAML needs a space "
                f"after ':' in a mapping, e.g. {key}={{2: 0.1}}"
            )
    return sets


def _glued_key(value) -> str | None:
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and ":" in k and v is None:
                return k
            if found := _glued_key(v):
                return found
    if isinstance(value, list):
        return next((found for v in value if (found := _glued_key(v))), None)
    return None


@app.command()
def run(
    from_stage: str = typer.Option(
        None, "--from-stage", help="first stage to run (upstream is not recomputed)"
    ),
    to_stage: str = typer.Option(None, "--to-stage", help="last stage to run"),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        metavar="KEY=VALUE",
        help=(
            "parameter override written to the profile's params file (params.yaml; --profile vl: "
            "params.vl.yaml), e.g. cpt.max_steps=50; the line's comment then starts with the value it "
            "replaced, '(--set: max_steps was 100)', until the file's value is set again"
        ),
    ),
    push: bool = typer.Option(True, "--push/--no-push", help="push results to the DVC remote"),
    force: bool = typer.Option(
        False, "--force", help="recompute the selected stages even if DVC finds them up to date"
    ),
    profile: str = typer.Option(
        "text",
        "--profile",
        help="text (dvc.yaml, params.yaml) | vl (profiles/vl/dvc.yaml, params.vl.yaml: vision-language)",
    ),
) -> None:
    """Run the whole pipeline through Prefect (its own API server, nothing to start), then print a summary.

    Without PREFECT_API_URL the run starts a private Prefect server on a free port (the UI's address is
    printed) and stops it at the end; with it, the run reports to that server. Ctrl-C or SIGTERM stops
    the run within seconds: the running stage is interrupted and not recorded, finished stages are kept,
    and the next run resumes from there. On a machine whose other work leaves too few CPUs for the params'
    `threads`, it warns first, or when that happens later in the run (OMP_NUM_THREADS=1 gives the same
    outputs in the tiny profile on AVX2 CPUs); the last lines name the machine (its CPU) and say how
    much CPU other work took during the run.

    Exit codes: 0 done; 2 a stage failed on its input or parameters (not retried); 1 an infrastructure
    error that persisted through the retries (a killed stage, an unreachable server, a failed push);
    130 interrupted by Ctrl-C (SIGINT), 143 by SIGTERM.
    """
    import atexit
    import os
    import tempfile
    from contextlib import nullcontext
    from pathlib import Path

    from flows import prefect_server
    from flows.machine import check_threads, machine_line, watch_run
    from flows.pipeline import (
        InfrastructureError,
        StageFailed,
        dvc_stage_order,
        profile_files,
        ruyi_pipeline,
        select_stages,
    )
    from flows.processes import sigterm_as_interrupt
    from flows.report import print_summary, print_vl_summary
    from tasks.core.params import ParamsError, load_params

    server = log_file = watch = None
    failed_start = False
    with sigterm_as_interrupt() as received:  # SIGTERM as Ctrl-C: unwind through the flow and `finally`
        try:
            dvc_file, params_file = profile_files(profile)
            sets = _parse_sets(overrides)
            # What the flow would refuse, refused here first: inside the flow Prefect logs a traceback.
            workspace = Path(os.environ.get("RUYI_WORKSPACE") or ".").resolve()
            if not (workspace / dvc_file).is_file():
                raise ValueError(f"workspace {workspace} has no {dvc_file}")
            selected = select_stages(dvc_stage_order(workspace, dvc_file), from_stage, to_stage)
            params = load_params(workspace / params_file, sets)
            if warning := check_threads(params.threads, params_file):
                typer.echo(warning, err=True)
            # what else used the CPUs meanwhile: said once if it starts competing with the stages'
            # threads, and after the summary for the whole run
            watch = watch_run(params.threads, params_file, lambda m: typer.echo(m, err=True))
            with watch:
                api_settings = nullcontext()
                if not os.environ.get("PREFECT_API_URL"):
                    from prefect.settings import PREFECT_API_URL, temporary_settings

                    # The same setting as Prefect's embedded server (default raised from its 20 s: a busy
                    # machine, or several runs starting at once with empty Prefect homes).
                    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90"))
                    fd, name = tempfile.mkstemp(prefix="ruyi-prefect-server-", suffix=".log")
                    os.close(fd)
                    log_file = Path(name)
                    port = prefect_server.free_port()
                    server = prefect_server.start(port, timeout, log_file=log_file)
                    # Stopped at interpreter exit, after Prefect's log and event workers have drained into
                    # it (they drain in threading's exit hooks, which run before atexit's): stopped earlier,
                    # it left them retrying against a closed port for a minute.
                    atexit.register(_stop_run_server, server, log_file)
                    typer.echo(
                        f"Prefect UI of this run: http://127.0.0.1:{port} (until the run ends)", err=True
                    )
                    api_settings = temporary_settings({PREFECT_API_URL: prefect_server.api_url(port)})
                with api_settings:
                    ruyi_pipeline(
                        from_stage=from_stage,
                        to_stage=to_stage,
                        overrides=sets,
                        push=push,
                        force=force,
                        profile=profile,
                    )
        except KeyboardInterrupt:
            name = "SIGTERM" if received else "Ctrl-C (SIGINT)"
            typer.echo(
                f"interrupted by {name}: the running stage was stopped and is not recorded; finished "
                "stages are kept, and `ruyi run` resumes from the first stage that is not up to date",
                err=True,
            )
            raise typer.Exit(143 if received else 130) from None
        except (StageFailed, ParamsError, ValueError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except InfrastructureError as e:
            typer.echo(
                f"error: {e}\n(the retries did not help; fix the cause and run again: finished stages "
                "are kept)",
                err=True,
            )
            raise typer.Exit(1) from None
        except Exception as e:
            reason = _prefect_unreachable(e)
            if reason is None:
                raise
            failed_start = isinstance(e, prefect_server.ServerError)
            typer.echo(
                f"error: cannot reach the Prefect API ({reason}).\n"
                "An infrastructure error, not a problem of the pipeline: run again. Several `ruyi run` "
                "starting at once with empty Prefect homes can each take long to start their server; start "
                "one (`ruyi server`, then PREFECT_API_URL=http://127.0.0.1:4200/api) "
                "or raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (ruyi's default: 90).",
                err=True,
            )
            raise typer.Exit(1) from None
        finally:
            # Only a server that failed to start keeps its log (the error names it); one interrupted
            # while starting was stopped, and its log goes (a started server's goes at exit,
            # _stop_run_server).
            if log_file is not None and server is None and not failed_start:
                log_file.unlink(missing_ok=True)
    # the summary reads the workspace the flow ran in (RUYI_WORKSPACE, else here)
    params_path = Path(os.environ.get("RUYI_WORKSPACE") or ".") / params_file
    if profile == "vl":
        print_vl_summary(params_path, ran=selected, dvc_file=dvc_file)
    else:
        print_summary(params_path, ran=selected, dvc_file=dvc_file)
    if watch is not None:
        typer.echo(machine_line())
        typer.echo(watch.summary())


def _stop_run_server(server, log_file) -> None:
    """`ruyi run`'s exit hook: stops its Prefect server and deletes the server's log."""
    from flows import prefect_server

    prefect_server.stop(server)
    log_file.unlink(missing_ok=True)


def _prefect_unreachable(error: BaseException) -> str | None:
    """Why `error` means the Prefect API could not be reached (the run's server did not start, a
    connection failed), or None for any other error."""
    import httpx

    from flows.prefect_server import ServerError

    text = str(error)
    if isinstance(error, ServerError):
        return text
    if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout)):
        return f"{type(error).__name__}: {text}"
    return None


@app.command()
def audit(
    rev: str = typer.Option(
        "HEAD", "--rev", help="the git revision whose recorded run (dvc.lock) is audited"
    ),
    remote: str = typer.Option(
        None,
        "--remote",
        help="DVC remote to pull the recorded outputs from "
        "(default: the configured default remote, if it answers)",
    ),
    pull: bool = typer.Option(True, "--pull/--no-pull", help="pull the recorded outputs before reproducing"),
    keep: bool = typer.Option(False, "--keep", help="keep the temporary clean clone (its path is printed)"),
    to_stage: str = typer.Option(None, "--to-stage", help="audit only this stage and its upstream (quicker)"),
    json_out: str = typer.Option(None, "--json", help="also write the verdicts to this JSON file"),
    profile: str = typer.Option(
        "text",
        "--profile",
        help="text (dvc.yaml, dvc.lock) | vl (profiles/vl/dvc.yaml and its lock: vision-language)",
    ),
) -> None:
    """Reproduce a recorded run in a clean clone and compare every output with its lock file.

    Prints one row per output: reproduced (bitwise), differs (files named), measured (not compared),
    missing, or unrecorded (an output dvc.yaml gained after the run was recorded); where outputs differ
    though nothing recorded changed, the first one and where to look (threads, CPU kernels). The
    reproduced deploy publishes to a store inside the clone and serves on a free port, never the
    recorded store or port.
    On a machine too busy for the audited params' `threads`, it warns before the reproduction.
    Ctrl-C or SIGTERM stops the reproduction (DVC and its stage) within seconds and removes the clone
    (unless --keep).
    Exit codes: 0 every reproducible output matched; 1 something differs, is missing, unrecorded, stale or
    corrupt;
    2 the audit could not run (no recording at the revision, a failed pull or stage); 130 interrupted by
    Ctrl-C (SIGINT), 143 by SIGTERM.
    """
    from flows.audit import AuditError, print_report
    from flows.audit import audit as run_audit
    from flows.processes import sigterm_as_interrupt

    with sigterm_as_interrupt() as received:  # SIGTERM as Ctrl-C: the audit's `finally` removes the clone
        try:
            report = run_audit(
                ".",
                rev=rev,
                remote=remote,
                pull=pull,
                keep=keep,
                to_stage=to_stage,
                log=lambda line: typer.echo(line),
                profile=profile,
            )
        except (AuditError, ValueError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            name = "SIGTERM" if received else "Ctrl-C (SIGINT)"
            typer.echo(f"interrupted by {name}: the audit stopped, nothing was compared", err=True)
            raise typer.Exit(143 if received else 130) from None
    print_report(report)
    if json_out:
        import json

        with open(json_out, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def deployments(cron: str = typer.Option("0 2 * * *", help="schedule of the nightly deployment")) -> None:
    """Serve the `nightly`, `rerun` and `audit` deployments against PREFECT_API_URL (blocks).

    Without an API URL (environment or Prefect profile) it exits 2: Prefect would serve them on a
    throwaway embedded API that runs no scheduler (the crons never fire) and that no UI can see."""
    from prefect.settings import get_current_settings

    from flows.deployments import serve_deployments

    if not get_current_settings().api.url:
        typer.echo(
            "error: PREFECT_API_URL is not set: the deployments need a Prefect server to register with "
            "(its scheduler runs the crons, its UI the reruns). Start one and serve them with `ruyi server`, "
            "or set PREFECT_API_URL=http://<host>:4200/api",
            err=True,
        )
        raise typer.Exit(2)
    serve_deployments(cron=cron)


@app.command()
def server(
    port: int = typer.Option(4200, help="Prefect server port on 127.0.0.1"),
    cron: str = typer.Option("0 2 * * *", help="schedule of the nightly deployment"),
    startup_timeout: float = typer.Option(120.0, help="seconds to wait for the Prefect server to be healthy"),
) -> None:
    """Start a Prefect server on 127.0.0.1 and serve the deployments: open the UI and rerun any stage.

    Stops on Ctrl-C or SIGTERM, taking the Prefect server (its whole process group) down with it.
    """
    import os

    from flows import prefect_server
    from flows.processes import sigterm_as_interrupt

    if prefect_server.port_in_use(port):
        typer.echo(
            f"error: port {port} on 127.0.0.1 is already in use (another Prefect server?); "
            "choose another with --port",
            err=True,
        )
        raise typer.Exit(2)

    proc = None
    with sigterm_as_interrupt():  # SIGTERM as Ctrl-C: `finally` stops the server
        try:
            try:
                proc = prefect_server.start(port, startup_timeout)
            except prefect_server.ServerError as e:
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(1) from None
            typer.echo(
                f"Prefect UI: http://127.0.0.1:{port}  (deployments: ruyi-pipeline/nightly, "
                "ruyi-pipeline/rerun, ruyi-audit/audit)"
            )
            os.environ["PREFECT_API_URL"] = prefect_server.api_url(port)
            from flows.deployments import serve_deployments

            serve_deployments(cron=cron)
        except KeyboardInterrupt:
            typer.echo("stopping the deployments and the Prefect server", err=True)
        finally:
            if proc is not None:
                prefect_server.stop(proc)


@app.command()
def serve(
    version: str = typer.Option(
        None,
        "--version",
        help="release version to serve (default: the newest release that passed the deploy smoke test)",
    ),
    host: str = typer.Option(None, "--host", help="HTTP host (default: deploy.host)"),
    port: int = typer.Option(None, "--port", help="HTTP port (default: deploy.port)"),
    params: str = typer.Option("params.yaml", "--params", help="params file (store and serving settings)"),
    overrides: list[str] = typer.Option(
        [], "--set", metavar="KEY=VALUE", help="parameter override (repeatable)"
    ),
) -> None:
    """Serve a release from the artifact store with Ray Serve (OpenAI-style API) until Ctrl-C."""
    from tasks.deploy import serve_main

    raise typer.Exit(serve_main(params, overrides, version=version, host=host, port=port))


def main() -> None:
    app(prog_name="ruyi")


if __name__ == "__main__":
    sys.exit(main())
