"""What every command shares: the typer app, the two consoles, one-line errors, the option types
that several commands declare alike."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pipeline.errors import PipelineError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Autotune neural networks with Apache TVM: import, tune, verify, measure, "
                       "record in MLflow, export.")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
_debug = False

# Options declared alike by several commands (typer copies the OptionInfo for each use).
TrackingUri = Annotated[str | None, typer.Option(
    help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")]
TuningLogsRoot = Annotated[Path, typer.Option(help="Root of the MetaSchedule databases.")]
PresetOrAuto = Annotated[str, typer.Option(help="Preset name, or auto for this machine's.")]
PostgresStore = Annotated[str, typer.Option(help="The PostgreSQL store, postgresql://user@host/db.")]
ModelOptions = Annotated[list[str] | None, typer.Option(help="Zoo model option KEY=VALUE (repeatable).")]
JsonSummary = Annotated[bool, typer.Option("--json", help="End stdout with one JSON summary line.")]


def fail(exc: BaseException) -> None:
    if _debug:
        raise exc
    code = exc.exit_code if isinstance(exc, PipelineError) else 1
    message = str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
    err.print(f"[bold red]error:[/] {message.splitlines()[0] if message else type(exc).__name__}")
    raise typer.Exit(code)


def guard(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: finished tuning records are kept in the tuning logs")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001  (every failure becomes one line unless --debug)
        fail(exc)


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False
         ) -> None:
    global _debug
    _debug = debug
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.DEBUG if debug else logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.DEBUG if debug else logging.INFO)
