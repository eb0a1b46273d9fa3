"""`tune nightly`: every job of a nightly config, then its summary; exit 1 when one failed or regressed,
130 when stopped by SIGINT/SIGTERM (the job in flight keeps its finished records)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import JsonSummary, TrackingUri, TuningLogsRoot, app, guard, out
from pipeline.cli.progress import print_stage


@app.command()
def nightly(
    config: Annotated[Path, typer.Option("--config", "-c", help="The jobs, e.g. nightly.toml (see docs/nightly.md).")],
    tuning_logs: TuningLogsRoot = Path("tuning_logs"),
    out_dir: Annotated[Path, typer.Option("--out", help="Where each night's summary folder goes.")] = Path("nightly"),
    artifacts: Annotated[Path, typer.Option(help="Where artifacts are exported.")] = Path("artifacts"),
    runs_dir: Annotated[Path, typer.Option(help="Where run folders go.")] = Path("runs"),
    tracking_uri: TrackingUri = None,
    rpc: Annotated[str | None, typer.Option(help="Measure on this RPC tracker's servers, HOST:PORT.")] = None,
    rpc_key: Annotated[str | None, typer.Option(help="Device key of the RPC servers.")] = None,
    tuning_db: Annotated[str | None, typer.Option(help="Tuning records in PostgreSQL instead of the JSON files.")] = None,
    as_json: JsonSummary = False,
) -> None:
    """Run every [[job]] of the config: resume tuning, build, verify, compare with the champion,
    promote only when faster beyond noise. Exit 1 after all jobs when one failed or regressed;
    exit 130 when SIGINT/SIGTERM stopped the night (the job in flight keeps its finished records,
    the jobs after it are marked skipped)."""
    guard(_nightly, config, tuning_logs, out_dir, artifacts, runs_dir, tracking_uri, rpc, rpc_key,
          tuning_db, as_json)


def _nightly(config, tuning_logs, out_dir, artifacts, runs_dir, tracking_uri, rpc, rpc_key, tuning_db,
             as_json) -> None:
    from pipeline.nightly import render_markdown, run_nightly

    report = run_nightly(config, tuning_logs, out_dir, tracking_uri, artifacts, runs_dir,
                         {"rpc": rpc, "rpc_key": rpc_key, "tuning_db": tuning_db},
                         progress=print_stage)
    out.print(render_markdown(report))
    out.print(f"summary: {report.folder}/summary.md")
    if as_json:
        print(json.dumps({"folder": report.folder, "exit_code": report.exit_code,
                          "mlflow_run_id": report.mlflow_run_id, "jobs": report.jobs}, default=str))
    if report.exit_code:
        raise typer.Exit(report.exit_code)
