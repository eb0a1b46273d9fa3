"""The pipeline: import -> passes -> tune -> build -> verify -> measure -> record -> export.

`run_pipeline` is the whole of `tune run`; the CLI only parses flags into a RunConfig and renders the
RunResult. Every stage reports progress through the callback and its wall time into the result.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline import tvm_compat
from pipeline.config import RunConfig
from pipeline.errors import PipelineError, UserError, VerificationError
from pipeline.progress import ProgressCallback, ProgressEvent, no_progress

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    model: str
    preset: str
    target: dict
    target_reason: str
    tasks: int = 0
    trials_new: int = 0
    trials_reused: int = 0
    tune_stop_reason: str = ""
    latency_ms: dict[str, float] = field(default_factory=dict)     # median per runner
    latency: dict[str, dict] = field(default_factory=dict)         # full stats per runner
    speedups: dict[str, float] = field(default_factory=dict)
    verified: bool = False
    verification: dict = field(default_factory=dict)
    artifact: str | None = None
    mlflow_run_id: str | None = None
    run_dir: str = ""
    passes: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    task_table: list[dict] = field(default_factory=list)
    scheduled_kernels: str = ""
    tune_curve: list[dict] = field(default_factory=list)   # estimated model latency while tuning
    roofline: dict = field(default_factory=dict)           # ceilings, weighted fraction, top kernels
    registered: str = ""                                   # "<registered model>/<version>"
    exported: str = "tuned"          # the build exported: "tuned", or "untuned" when it ran faster
    quantization: dict = field(default_factory=dict)       # int8 runs: calibration, layers, rounds
    sparse: dict = field(default_factory=dict)             # --sparse runs: BSR / dense per layer
    precision: str = "fp32"                                # --precision: fp32, fp16 or bf16

    def summary(self) -> dict:
        return asdict(self)


def prepare(config: RunConfig):
    """Cheap checks of everything a user typed, before any run is recorded."""
    from pipeline.export import check_writable
    from pipeline.importer import load_onnx
    from pipeline.targets import resolve_target

    if config.budget.trials is not None and config.budget.trials < 0:
        raise UserError("--trials must be >= 0")
    if config.budget.trials_per_task is not None and config.budget.trials_per_task < 1:
        raise UserError("--trials-per-task must be >= 1")
    if config.tolerance <= 0:
        raise UserError("--tolerance must be positive")
    if config.profile_runs < 1:
        raise UserError("--profile-runs must be >= 1")
    if config.rpc and not config.rpc_key:
        raise UserError("--rpc needs --rpc-key: the device key the servers registered under")
    if config.tuning_db:
        from pipeline.tuning_db import is_postgres

        if not is_postgres(config.tuning_db):
            raise UserError(f"--tuning-db {config.tuning_db!r}: use a postgresql://... URL")
    if config.quantize != "none":
        _check_quantize_flags(config)
    if config.sparse != "off":
        from pipeline.passes.sparse import check_sparse_flags

        check_sparse_flags(config)
    resolved = resolve_target(config.target)
    _check_precision_and_toolchain(config, resolved)
    check_writable(config.out)
    check_writable(config.tuning_logs)
    loaded = load_onnx(config.model, config.model_options)
    if config.quantize != "none" and any(n.op_type in ("QuantizeLinear", "DequantizeLinear")
                                         for n in loaded[1].graph.node):
        # A QDQ model is quantized already: its own scales are used (passes/qdq.py). Calibrating
        # again would only see its float leftovers, so say so instead of quietly doing little.
        raise UserError(f"--quantize {config.quantize}: the model is already quantized (QDQ); run it "
                        "without --quantize, its quantized layers run in integers at its own scales")
    return resolved, loaded


def _check_precision_and_toolchain(config: RunConfig, resolved) -> None:
    from pipeline.cross import cross_compiler, machine_arch
    from pipeline.precision import check_precision

    check_precision(config.precision)
    if config.precision != "fp32" and config.quantize != "none":
        raise UserError(f"--precision {config.precision} and --quantize {config.quantize} do not "
                        "combine: pick one")
    cross_compiler(resolved.target_dict, machine_arch())   # a missing cross toolchain fails now
    if config.quantize != "none":
        from pipeline.cross import skip_reason
        from pipeline.targets import detect_host

        reason = skip_reason(resolved.target_dict, machine_arch(), detect_host().cuda_arch)
        if reason:
            raise UserError(f"--quantize {config.quantize} runs the model to calibrate and check "
                            f"accuracy, and {resolved.preset} cannot run here ({reason.split(';')[0]})")


def _check_quantize_flags(config: RunConfig) -> None:
    from pipeline.calibrate import CALIBRATION_METHODS

    if config.calibration_method not in CALIBRATION_METHODS:
        raise UserError(f"unknown --calibration-method {config.calibration_method!r}: use one of "
                        f"{', '.join(CALIBRATION_METHODS)}")
    for flag, path in (("--calibration", config.calibration), ("--accuracy-data", config.accuracy_data)):
        if path is not None and not Path(path).exists():
            raise UserError(f"{flag}: {path} not found")
    if config.accuracy_samples < 1 or config.calibration_samples < 1 or config.fallback_rounds < 0:
        raise UserError("--accuracy-samples and --calibration-samples must be >= 1, "
                        "--fallback-rounds >= 0")
    if not 0 <= config.max_accuracy_drop < 100:
        raise UserError("--max-accuracy-drop must be in [0, 100) points")


@contextmanager
def _stage(result: RunResult, name: str, progress: ProgressCallback, message: str = "",
           should_stop: Callable[[], bool] = lambda: False):
    if should_stop():
        raise KeyboardInterrupt
    progress(ProgressEvent(name, message or name))
    t0 = time.perf_counter()
    yield
    result.stage_seconds[name] = round(time.perf_counter() - t0, 3)
    log.info("stage %s: %.1fs", name, result.stage_seconds[name])


def run_pipeline(config: RunConfig, progress: ProgressCallback = no_progress,
                 should_stop: Callable[[], bool] = lambda: False) -> RunResult:
    from pipeline.runtime import use_threads
    from pipeline.targets import detect_host
    from pipeline.tracking import RunRecorder, tracking_uri

    tvm_compat.apply()
    resolved, loaded = prepare(config)
    threads = use_threads(resolved.cores)
    name = loaded[0]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = config.runs_dir / f"{name}-{resolved.preset}-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    result = RunResult(model=name, preset=resolved.preset, target=resolved.target_dict,
                       target_reason=resolved.reason, run_dir=str(run_dir))
    recorder = RunRecorder(tracking_uri(config.tracking_uri), config.experiment or name,
                           run_name=f"{name}-{resolved.preset}-{stamp}",
                           tags={"model": name, "preset": resolved.preset,
                                 "variant": "fp32" if config.quantize == "none" else config.quantize})
    result.mlflow_run_id = recorder.run_id
    recorder.params({"tvm_threads": threads})
    file_log, root_level = _attach_run_log(run_dir)
    try:
        _run_stages(config, resolved, loaded, result, recorder, run_dir, progress, should_stop,
                    detect_host(), threads)
        recorder.finish("FINISHED")
    except KeyboardInterrupt:
        recorder.finish("KILLED", "interrupted (Ctrl-C or SIGTERM); finished tuning records are kept")
        raise
    except PipelineError as exc:
        recorder.finish("FAILED", str(exc))
        raise
    except Exception as exc:
        recorder.finish("FAILED", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        (run_dir / "summary.json").write_text(json.dumps(result.summary(), indent=2, default=str))
        logging.getLogger().removeHandler(file_log)
        logging.getLogger().setLevel(root_level)
        file_log.close()
        try:
            recorder.artifact(run_dir, "run")
        except Exception as exc:  # noqa: BLE001  never mask the real outcome because artifacts failed to upload
            log.warning("could not log run artifacts: %s", exc)
    return result


def _attach_run_log(run_dir: Path) -> tuple[logging.Handler, int]:
    """The run folder's pipeline.log gets INFO and up, whatever the console shows."""
    handler = logging.FileHandler(run_dir / "pipeline.log")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    if level > logging.INFO or level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler, level


