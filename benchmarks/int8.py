"""Benchmark: int8 against fp32 on this CPU. One process, same threads, same calibration data:

    TVM int8      `--quantize int8` as `tune run` builds it (calibration, rewrite, int8 kernels),
                  with the preset's tuning records; "tvm_int8_default": the same without them
    TVM fp32      the fp32 build with the preset's tuning database (shipped logs: "tuned fp32")
    ORT fp32      ONNX Runtime on the model as given (graph optimisation ALL)
    ORT int8      ONNX Runtime on its own static quantization of the model (QDQ, per-channel)

timed interleaved (pipeline.measure), plus top-1 agreement of each int8 build with its fp32 twin
on seeded inputs that calibration did not see.

    python benchmarks/int8.py --model resnet50 [--calibration-samples 8] [--eval-samples 100]

Writes benchmarks/results/int8-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from pipeline import tvm_compat
    from pipeline.accuracy import compare_classifier, compare_embeddings
    from pipeline.build import build
    from pipeline.calibrate import load_calibration_data
    from pipeline.importer import import_model
    from pipeline.int8 import activation_dtype, weight_max
    from pipeline.measure import MeasureSettings, measure_interleaved
    from pipeline.ort_quant import ort_static_int8
    from pipeline.passes import QUANTIZE_AT, apply_passes, preset_passes, split_passes
    from pipeline.quantize import QuantizeSettings, eval_set, quantize_model
    from pipeline.runtime import CompiledModel, use_threads
    from pipeline.targets import resolve_target
    from pipeline.verify import onnxruntime_session, seeded_inputs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--calibration-samples", type=int, default=8)
    p.add_argument("--eval-samples", type=int, default=100)
    p.add_argument("--method", default="percentile")
    p.add_argument("--target", default="auto", help="preset: x86-avx512 runs the non-VNNI path here")
    p.add_argument("--tuning-logs", type=Path, default=ROOT / "tuning_logs",
                   help="MetaSchedule databases (fp32 and int8 records) both builds use")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()

    tvm_compat.apply()
    resolved = resolve_target(args.target)
    threads = use_threads(resolved.cores)
    target = resolved.tvm_target()
    model = import_model(args.model)
    passes, post = preset_passes(resolved.tuning)
    early, late = split_passes(passes, QUANTIZE_AT)
    db = args.tuning_logs / resolved.preset
    names = [s.name for s in model.inputs]

    def compiled(mod, database=None):
        built = build(apply_passes(mod, target, late), target, database, post)
        return CompiledModel(built.executable, list(built.params.values()))

    def runner(cm):
        return lambda feed: cm([feed[n] for n in names])

    pre = apply_passes(model.mod, target, early)
    session = onnxruntime_session(model, threads)
    calib = load_calibration_data(None, model.inputs, model.task, args.calibration_samples, seed=0)
    feeds = [seeded_inputs(model.inputs, 10_000 + i) for i in range(args.eval_samples)]
    evaluation = eval_set(feeds, lambda f: session.run(None, f))
    outcome = quantize_model(pre, calib, evaluation, lambda m: runner(compiled(m)),
                             QuantizeSettings(args.method), activation_dtype(target),
                             weight_max(target))
    tvm_int8, tvm_fp32 = compiled(outcome.mod, db), compiled(pre, db)
    tvm_int8_default = compiled(outcome.mod)        # our default int8 schedules, no tuning records

    import onnxruntime as ort
    q_onnx = ort_static_int8(model.onnx_model, calib.samples)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    ort_int8 = ort.InferenceSession(q_onnx.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    compare = compare_classifier if evaluation.kind == "classifier" else compare_embeddings
    fp32_out = [runner(tvm_fp32)(f)[0] for f in feeds]
    acc = {"tvm_int8": compare(fp32_out, [runner(tvm_int8)(f)[0] for f in feeds]),
           "ort_int8": compare([r[0] for r in evaluation.reference],
                               [ort_int8.run(None, f)[0] for f in feeds])}

    feed = seeded_inputs(model.inputs, 0)
    arrays = [feed[n] for n in names]

    stats = measure_interleaved({"tvm_int8": tvm_int8.timed_call(arrays),
                                 "tvm_int8_default": tvm_int8_default.timed_call(arrays),
                                 "tvm_fp32": tvm_fp32.timed_call(arrays),
                                 "ort_fp32": lambda: session.run(None, feed),
                                 "ort_int8": lambda: ort_int8.run(None, feed)},
                                MeasureSettings(repeats=100, max_seconds=15.0))
    ms = {k: round(v.median, 3) for k, v in stats.items()}
    table = outcome.table()
    result = {
        "model": args.model, "preset": resolved.preset, "threads": threads, "latency_ms": ms,
        "tvm_int8_speedup_over_tvm_fp32": round(ms["tvm_fp32"] / ms["tvm_int8"], 3),
        "tvm_int8_over_ort_int8": round(ms["tvm_int8"] / ms["ort_int8"], 3),
        "tvm_int8_over_ort_fp32": round(ms["tvm_int8"] / ms["ort_fp32"], 3),
        "accuracy": {k: {f: getattr(v, f) for f in ("kind", "samples", "top1_agreement", "min_cosine",
                                                     "mean_cosine", "drop_points")} for k, v in acc.items()},
        "int8_layers": sum(r["int8"] for r in table), "layers": len(table),
        "int8_macs_fraction": round(outcome.int8_macs_fraction, 4), "gate_rounds": outcome.rounds,
        "calibration": {"samples": len(calib.samples), "method": args.method, "source": calib.source},
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.target == "auto" else f"-{resolved.preset}"
    (args.out_dir / f"int8-{args.model}{suffix}.json").write_text(json.dumps(result, indent=2))
    print(f"{args.model} on {resolved.preset}, {threads} threads (median ms): " +
          ", ".join(f"{k} {v}" for k, v in ms.items()))
    print(f"TVM int8 is {result['tvm_int8_speedup_over_tvm_fp32']:.2f}x faster than TVM fp32; "
          f"TVM int8 / ORT int8 = {result['tvm_int8_over_ort_int8']:.2f}x; "
          f"TVM int8 / ORT fp32 = {result['tvm_int8_over_ort_fp32']:.2f}x")
    for k, v in acc.items():
        print(f"{k} vs fp32 ({v.kind}, {v.samples} samples): drop {v.drop_points:.2f} points, "
              f"top-1 agreement {v.top1_agreement}, mean cosine {v.mean_cosine}")
    print(f"int8 layers {result['int8_layers']}/{result['layers']} "
          f"({result['int8_macs_fraction']:.1%} of MACs)")


if __name__ == "__main__":
    main()
