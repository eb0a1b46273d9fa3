"""`tune`: the command line. It parses flags, calls one library function, and renders the result."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

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
    as_json: Annotated[bool, typer.Option("--json", help="End stdout with one JSON summary line.")] = False,
) -> None:
    """Import, optimise, tune, verify, measure, record and export one model."""
    _guard(_run, **locals())


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


@app.command()
def models(
    model: Annotated[str | None, typer.Argument(help="Show the sparsity of each linear weight of this zoo model or .onnx file instead.")] = None,
    model_option: Annotated[list[str] | None, typer.Option(help="Zoo model option KEY=VALUE (repeatable).")] = None,
    block: Annotated[str, typer.Option(help="Block RxC for the block-sparsity column.")] = "1x16",
) -> None:
    """List the zoo: names, input specs, parameter counts and GFLOPs (or one model's weight sparsity)."""
    if model is None:
        _guard(_models)
    else:
        _guard(_sparsity, model, model_option, block)


def _sparsity(model: str, model_option, block: str) -> None:
    from pipeline.config import parse_model_options
    from pipeline.importer import load_onnx
    from pipeline.passes.sparse import parse_block
    from pipeline.prune import sparsity_report

    rc = parse_block(block) or (1, 16)
    _, proto, _ = load_onnx(model, parse_model_options(model_option or []))
    table = Table("weight", "op", "shape", "sparsity", f"block sparsity ({rc[0]}x{rc[1]})")
    for r in sparsity_report(proto, rc):
        table.add_row(r.name, r.op, "x".join(map(str, r.shape)), f"{r.sparsity:.1%}",
                      f"{r.block_sparsity:.1%}")
    out.print(table)


@app.command()
def prune(
    model: Annotated[str, typer.Argument(help="Zoo name or .onnx path.")],
    sparsity: Annotated[float, typer.Option(help="Fraction of each linear weight to zero, e.g. 0.9.")] = 0.9,
    block: Annotated[str, typer.Option(help="1x1 (unstructured) or RxC blocks of the [K, N] weight, e.g. 1x16.")] = "1x16",
    out_path: Annotated[Path, typer.Option("--out", help="Where the pruned .onnx goes.")] = Path("pruned.onnx"),
    model_option: Annotated[list[str] | None, typer.Option(help="Zoo model option KEY=VALUE (repeatable).")] = None,
) -> None:
    """Magnitude-prune the MatMul/Gemm/1x1-Conv weights of a model (for `tune run --sparse auto`)."""
    _guard(_prune, model, sparsity, block, out_path, model_option)


def _prune(model: str, sparsity: float, block: str, out_path: Path, model_option) -> None:
    import onnx

    from pipeline.config import parse_model_options
    from pipeline.importer import load_onnx
    from pipeline.passes.sparse import parse_block
    from pipeline.prune import prune_model, sparsity_report

    rc = parse_block(block) or (1, 16)
    _, proto, _ = load_onnx(model, parse_model_options(model_option or []))
    pruned = prune_model(proto, sparsity, rc)
    onnx.save(pruned, out_path)
    rows = sparsity_report(pruned, rc)
    mean = sum(r.sparsity for r in rows) / len(rows)
    out.print(f"pruned {len(rows)} weights to {mean:.1%} zeros ({rc[0]}x{rc[1]} blocks) -> {out_path}")


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
    table = Table("preset", "requires", "mcpu / arch", "published ceilings", "description")
    for p in load_presets().values():
        mark = " [green](auto)[/]" if p.name == auto.preset else ""
        table.add_row(p.name + mark, " ".join(p.requires), p.target.get("mcpu") or p.target.get("arch", ""),
                      _ceilings_line(p.ceilings), p.description)
    out.print(table)
    out.print(f"auto -> [bold]{auto.preset}[/]: {auto.reason}")
    out.print(f"target: {json.dumps(auto.target_dict)}")


def _ceilings_line(c: dict) -> str:
    if "fp32_tflops" in c:
        half = f", fp16 TC {c['fp16_tensor_tflops']:g}" if "fp16_tensor_tflops" in c else ""
        return f"{c['device']}: fp32 {c['fp32_tflops']:g}{half} TFLOP/s, {c['bandwidth_gbs']:g} GB/s"
    if "fp32_flop_per_cycle_per_core" in c:
        int8 = f", int8 {c['int8_op_per_cycle_per_core']}" if "int8_op_per_cycle_per_core" in c else ""
        return f"fp32 {c['fp32_flop_per_cycle_per_core']}{int8} /cycle/core"
    return "-"


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

    from pipeline.cross import check_against_reference
    from pipeline.errors import UserError
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
        out.print(check_against_reference(results, expected, loaded.manifest.get("verification", {})))
    if output is not None:
        if len(results) == 1 and output.suffix == ".npy":
            np.save(output, results[0])
        else:
            np.savez(output, **{s["name"]: r for s, r in zip(loaded.manifest["outputs"], results)})
        out.print(f"wrote {output}")
    elif not check:
        for s, r in zip(loaded.manifest["outputs"], results):
            out.print(f"{s['name']}: shape {list(r.shape)} {r.dtype}, first values {r.ravel()[:5]}")


@app.command()
def roofline(
    ref: Annotated[str | None, typer.Argument(help="MLflow run id, run folder or artifact folder.")] = None,
    calibrate: Annotated[bool, typer.Option(help="Measure this machine's ceilings again (and cache them).")] = False,
    target: Annotated[str, typer.Option(help="Preset whose ceilings --calibrate measures.")] = "auto",
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")] = None,
    ceilings_dir: Annotated[Path | None, typer.Option(help="Ceilings cache (default ~/.cache/tvm-autotune/ceilings).")] = None,
    top: Annotated[int, typer.Option(help="Kernels to list, heaviest first.")] = 15,
) -> None:
    """Show a run's per-kernel roofline, or (--calibrate) measure this machine's ceilings."""
    _guard(_roofline, ref, calibrate, target, tracking_uri, ceilings_dir, top)


def _roofline(ref, calibrate, target, tracking_uri, ceilings_dir, top) -> None:
    from pipeline.errors import UserError
    from pipeline.roofline import find_roofline, read_roofline, weighted_fraction
    from pipeline.tracking import tracking_uri as resolve_uri

    if calibrate:
        from pipeline import tvm_compat
        from pipeline.roofline import machine_ceilings
        from pipeline.runtime import use_threads
        from pipeline.targets import resolve_target

        tvm_compat.apply()
        resolved = resolve_target(target)
        threads = use_threads(resolved.cores)
        c = machine_ceilings(resolved.preset, resolved.tvm_target(), threads, ceilings_dir,
                             recalibrate=True)
        out.print(f"{c.cpu}, {c.threads} threads ({c.preset}): peak {c.peak_gflops:g} GFLOP/s "
                  f"({c.gemm}), int8 {c.peak_int8_gops:g} GOP/s ({c.gemm_int8}), bandwidth "
                  f"{c.bandwidth_gbs:g} GB/s ({c.stream}), ridge {c.ridge:.1f} flop/B")
        if ref is None:
            return
    if ref is None:
        raise UserError("give a run id, run folder or artifact folder (or --calibrate)")
    folder = find_roofline(ref, resolve_uri(tracking_uri))
    points, c = read_roofline(folder)
    out.print(f"ceilings: {c.peak_gflops:g} GFLOP/s fp32, {c.peak_int8_gops:g} GOP/s int8, "
              f"{c.bandwidth_gbs:g} GB/s, ridge {c.ridge:.1f} "
              f"flop/B ({c.cpu}, {c.threads} threads); kernels at {weighted_fraction(points):.0%} "
              "of attainable, time-weighted")
    table = Table(Column("kernel", overflow="fold"), "precision", "calls", "ms", "share", "flop/B",
                  "GFLOP/s", "roof", "fraction", "bound")
    for p in sorted(points, key=lambda p: -p.share)[:top]:
        table.add_row(p.kernel, p.precision, str(p.calls), f"{p.ms:.3f}", f"{p.share:.1%}", f"{p.intensity:.1f}",
                      f"{p.achieved_gflops:.0f}", f"{p.attainable_gflops:.0f}",
                      f"{p.fraction:.0%}", p.bound)
    out.print(table)
    out.print(f"plot: {folder / 'roofline.png'} | table: {folder / 'roofline.html'}")


@app.command()
def compare(
    run_ids: Annotated[list[str] | None, typer.Argument(help="MLflow run ids (or use --model).")] = None,
    model: Annotated[str | None, typer.Option(help="Compare the latest runs of this model.")] = None,
    preset: Annotated[str | None, typer.Option(help="... on this preset only.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many runs with --model.")] = 10,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line instead of the table.")] = False,
) -> None:
    """Runs side by side: latency, speedups, tuning cost, roofline fraction."""
    _guard(_compare, run_ids, model, preset, limit, tracking_uri, as_json)


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
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")] = None,
) -> None:
    """Point the `champion` alias at the fastest verified model version of MODEL on the preset."""
    _guard(_promote, model, target, tracking_uri)


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
    _guard(_ui, port, tracking_uri)


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


