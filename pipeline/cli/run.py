"""`tune run`: every flag of the pipeline into a RunConfig, then the RunResult rendered."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli.common import JsonSummary, TrackingUri, app, err, guard, out
from pipeline.cli.progress import ProgressView, StopRequest


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
    tracking_uri: TrackingUri = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment (default: the model name).")] = None,
    skip_untuned: Annotated[bool, typer.Option(help="Do not build and measure the untuned module.")] = False,
    tolerance: Annotated[float, typer.Option(help="Max relative output error against ONNX Runtime.")] = 1e-3,
    repeats: Annotated[int, typer.Option(help="Timed calls per runner (at most).")] = 50,
    measure_seconds: Annotated[float, typer.Option(help="Time cap per runner while measuring.")] = 5.0,
    model_option: Annotated[list[str] | None, typer.Option(help="Zoo model option KEY=VALUE (repeatable), e.g. layers=2.")] = None,
    input_shape: Annotated[list[str] | None, typer.Option(help="Fix an input shape NAME=D1,D2,... (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for inputs and search.")] = 0,
    winograd: Annotated[bool | None, typer.Option("--winograd/--no-winograd", help="Winograd 3x3 convs (default: the target preset's choice).")] = None,
    roofline: Annotated[bool, typer.Option(help="Profile every kernel and plot it against this machine's roofline.")] = True,
    profile_runs: Annotated[int, typer.Option(help="Inferences the per-kernel profile averages.")] = 10,
    ceilings_dir: Annotated[Path | None, typer.Option(help="Cache of measured machine ceilings (default ~/.cache/tvm-autotune/ceilings).")] = None,
    register: Annotated[bool, typer.Option(help="Register the verified artifact as an MLflow model version.")] = True,
    export_fastest: Annotated[bool, typer.Option("--export-fastest/--export-tuned", help="Export the default-scheduled build when it measured over 3 percent faster than the tuned one (needs the untuned measurement).")] = True,
    quantize: Annotated[str, typer.Option(help="none or int8 (post-training static quantization).")] = "none",
    calibration: Annotated[Path | None, typer.Option(help="int8 calibration inputs: .npy, .npz (by input name) or an image folder; default: seeded synthetic inputs (warned, tagged).")] = None,
    calibration_method: Annotated[str, typer.Option(help="Activation range: minmax, percentile, entropy or mse.")] = "percentile",
    calibration_samples: Annotated[int, typer.Option(help="Calibration batches used.")] = 16,
    keep_fp32: Annotated[str | None, typer.Option(help="Layers kept in fp32, e.g. conv2d_0,matmul_0 (names in runs/<run>/quantization.json).")] = None,
    max_accuracy_drop: Annotated[float, typer.Option(help="int8: fail the run when accuracy drops more than this many points.")] = 1.0,
    accuracy_samples: Annotated[int, typer.Option(help="int8: seeded inputs the accuracy gate compares against fp32.")] = 50,
    accuracy_data: Annotated[Path | None, typer.Option(help="int8: labelled real data for the gate, a .npz of the inputs by name plus 'labels'.")] = None,
    fallback_rounds: Annotated[int, typer.Option(help="int8: rounds that move the most sensitive layers back to fp32 (1, 2, 4, ...) before the run fails.")] = 4,
    sparse: Annotated[str, typer.Option(help="auto: BSR kernels for weights sparse enough where measured faster; on: all of those, unmeasured; off.")] = "off",
    sparse_threshold: Annotated[float, typer.Option(help="Block sparsity a weight needs to be considered for BSR.")] = 0.7,
    block: Annotated[str, typer.Option(help="BSR block RxC of the [K, N] weight (R inputs x C outputs), or auto (1 x vector lanes).")] = "auto",
    show_passes: Annotated[bool, typer.Option(help="Print the graph-pass list first.")] = False,
    rpc: Annotated[str | None, typer.Option(help="Measure on the servers of this TVM RPC tracker, HOST:PORT (builds stay local).")] = None,
    rpc_key: Annotated[str | None, typer.Option(help="Device key the RPC servers registered under.")] = None,
    tuning_db: Annotated[str | None, typer.Option(help="Tuning records in PostgreSQL (postgresql://user@host/db) instead of the JSON files.")] = None,
    precision: Annotated[str, typer.Option(help="fp32, or fp16 / bf16 mixed precision (conv/matmul in half precision, fp32 accumulation; judged by --max-accuracy-drop).")] = "fp32",
    as_json: JsonSummary = False,
) -> None:
    """Import, optimise, tune, verify, measure, record and export one model."""
    guard(_run, **locals())


def _run(model, target, budget, trials, trials_per_task, time_budget, tuning_logs, out_dir, runs_dir,
         tracking_uri, experiment, skip_untuned, tolerance, repeats, measure_seconds, model_option,
         input_shape, seed, winograd, roofline, profile_runs, ceilings_dir, register,
         export_fastest, quantize, calibration, calibration_method, calibration_samples, keep_fp32,
         max_accuracy_drop, accuracy_samples, accuracy_data, fallback_rounds, sparse,
         sparse_threshold, block, show_passes, rpc, rpc_key, tuning_db, precision,
         as_json) -> None:
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
        measure=MeasureSettings(repeats=repeats, max_seconds=measure_seconds), seed=seed,
        winograd=winograd, roofline=roofline, profile_runs=profile_runs, ceilings_dir=ceilings_dir,
        register=register, export_fastest=export_fastest, quantize=_quantize_mode(quantize),
        calibration=calibration, calibration_method=calibration_method,
        calibration_samples=calibration_samples,
        keep_fp32=[n.strip() for n in (keep_fp32 or "").split(",") if n.strip()],
        max_accuracy_drop=max_accuracy_drop, accuracy_samples=accuracy_samples,
        accuracy_data=accuracy_data, fallback_rounds=fallback_rounds, sparse=sparse,
        sparse_threshold=sparse_threshold, sparse_block=block, rpc=rpc, rpc_key=rpc_key,
        tuning_db=tuning_db, precision=precision)
    err.print(budget_line)
    if show_passes:
        _print_passes(target, winograd, precision)
    stop = StopRequest()
    stop.install()
    view = ProgressView(enabled=True)
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
            "roofline": result.roofline, "registered": result.registered,
            "exported": result.exported, "quantization": result.quantization,
            "sparse": result.sparse,
            "run_dir": result.run_dir}))


def _quantize_mode(value: str) -> str:
    from pipeline.errors import UserError

    if value not in ("none", "int8"):
        raise UserError(f"unknown --quantize {value!r}: use none or int8")
    return value


def _print_passes(target: str, winograd: bool | None, precision: str = "fp32") -> None:
    from pipeline.passes import describe_passes, preset_passes
    from pipeline.targets import resolve_target

    resolved = resolve_target(target)
    out.print(f"[bold]graph passes for {resolved.preset}[/] (before tuning, then after it)")
    passes, post = preset_passes(resolved.tuning, winograd, precision)
    for line in describe_passes(passes + post):
        out.print(line)


def _print_result(r) -> None:
    out.print(f"[bold]{r.model}[/] on [bold]{r.preset}[/] ({r.target_reason})")
    out.print(f"tasks {r.tasks} | trials new {r.trials_new}, reused {r.trials_reused} "
              f"({r.tune_stop_reason}) | kernels scheduled {r.scheduled_kernels}")
    v = r.verification
    if v.get("skipped"):
        out.print(f"[yellow]verification, measurement and roofline skipped[/]: {v['skipped']}")
    elif v.get("accuracy"):
        a, q = v["accuracy"], r.quantization
        if q:
            out.print(f"int8: {q['int8_layers']}/{q['layers']} layers ({q['int8_macs_fraction']:.0%} of MACs), "
                      f"calibration {q['method']} on {q['calibration']}"
                      + (" [yellow](synthetic: pass --calibration)[/]" if q["synthetic"] else ""))
        against = "ONNX Runtime on the QDQ model" if q.get("source") == "qdq" else "fp32"
        against += f" ({r.precision} build)" if r.precision != "fp32" else ""
        out.print(f"accuracy vs {against} ({a['kind']}, {a['samples']} samples): drop "
                  f"{a['drop_points']:.2f} points (bound {a['max_drop_points']:g})"
                  + (f", top-1 agreement {a['top1_agreement']:.1%}" if a.get("top1_agreement") is not None
                     else "") + (f", min cosine {a['min_cosine']:.4f}" if a.get("min_cosine") is not None
                                 else ""))
    else:
        out.print(f"verified against ONNX Runtime: max rel err {v['max_rel_err']:.2e}, "
                  f"cosine {v['min_cosine']:.6f} (tolerance {v['tolerance']:g})")
    table = Table("runner", "median ms", "p90 ms", "p99 ms", "samples", "tuned speedup")
    for name, stats in r.latency.items():
        speed = r.speedups.get(f"tuned_vs_{name}")
        table.add_row(name, f"{stats['median_ms']:.3f}", f"{stats['p90_ms']:.3f}",
                      f"{stats['p99_ms']:.3f}", str(stats["samples"]),
                      f"{speed:.2f}x" if speed else "-")
    if r.latency:   # none when the module cannot run here
        out.print(table)
    if r.roofline:
        roof = r.roofline
        out.print(f"roofline: kernels at {roof['fraction']:.0%} of attainable (time-weighted); "
                  f"ceilings {roof['peak_gflops']:g} GFLOP/s fp32, {roof['peak_int8_gops']:g} "
                  f"GOP/s int8, {roof['bandwidth_gbs']:g} GB/s; "
                  f"plot {roof['dir']}/roofline.png")
    out.print(f"artifact: {r.artifact}" + (f" | model version {r.registered}" if r.registered else ""))
    if r.exported != "tuned":
        out.print("[yellow]exported the default-scheduled build[/]: it ran faster than the tuned one "
                  "in this run (--export-tuned to override)")
    out.print(f"mlflow run: {r.mlflow_run_id} | run folder: {r.run_dir}")
