"""`tune`: the command line. It parses flags, calls one library function, and renders the result."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.errors import PipelineError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Autotune neural networks with Apache TVM: import, tune, verify, measure, "
                       "record in MLflow, export.")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
_debug = False


def _fail(exc: BaseException) -> None:
    if _debug:
        raise exc
    code = exc.exit_code if isinstance(exc, PipelineError) else 1
    message = str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
    err.print(f"[bold red]error:[/] {message.splitlines()[0] if message else type(exc).__name__}")
    raise typer.Exit(code)


def _guard(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: finished tuning records are kept in the tuning logs")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001  (every failure becomes one line unless --debug)
        _fail(exc)


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


class _ProgressView:
    """Renders ProgressEvents: one line per stage, a live bar while tuning."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), console=err, transient=False)
        self.tune_id = None

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        if event.stage != "tune" or event.n_tasks is None:
            if self.tune_id is not None:
                self.bar.stop()
                self.tune_id = None
            err.print(f"[cyan]{event.stage:>8}[/] {event.message}")
            return
        best = f"best {event.best_ms:.2f} ms" if event.best_ms is not None else "best: not all tasks measured"
        eta = f"ETA {event.eta_s:.0f}s" if event.eta_s is not None else ""
        info = (f"task {event.task_index + 1}/{event.n_tasks} | trials {event.trials_done}/"
                f"{event.trials_total} | {best} | {eta}")
        if self.tune_id is None:
            self.bar.start()
            self.tune_id = self.bar.add_task("tuning", total=event.trials_total, info=info)
        self.bar.update(self.tune_id, completed=event.trials_done, info=info)

    def close(self) -> None:
        if self.tune_id is not None:
            self.bar.stop()


