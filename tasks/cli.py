"""`ruyi`: the command line of ruyi-pipeline.

Heavy libraries (torch, transformers, prefect, ray) are imported inside the commands, so
`ruyi --help` answers instantly.
"""

from __future__ import annotations

import importlib
import sys

import typer

STAGES = ["prepare_data", "validate_data", "tokenizer", "cpt", "expand", "sft", "rl", "compress",
          "evaluate", "export", "deploy"]

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ruyi-pipeline: train once, deploy many (familial Ruyi2-style models).")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []})
def stage(ctx: typer.Context, name: str = typer.Argument(..., help=f"one of: {', '.join(STAGES)}")) -> None:
    """Run one pipeline stage without Prefect or DVC (`ruyi stage cpt --help` for its options)."""
    if name not in STAGES:
        typer.echo(f"error: unknown stage {name!r}; stages: {', '.join(STAGES)}", err=True)
        raise typer.Exit(2)
    module = importlib.import_module(f"tasks.{name}")
    raise typer.Exit(module.main(list(ctx.args)))


def main() -> None:
    app(prog_name="ruyi")


if __name__ == "__main__":
    sys.exit(main())