@logs_app.command("compact")
def logs_compact(
    preset: Annotated[str, typer.Option(help="Preset name, or auto for this machine's.")] = "auto",
    keep: Annotated[int, typer.Option(help="Records kept per workload (the fastest valid ones).")] = 32,
    tuning_logs: Annotated[Path, typer.Option(help="Root of the MetaSchedule databases.")] = Path("tuning_logs"),
    tuning_db: Annotated[str | None, typer.Option(help="Compact this PostgreSQL store instead.")] = None,
) -> None:
    """Keep the top-k records per workload; the trials behind the rest still count when a run resumes."""
    _guard(_logs_compact, preset, keep, tuning_logs, tuning_db)


def _logs_compact(preset: str, keep: int, tuning_logs: Path, tuning_db: str | None) -> None:
    from pipeline.targets import resolve_target
    from pipeline.tuning_db import compact_json, open_postgres

    if tuning_db:
        r = open_postgres(tuning_db).compact(keep)
        where = "the PostgreSQL store"
    else:
        r = compact_json(tuning_logs / resolve_target(preset).preset, keep)
        where = str(tuning_logs / resolve_target(preset).preset)
    out.print(f"{where}: kept {r.kept} records, removed {r.removed} ({r.workloads} workloads); "
              f"{r.bytes_before / 1e6:.1f} MB -> {r.bytes_after / 1e6:.1f} MB of records")