def _run_stages(config, resolved, loaded, result: RunResult, recorder, run_dir: Path,
                progress: ProgressCallback, should_stop, host, threads: int) -> None:
    from pipeline.baselines import openvino_runner
    from pipeline.build import build
    from pipeline.cross import cross_compiler, skip_reason
    from pipeline.export import export_artifact, versions
    from pipeline.importer import import_model
    from pipeline.int8 import agreement_gate, record_qdq
    from pipeline.measure import faster_build, measure_interleaved
    from pipeline.passes import QUANTIZE_AT, apply_passes, describe_passes, preset_passes, split_passes
    from pipeline.runtime import CompiledModel
    from pipeline.tuning import SearchSettings, tune
    from pipeline.verify import onnxruntime_session, seeded_inputs, verify

    target = resolved.tvm_target()
    # A target this machine cannot run (aarch64 here, CUDA without a GPU) is compiled and exported;
    # verify, measure and roofline are skipped with this reason, logged and recorded.
    cannot_run = skip_reason(resolved.target_dict, host.arch, host.cuda_arch)
    device = "cuda" if resolved.kind == "cuda" else "cpu"
    budget = config.budget
    if cannot_run:
        log.warning("%s: verification, measurement and roofline are skipped", cannot_run)
        recorder.tags({"verification": "skipped", "cannot_run_here": cannot_run})
        if not config.rpc and budget.trials != 0:
            from pipeline.tuning import TuneBudget

            log.warning("no tuning: nothing here can measure %s (pass --rpc with a board); the "
                        "database's records and the default schedules are used", resolved.preset)
            budget = TuneBudget(trials=0)
    settings = SearchSettings.from_preset(resolved.tuning)
    passes, post_passes = preset_passes(resolved.tuning, config.winograd, config.precision)
    result.passes = [p.name for p in passes + post_passes]
    db_dir = config.tuning_logs / resolved.preset
    recorder.params({
        "model": result.model, "model_source": config.model,
        "model_options": json.dumps(config.model_options), "preset": resolved.preset,
        "target": json.dumps(resolved.target_dict), "target_reason": resolved.reason,
        "trials": config.budget.trials, "trials_per_task": config.budget.trials_per_task,
        "time_budget_s": config.budget.time_budget_s, "tuning_logs": str(db_dir),
        "tuning_db": _redact(config.tuning_db), "rpc": f"{config.rpc} key={config.rpc_key}" if config.rpc else None,
        "passes": " -> ".join(result.passes), "search": json.dumps(asdict(settings)),
        "tolerance": config.tolerance, "seed": config.seed, "precision": config.precision,
        **{f"version.{k}": v for k, v in versions().items()},
    })
    log.info("graph passes:\n%s", "\n".join(describe_passes(passes + post_passes)))

    with _stage(result, "import", progress, f"importing {config.model}", should_stop):
        model = import_model(config.model, config.model_options, config.input_shapes, loaded)
        recorder.params({"model_sha256": model.sha256,
                         "inputs": json.dumps([s.as_dict() for s in model.inputs])})
    session = onnxruntime_session(model, threads=threads)
    early, late = split_passes(passes, QUANTIZE_AT)
    with _stage(result, "passes", progress, f"{len(passes)} graph passes", should_stop):
        mod = apply_passes(model.mod, target, early)
        result.quantization = record_qdq(mod, recorder) or result.quantization
        if config.sparse != "off":
            from pipeline.passes.sparse import sparse_stage

            mod, result.sparse = sparse_stage(config, mod, target, late, post_passes, recorder,
                                              run_dir, progress)
            if result.sparse.get("sparse_layers"):
                recorder.tags({"variant": "sparse"})
        if config.quantize == "none":
            mod = apply_passes(mod, target, late)
    gate = agreement_gate(config, model, session) if result.quantization.get("source") == "qdq" else None
    if config.precision != "fp32":
        result.precision = config.precision
        recorder.tags({"variant": config.precision})
        if not cannot_run:   # judged like int8: agreement with fp32 ONNX Runtime, not the tolerance
            gate = agreement_gate(config, model, session)
    if config.quantize == "int8":
        with _stage(result, "quantize", progress, "calibrating and quantizing to int8", should_stop):
            from pipeline.int8 import quantize_stage

            mod, gate = quantize_stage(config, model, mod, target, late, post_passes, session,
                                       recorder, run_dir, result)
    with _stage(result, "tune", progress, "tuning", should_stop):
        runner = None
        if config.rpc:   # builds stay here; candidates are timed on the tracker's servers
            from pipeline.rpc import rpc_runner

            runner = rpc_runner(config.rpc, config.rpc_key or "", settings)
        report = tune(mod, target, db_dir, run_dir / "metaschedule", budget, settings,
                      progress, should_stop, runner=runner, tuning_db=config.tuning_db)
    if report.stop_reason == "interrupted":
        raise KeyboardInterrupt
    result.tasks, result.trials_new = len(report.tasks), report.trials_new
    result.trials_reused, result.tune_stop_reason = report.trials_reused, report.stop_reason
    result.task_table = [{**asdict(t), "trials": t.trials} for t in report.tasks]
    recorder.metrics({"tasks": result.tasks, "trials_new": report.trials_new,
                      "trials_reused": report.trials_reused, "tune_wall_s": report.wall_s})
    recorder.series("tune_best_latency_ms", [(n, est) for n, _, est in report.curve])
    result.tune_curve = [{"trials": n, "tune_s": s, "estimated_ms": round(est, 4)}
                         for n, s, est in report.curve]

    with _stage(result, "build", progress, "compiling", should_stop):
        built = build(mod, target, db_dir, post_passes, tuning_db=config.tuning_db)
        result.scheduled_kernels = f"{built.scheduled_tasks}/{built.total_tasks}"
        untuned, plain, compiled = None, None, None
        if not cannot_run:
            compiled = CompiledModel(built.executable, list(built.params.values()), device)
        if not config.skip_untuned and not cannot_run:
            plain = build(mod, target, None, post_passes)
            untuned = CompiledModel(plain.executable, list(plain.params.values()), device)

    if cannot_run:
        check = _skip_run_checks(config, model, session, cannot_run, result, progress)
    else:
        def check_build(candidate):
            if gate is None:
                return verify(model, candidate, session, config.tolerance, config.verify_samples,
                              config.seed)
            return gate.verify(candidate, recorder, result)

        with _stage(result, "verify", progress, "checking numerics against ONNX Runtime", should_stop):
            check = check_build(compiled)
            result.verified, result.verification = check.passed, check.as_dict()
            recorder.metrics({"verify_max_abs_err": check.max_abs_err,
                              "verify_max_rel_err": check.max_rel_err,
                              "verify_min_cosine": check.min_cosine})
            recorder.tags({"verified": str(check.passed).lower()})
            if gate is not None:
                gate.enforce()                     # the accuracy bound, not the fp32 tolerance
            elif not check.passed:
                raise VerificationError(
                    f"output mismatch against ONNX Runtime: max relative error {check.max_rel_err:.3g} "
                    f"> tolerance {config.tolerance:g} (max abs {check.max_abs_err:.3g}); not exported")

        with _stage(result, "measure", progress, "measuring latency (interleaved)", should_stop):
            feeds = seeded_inputs(model.inputs, config.seed)
            arrays = [feeds[s.name] for s in model.inputs]
            runners = {"tuned": compiled.timed_call(arrays),
                       "onnxruntime": lambda: session.run(None, feeds)}
            openvino = openvino_runner(model.onnx_model, feeds, threads)
            if openvino is not None:
                runners["openvino"] = openvino
            if untuned is not None:
                runners["untuned"] = untuned.timed_call(arrays)
            stats = measure_interleaved(runners, config.measure)
            result.latency = {k: v.as_dict() for k, v in stats.items()}
            result.latency_ms = {k: round(v.median, 4) for k, v in stats.items()}
            result.speedups = {f"tuned_vs_{k}": round(stats[k].median / stats["tuned"].median, 3)
                               for k in stats if k != "tuned"}
            recorder.metrics({**{f"latency_{k}_{s}": v[f"{s}_ms"] for k, v in result.latency.items()
                                 for s in ("median", "p90", "p99")},
                              **{f"speedup_{k}": v for k, v in result.speedups.items()}})
            if faster_build(stats) == "untuned" and config.export_fastest:
                plain_check = check_build(untuned)
                if plain_check.passed:
                    compiled, built, check = untuned, plain, plain_check
                    result.exported, result.verification = "untuned", plain_check.as_dict()
                    log.info("exporting the default-scheduled build: %.3f ms against %.3f ms tuned",
                             stats["untuned"].median, stats["tuned"].median)
            recorder.tags({"exported_build": result.exported})

        if config.roofline and device == "cuda":
            log.warning("roofline skipped: ceilings are measured for CPUs only (the preset lists "
                        "the GPU's published ones)")
        elif config.roofline:
            with _stage(result, "roofline", progress, "per-kernel times against the roofline",
                        should_stop):
                result.roofline = _roofline(config, resolved, target, threads, compiled, arrays, built,
                                            run_dir / "roofline", f"{result.model} on {resolved.preset}")
                recorder.metrics({"roofline_fraction": result.roofline["fraction"],
                                  "ceiling_peak_gflops": result.roofline["peak_gflops"],
                                  "ceiling_bandwidth_gbs": result.roofline["bandwidth_gbs"],
                                  "ceiling_peak_int8_gops": result.roofline["peak_int8_gops"]})

    with _stage(result, "export", progress, "exporting the artifact", should_stop):
        manifest = {"model_sha256": model.sha256, "model_source": config.model,
                    "target": resolved.target_dict, "target_reason": resolved.reason,
                    "inputs": [s.as_dict() for s in model.inputs],
                    "outputs": [s.as_dict() for s in model.outputs],
                    "latency_ms": result.latency, "verification": check.as_dict(),
                    "build": result.exported, "precision": config.precision, "device": device,
                    "tuning": {"tasks": result.tasks, "trials_new": report.trials_new,
                               "trials_reused": report.trials_reused, "database": str(db_dir)},
                    "mlflow_run_id": result.mlflow_run_id}
        folder = export_artifact(config.out, model_name=result.model, preset=resolved.preset,
                                 executable=built.executable, params=built.params, manifest=manifest,
                                 verify_inputs=check.inputs[0], verify_outputs=check.outputs[0],
                                 cross_compiler=cross_compiler(resolved.target_dict, host.arch))
        result.artifact = str(folder)
        recorder.tags({"artifact": str(folder.resolve())})
        recorder.artifact(folder / "manifest.json", "artifact")
        if config.register and cannot_run:
            log.warning("not registered in MLflow: the artifact is unverified (%s)", cannot_run)
        elif config.register:
            variant = config.precision if config.precision != "fp32" else \
                 result.quantization.get("source", "int8") if gate is not None else \
                "sparse" if result.sparse.get("sparse_layers") else "fp32"
            from pipeline.registry import register_artifact

            reg = register_artifact(recorder.client, recorder.run_id, folder, result.model,
                                    resolved.preset, variant, result.latency_ms[result.exported],
                                    check.passed)
            result.registered = f"{reg.name}/{reg.version}"
            recorder.tags({"registered_model": reg.name, "model_version": reg.version})


