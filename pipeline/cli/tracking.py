"""The MLflow side: `tune compare` (runs side by side), `tune promote` (the champion alias) and
`tune ui` (the MLflow UI on the project's store)."""

from __future__ import annotations

import json
import signal
import time
from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli.common import TrackingUri, app, guard, out


@app.command()
def compare(
    run_ids: Annotated[list[str] | None, typer.Argument(help="MLflow run ids (or use --model).")] = None,
    model: Annotated[str | None, typer.Option(help="Compare the latest runs of this model.")] = None,
    preset: Annotated[str | None, typer.Option(help="... on this preset only.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many runs with --model.")] = 10,
    tracking_uri: TrackingUri = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line instead of the table.")] = False,
) -> None:
    """Runs side by side: latency, speedups, tuning cost, roofline fraction."""
    guard(_compare, run_ids, model, preset, limit, tracking_uri, as_json)


def _compare(run_ids, model, preset, limit, tracking_uri, as_json) -> None:
    from pipeline.compare import compare_runs

    rows = compare_runs(_client(tracking_uri), run_ids, model, preset, limit)
    if as_json:
        print(json.dumps([r.as_dict() for r in rows]))
        return
    # One column per run, so a few runs fit any terminal side by side.
    baselines = sorted({b for r in rows for b in r.speedups if b != "untuned"})
    fields = [("started", lambda r: r.started), ("model", lambda r: r.model),
              ("preset", lambda r: r.preset), ("status", lambda r: r.status),
              ("verified", lambda r: "yes" if r.verified else "no"),
              ("tuned ms", lambda r: _fmt(r.latency_ms, "{:.3f}")),
              *[(f"vs {b}", lambda r, b=b: _fmt(r.speedups.get(b), "{:.2f}x")) for b in baselines],
              ("trials new", lambda r: _fmt(r.trials_new, "{}")),
              ("trials reused", lambda r: _fmt(r.trials_reused, "{}")),
              ("tune s", lambda r: _fmt(r.tune_wall_s, "{:.0f}")),
              ("roofline", lambda r: _fmt(r.roofline_fraction, "{:.0%}")),
              ("version", lambda r: r.model_version or "-")]
    table = Table("run", *[r.run_id[:12] for r in rows])
    for label, get in fields:
        table.add_row(label, *[get(r) for r in rows])
    out.print(table)
    out.print("speedup = baseline latency / tuned latency (higher is better)")


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _client(tracking_uri):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import quiet_mlflow
    from pipeline.tracking import tracking_uri as resolve_uri

    quiet_mlflow()
    return MlflowClient(tracking_uri=resolve_uri(tracking_uri))


@app.command()
def promote(
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (as in `tune run`).")],
    target: Annotated[str, typer.Option(help="Preset name, or auto.")] = "auto",
    tracking_uri: TrackingUri = None,
) -> None:
    """Point the `champion` alias at the fastest verified model version of MODEL on the preset."""
    guard(_promote, model, target, tracking_uri)


def _promote(model, target, tracking_uri) -> None:
    from pipeline.registry import CHAMPION, promote_best
    from pipeline.targets import resolve_target

    preset = resolve_target(target).preset
    p = promote_best(_client(tracking_uri), model, preset)
    moved = "kept" if p.previous == p.version else f"moved from version {p.previous}" \
        if p.previous else "set"
    out.print(f"{p.name}@{CHAMPION} -> version {p.version} ({p.latency_ms:.3f} ms, fastest of "
              f"{p.candidates} verified; {moved})")
    out.print(f'load it: mlflow.pyfunc.load_model("models:/{p.name}@{CHAMPION}")')


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: any free port).")] = 5000,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow store (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")] = None,
) -> None:
    """Start the MLflow UI on 127.0.0.1 against the project's store; Ctrl-C stops it."""
    guard(_ui, port, tracking_uri)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _ui(port, tracking_uri) -> None:
    from pipeline.tracking import serve_ui
    from pipeline.tracking import tracking_uri as resolve_uri

    uri = resolve_uri(tracking_uri)
    # SIGTERM (a service manager, a test) ends like Ctrl-C, so the server is stopped too; Python's
    # default would exit at once and leave the MLflow server and its workers running.
    signal.signal(signal.SIGTERM, _interrupt)
    with serve_ui(uri, port) as url:
        out.print(f"MLflow UI: {url}  (store {uri}; Ctrl-C to stop)", highlight=False)
        print(url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