@logs_app.command("export")
def logs_export(
    tuning_db: Annotated[str, typer.Option(help="The PostgreSQL store, postgresql://user@host/db.")],
    preset: Annotated[str, typer.Option(help="Preset name, or auto for this machine's.")] = "auto",
    tuning_logs: Annotated[Path, typer.Option(help="Root of the MetaSchedule databases.")] = Path("tuning_logs"),
) -> None:
    """Copy a preset's JSON records into PostgreSQL (records it has already are skipped)."""
    _guard(_logs_move, "export", preset, tuning_logs, tuning_db)


@logs_app.command("import")
def logs_import(
    tuning_db: Annotated[str, typer.Option(help="The PostgreSQL store, postgresql://user@host/db.")],
    preset: Annotated[str, typer.Option(help="Preset name, or auto for this machine's.")] = "auto",
    tuning_logs: Annotated[Path, typer.Option(help="Root of the MetaSchedule databases.")] = Path("tuning_logs"),
) -> None:
    """Copy the PostgreSQL records into a preset's JSON database (records it has already are skipped)."""
    _guard(_logs_move, "import", preset, tuning_logs, tuning_db)


def _logs_move(direction: str, preset: str, tuning_logs: Path, tuning_db: str) -> None:
    from pipeline.targets import resolve_target
    from pipeline.tuning import open_database
    from pipeline.tuning_db import copy_records, database_lock, open_postgres

    folder = tuning_logs / resolve_target(preset).preset
    pg = open_postgres(tuning_db)
    with database_lock(folder, exclusive=direction == "import"):
        js = open_database(folder)
        if direction == "export":
            r = copy_records(js, pg, src_dir=folder)
        else:
            r = copy_records(pg, js, dst_dir=folder)
    arrow = f"{folder} -> PostgreSQL" if direction == "export" else f"PostgreSQL -> {folder}"
    out.print(f"{arrow}: {r.added} of {r.records} records added ({r.workloads} workloads)")