def _skip_run_checks(config, model, session, reason: str, result: RunResult, progress):
    """verify / measure / roofline for a module this machine cannot run: skipped, with the reason in
    the run log and the summary; ONNX Runtime's outputs for the verification inputs go into the
    artifact, for `tune predict --check` on the device."""
    from pipeline.cross import reference_outputs

    for stage in ("verify", "measure", "roofline"):
        progress(ProgressEvent(stage, f"skipped: {reason}"))
        log.info("stage %s skipped: %s", stage, reason)
    check = reference_outputs(model, session, reason, config.tolerance, config.verify_samples,
                              config.seed)
    result.verified, result.verification = False, check.as_dict()
    return check


def _roofline(config, resolved, target, threads: int, compiled, arrays, built, out_dir: Path,
              title: str) -> dict:
    from pipeline.profile import profile_kernels
    from pipeline.roofline import machine_ceilings, roofline_points, weighted_fraction, write_roofline

    ceilings = machine_ceilings(resolved.preset, target, threads, config.ceilings_dir)
    profile = profile_kernels(compiled, arrays, runs=config.profile_runs)
    points = roofline_points(profile, built.costs, ceilings)
    write_roofline(points, ceilings, out_dir, title)
    return {"fraction": round(weighted_fraction(points), 4), "peak_gflops": ceilings.peak_gflops,
            "peak_int8_gops": ceilings.peak_int8_gops,
            "bandwidth_gbs": ceilings.bandwidth_gbs, "ridge": round(ceilings.ridge, 2),
            "kernels_ms": round(sum(p.ms for p in points), 3), "dir": str(out_dir),
            "top": [{"kernel": p.kernel, "precision": p.precision, "share": p.share,
                     "gflops": p.achieved_gflops,
                     "fraction": p.fraction, "bound": p.bound}
                    for p in sorted(points, key=lambda p: -p.share)[:5]]}


def _redact(url: str | None) -> str | None:
    """A database URL without its password (params are visible to everyone with the MLflow store)."""
    import re

    return None if url is None else re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)