class _StopRequest:
    """Ctrl-C or SIGTERM asks for a clean stop: the current measurement finishes, its record is
    committed, the MLflow run is marked KILLED. A second signal stops at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def install(self) -> None:
        def on_signal(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            err.print("[yellow]stopping after the current measurement[/] (signal again to force)")
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)


@app.command()
def run(
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo name (see `tune models`) or .onnx path.")],
    target: Annotated[str, typer.Option(help="auto, a preset name (see `tune targets`) or a JSON TVM target.")] = "auto",
    budget: Annotated[str, typer.Option(help="Tuning budget preset: quick, default or full (see README).")] = "quick",
    trials: Annotated[int | None, typer.Option(help="Total trials the model may have in the database; 0 = no search (overrides --budget).")] = None,
    trials_per_task: Annotated[int | None, typer.Option(help="Cap per task (default: the budget's, or --trials spread evenly).")] = None,
    time_budget: Annotated[str | None, typer.Option(help="Stop tuning after this long, e.g. 30m, 90s, 1h (overrides --budget).")] = None,
    tuning_logs: Annotated[Path, typer.Option(help="Root of the MetaSchedule databases (one folder per preset).")] = Path("tuning_logs"),
    out_dir: Annotated[Path, typer.Option("--out", help="Where artifacts are exported.")] = Path("artifacts"),
    runs_dir: Annotated[Path, typer.Option(help="Where run folders (logs, summary) go.")] = Path("runs"),
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment (default: the model name).")] = None,
    skip_untuned: Annotated[bool, typer.Option(help="Do not build and measure the untuned module.")] = False,
    tolerance: Annotated[float, typer.Option(help="Max relative output error against ONNX Runtime.")] = 1e-3,
    repeats: Annotated[int, typer.Option(help="Timed calls per runner (at most).")] = 50,
    measure_seconds: Annotated[float, typer.Option(help="Time cap per runner while measuring.")] = 5.0,
    model_option: Annotated[list[str] | None, typer.Option(help="Zoo model option KEY=VALUE (repeatable), e.g. layers=2.")] = None,
    input_shape: Annotated[list[str] | None, typer.Option(help="Fix an input shape NAME=D1,D2,... (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for inputs and search.")] = 0,
    show_passes: Annotated[bool, typer.Option(help="Print the graph-pass list first.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="End stdout with one JSON summary line.")] = False,
) -> None:
    """Import, optimise, tune, verify, measure, record and export one model."""
    _guard(_run, **locals())


def _run(model, target, budget, trials, trials_per_task, time_budget, tuning_logs, out_dir, runs_dir,
         tracking_uri, experiment, skip_untuned, tolerance, repeats, measure_seconds, model_option,
         input_shape, seed, show_passes, as_json) -> None:
    from pipeline.config import RunConfig, parse_model_options, parse_shape_overrides, resolve_budget
    from pipeline.measure import MeasureSettings
    from pipeline.run import run_pipeline
    tune_budget, budget_line = resolve_budget(budget, trials, trials_per_task, time_budget)
    config = RunConfig(
        model=model, model_options=parse_model_options(model_option or []),
        input_shapes=parse_shape_overrides(input_shape or []), target=target,
        budget=tune_budget,
        tuning_logs=tuning_logs, out=out_dir, runs_dir=runs_dir, tracking_uri=tracking_uri,
        experiment=experiment, skip_untuned=skip_untuned, tolerance=tolerance,
        measure=MeasureSettings(repeats=repeats, max_seconds=measure_seconds), seed=seed)
    err.print(budget_line)
    if show_passes:
        _print_passes(target)
    stop = _StopRequest()
    stop.install()
    view = _ProgressView(enabled=True)
    try:
        result = run_pipeline(config, progress=view, should_stop=stop)
    finally:
        view.close()
    _print_result(result)
    if as_json:
        print(json.dumps({
            "model": result.model, "preset": result.preset, "tasks": result.tasks,
            "trials_new": result.trials_new, "trials_reused": result.trials_reused,
            "latency_ms": result.latency_ms, "speedups": result.speedups,
            "verified": result.verified, "artifact": result.artifact,
            "mlflow_run_id": result.mlflow_run_id, "stop_reason": result.tune_stop_reason,
            "kernels_scheduled": result.scheduled_kernels, "verification": result.verification,
            "stage_seconds": result.stage_seconds, "tune_curve": result.tune_curve,
            "run_dir": result.run_dir}))


def _print_passes(target: str) -> None:
    from pipeline.passes import describe_passes, graph_passes, post_tuning_passes
    from pipeline.targets import resolve_target

    resolved = resolve_target(target)
    prepack = bool(resolved.tuning.get("weight_prepack", False))
    out.print(f"[bold]graph passes for {resolved.preset}[/] (before tuning, then after it)")
    for line in describe_passes(graph_passes(resolved.tuning.get("layout", "NCHW"), prepack)
                                + post_tuning_passes(prepack)):
        out.print(line)


def _print_result(r) -> None:
    out.print(f"[bold]{r.model}[/] on [bold]{r.preset}[/] ({r.target_reason})")
    out.print(f"tasks {r.tasks} | trials new {r.trials_new}, reused {r.trials_reused} "
              f"({r.tune_stop_reason}) | kernels scheduled {r.scheduled_kernels}")
    v = r.verification
    out.print(f"verified against ONNX Runtime: max rel err {v['max_rel_err']:.2e}, "
              f"cosine {v['min_cosine']:.6f} (tolerance {v['tolerance']:g})")
    table = Table("runner", "median ms", "p90 ms", "p99 ms", "samples", "tuned speedup")
    for name, stats in r.latency.items():
        speed = r.speedups.get(f"tuned_vs_{name}")
        table.add_row(name, f"{stats['median_ms']:.3f}", f"{stats['p90_ms']:.3f}",
                      f"{stats['p99_ms']:.3f}", str(stats["samples"]),
                      f"{speed:.2f}x" if speed else "-")
    out.print(table)
    out.print(f"artifact: {r.artifact}")
    out.print(f"mlflow run: {r.mlflow_run_id} | run folder: {r.run_dir}")


@app.command()
def models() -> None:
    """List the zoo: names, input specs, parameter counts and GFLOPs."""
    _guard(_models)


def _models() -> None:
    from pipeline.models import list_models
    from pipeline.models.stats import graph_stats

    table = Table("name", "inputs", "params (M)", "GFLOPs", "description")
    for entry in list_models():
        stats = graph_stats(entry.build())
        inputs = ", ".join(f"{s.name}:{s.dtype}{list(s.shape)}" for s in stats.inputs)
        table.add_row(entry.name, inputs, f"{stats.params / 1e6:.2f}", f"{stats.flops / 1e9:.3f}",
                      entry.description)
    out.print(table)


@app.command()
def targets() -> None:
    """List the target presets and say what `--target auto` picks here, and why."""
    _guard(_targets)


def _targets() -> None:
    from pipeline.targets import detect_host, load_presets, resolve_target

    host = detect_host()
    auto = resolve_target("auto", host)
    table = Table("preset", "requires", "mcpu / arch", "description")
    for p in load_presets().values():
        mark = " [green](auto)[/]" if p.name == auto.preset else ""
        table.add_row(p.name + mark, " ".join(p.requires), p.target.get("mcpu") or p.target.get("arch", ""),
                      p.description)
    out.print(table)
    out.print(f"auto -> [bold]{auto.preset}[/]: {auto.reason}")
    out.print(f"target: {json.dumps(auto.target_dict)}")


@app.command()
def predict(
    artifact: Annotated[Path, typer.Argument(help="An exported artifact folder.")],
    input_path: Annotated[Path | None, typer.Option("--input", "-i", help=".npy (one input) or .npz keyed by input name.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write outputs (.npy, or .npz for several).")] = None,
    check: Annotated[bool, typer.Option(help="Run the stored verification input and compare with the stored output.")] = False,
) -> None:
    """Run an exported artifact (hashes checked; no tuning code is loaded)."""
    _guard(_predict, artifact, input_path, output, check)


def _predict(artifact: Path, input_path, output, check: bool) -> None:
    import numpy as np

    from pipeline.errors import UserError, VerificationError
    from pipeline.export import load_artifact, read_inputs

    if input_path is None and not check:
        raise UserError("pass --input FILE, or --check to replay the verification sample")
    loaded = load_artifact(artifact)
    if check:
        stored = np.load(artifact / "verify.npz")
        inputs = [stored[f"input:{n}"] for n in loaded.input_names()]
        expected = [stored[k] for k in sorted(k for k in stored.files if k.startswith("output:"))]
    else:
        inputs = read_inputs(loaded, input_path)
    results = loaded.model(inputs)
    if check:
        worst = max(float(np.max(np.abs(a - b))) for a, b in zip(results, expected))
        if worst > 0:
            raise VerificationError(f"artifact output differs from the verified output by {worst:.3g}")
        out.print("artifact reproduces the verified output exactly")
    if output is not None:
        if len(results) == 1 and output.suffix == ".npy":
            np.save(output, results[0])
        else:
            np.savez(output, **{s["name"]: r for s, r in zip(loaded.manifest["outputs"], results)})
        out.print(f"wrote {output}")
    elif not check:
        for s, r in zip(loaded.manifest["outputs"], results):
            out.print(f"{s['name']}: shape {list(r.shape)} {r.dtype}, first values {r.ravel()[:5]}")


logs_app = typer.Typer(no_args_is_help=True, help="Curate the tuning logs (one MetaSchedule database per preset).")
app.add_typer(logs_app, name="logs")


@logs_app.command("ship")
def logs_ship(
    preset: Annotated[str, typer.Option(help="Preset name, or auto for this machine's.")] = "auto",
    tuning_logs: Annotated[Path, typer.Option(help="Root of the MetaSchedule databases.")] = Path("tuning_logs"),
) -> None:
    """Keep the best record per workload of a preset's database, gzipped under <preset>/shipped/
    (what a fresh clone starts from; commit it)."""
    _guard(_logs_ship, preset, tuning_logs)


def _logs_ship(preset: str, tuning_logs: Path) -> None:
    from pipeline.errors import UserError
    from pipeline.logs import ship
    from pipeline.targets import resolve_target

    name = resolve_target(preset).preset
    folder = tuning_logs / name
    if not (folder / "database_tuning_record.json").is_file():
        raise UserError(f"no tuning records for preset {name} in {folder}")
    report = ship(folder)
    out.print(f"{name}: {report.workloads} workloads, {report.records} records, "
              f"{report.bytes_written / 1e3:.0f} kB in {report.folder}")


if __name__ == "__main__":
    app()