@app.command()
def nightly(
    config: Annotated[Path, typer.Option("--config", "-c", help="The jobs, e.g. nightly.toml (see docs/nightly.md).")],
    tuning_logs: Annotated[Path, typer.Option(help="Root of the MetaSchedule databases.")] = Path("tuning_logs"),
    out_dir: Annotated[Path, typer.Option("--out", help="Where each night's summary folder goes.")] = Path("nightly"),
    artifacts: Annotated[Path, typer.Option(help="Where artifacts are exported.")] = Path("artifacts"),
    runs_dir: Annotated[Path, typer.Option(help="Where run folders go.")] = Path("runs"),
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")] = None,
    rpc: Annotated[str | None, typer.Option(help="Measure on this RPC tracker's servers, HOST:PORT.")] = None,
    rpc_key: Annotated[str | None, typer.Option(help="Device key of the RPC servers.")] = None,
    tuning_db: Annotated[str | None, typer.Option(help="Tuning records in PostgreSQL instead of the JSON files.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="End stdout with one JSON summary line.")] = False,
) -> None:
    """Run every [[job]] of the config: resume tuning, build, verify, compare with the champion,
    promote only when faster beyond noise. Exit 1 after all jobs when one failed or regressed."""
    _guard(_nightly, config, tuning_logs, out_dir, artifacts, runs_dir, tracking_uri, rpc, rpc_key,
           tuning_db, as_json)


def _nightly(config, tuning_logs, out_dir, artifacts, runs_dir, tracking_uri, rpc, rpc_key, tuning_db,
             as_json) -> None:
    from pipeline.nightly import render_markdown, run_nightly

    report = run_nightly(config, tuning_logs, out_dir, tracking_uri, artifacts, runs_dir,
                         {"rpc": rpc, "rpc_key": rpc_key, "tuning_db": tuning_db},
                         progress=lambda e: err.print(f"[cyan]{e.stage:>8}[/] {e.message}"))
    out.print(render_markdown(report))
    out.print(f"summary: {report.folder}/summary.md")
    if as_json:
        print(json.dumps({"folder": report.folder, "exit_code": report.exit_code,
                          "mlflow_run_id": report.mlflow_run_id, "jobs": report.jobs}, default=str))
    if report.exit_code:
        raise typer.Exit(report.exit_code)


rpc_app = typer.Typer(no_args_is_help=True, help="Distributed measurement over TVM RPC.")
app.add_typer(rpc_app, name="rpc")


@rpc_app.command("status")
def rpc_status(
    tracker: Annotated[str, typer.Option(help="The tracker, HOST:PORT.")] = "127.0.0.1:9190",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line instead of the tables.")] = False,
) -> None:
    """The tracker's servers and its queue per device key."""
    _guard(_rpc_status, tracker, as_json)


def _rpc_status(tracker: str, as_json: bool) -> None:
    from dataclasses import asdict

    from pipeline.rpc import tracker_status

    status = tracker_status(tracker)
    if as_json:
        print(json.dumps({"servers": status.servers, "queue": [asdict(q) for q in status.queue]}))
        return
    table = Table("device key", "servers", "free", "pending requests")
    for q in status.queue:
        table.add_row(q.key, str(q.total), str(q.free), str(q.pending))
    out.print(table)
    for s in status.servers:
        out.print(f"  {s['address']}  {s['key']}")


if __name__ == "__main__":
    app()
