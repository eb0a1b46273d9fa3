"""The int8 variant of `tune run`: calibration data, the quantize stage, the accuracy gate that
replaces the fp32 tolerance check, and what of it goes to MLflow."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.accuracy import AccuracyReport, check_accuracy_drop
from pipeline.errors import UserError
from pipeline.quantize import EvalSet, QuantizeSettings, eval_set, quantize_model

log = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 10_000      # gate inputs never coincide with calibration or verify inputs


def activation_dtype(target) -> str:
    """The activation type the target's dot-product instruction takes (VNNI u8 x s8, sdot s8 x s8)."""
    from schedules.cpu.int8 import dot_instruction

    ins = dot_instruction(target) if target.kind.name == "llvm" else None
    return ins.a_dtype if ins is not None else "uint8"


def weight_max(target) -> int:
    """The |int8 weight| bound the target's kernel is exact for (127; 63 where a pmaddubsw int16
    pair sum would saturate: x86 without VNNI)."""
    from schedules.cpu.int8 import dot_instruction

    ins = dot_instruction(target) if target.kind.name == "llvm" else None
    return ins.weight_max if ins is not None else 127


def _feeds_runner(model, compiled):
    names = [s.name for s in model.inputs]
    return lambda feed: compiled([feed[n] for n in names])


@dataclass
class Int8Gate:
    """Judges a built int8 module on the evaluation set: passed when the accuracy drop against
    fp32 stays within the bound."""

    model: object
    session: object
    evaluation: EvalSet
    max_drop: float
    verify_samples: int
    seed: int
    last: AccuracyReport | None = None

    def verify(self, compiled, recorder, result):
        from pipeline.verify import verify

        check = verify(self.model, compiled, self.session, float("inf"), self.verify_samples, self.seed)
        self.last = self.evaluation.report(_feeds_runner(self.model, compiled))
        check.passed = bool(self.last.drop_points <= self.max_drop)
        check.accuracy = {**asdict(self.last), "max_drop_points": self.max_drop}
        recorder.metrics(self.last.as_metrics())
        recorder.tags({"accuracy_kind": self.last.kind})
        return check

    def enforce(self) -> None:
        check_accuracy_drop(self.last, self.max_drop)


def _accuracy_feeds(config, model) -> tuple[list[dict], np.ndarray | None]:
    """Labelled real data from --accuracy-data (a .npz of the inputs plus `labels`), else seeded
    inputs judged by agreement with fp32."""
    from pipeline.calibrate import load_calibration_data
    from pipeline.verify import seeded_inputs

    if config.accuracy_data is None:
        return [seeded_inputs(model.inputs, config.seed + EVAL_SEED_OFFSET + i)
                for i in range(config.accuracy_samples)], None
    path = Path(config.accuracy_data)
    if path.suffix != ".npz" or not path.is_file():
        raise UserError(f"--accuracy-data must be an existing .npz (inputs by name plus labels): {path}")
    with np.load(path) as z:
        if "labels" not in z.files:
            raise UserError(f"{path.name} has no 'labels' array")
        labels = z["labels"].astype(np.int64).ravel()
    feeds = load_calibration_data(path, model.inputs, model.task, count=len(labels)).samples
    rows = sum(len(f[model.inputs[0].name]) for f in feeds)
    return feeds, labels[:rows]


def quantize_stage(config, model, mod, target, late_passes, post_passes, session, recorder,
                   run_dir: Path, result):
    """(int8 module after the late graph passes, Int8Gate) for the run."""
    from pipeline.build import build
    from pipeline.calibrate import load_calibration_data
    from pipeline.passes import apply_passes
    from pipeline.runtime import CompiledModel
    data = load_calibration_data(config.calibration, model.inputs, model.task,
                                 count=config.calibration_samples, seed=config.seed)
    recorder.tags({"calibration": "synthetic" if data.synthetic else "data"})
    recorder.params({"quantize": "int8", "calibration_source": data.source,
                     "accuracy_data": str(config.accuracy_data or "seeded"),
                     "calibration_method": config.calibration_method,
                     "calibration_samples": len(data.samples), "keep_fp32": ",".join(config.keep_fp32),
                     "max_accuracy_drop": config.max_accuracy_drop})

    def compile_fn(m):
        built = build(apply_passes(m, target, late_passes), target, None, post_passes)
        return _feeds_runner(model, CompiledModel(built.executable, list(built.params.values())))

    feeds, labels = _accuracy_feeds(config, model)
    evaluation = eval_set(feeds, lambda feed: session.run(None, feed), labels)
    settings = QuantizeSettings(config.calibration_method, list(config.keep_fp32),
                                config.max_accuracy_drop, config.fallback_rounds)
    from schedules.cpu.int8 import dot_instruction

    ins = dot_instruction(target) if target.kind.name == "llvm" else None
    recorder.params({"int8_instruction": ins.name if ins else "none (int32 fallback)",
                     "int8_weight_max": weight_max(target)})
    outcome = quantize_model(mod, data, evaluation, compile_fn, settings, activation_dtype(target),
                             weight_max(target))
    table = outcome.table()
    (run_dir / "quantization.json").write_text(json.dumps(
        {"calibration": {"source": data.source, "synthetic": data.synthetic,
                         "samples": len(data.samples), "method": config.calibration_method},
         "rounds": outcome.rounds, "layers": table}, indent=2))
    int8_layers = sum(r["int8"] for r in table)
    recorder.metrics({"int8_layers": int8_layers, "fp32_layers": len(table) - int8_layers,
                      "int8_macs_fraction": outcome.int8_macs_fraction,
                      "calibration_s": outcome.calibration.seconds})
    result.quantization = {"calibration": data.source, "synthetic": data.synthetic,
                           "method": config.calibration_method, "int8_layers": int8_layers,
                           "layers": len(table), "int8_macs_fraction": round(outcome.int8_macs_fraction, 4),
                           "kept_fp32": {r["name"]: r["reason"] for r in table if not r["int8"]},
                           "rounds": outcome.rounds}
    gate = Int8Gate(model, session, evaluation, config.max_accuracy_drop, config.verify_samples,
                    config.seed)
    return apply_passes(outcome.mod, target, late_passes), gate


def record_qdq(mod, recorder) -> dict | None:
    """A pre-quantized (QDQ) model: which layers QDQToInteger put on the integer kernels, as the
    run's quantization summary (None for a model without QDQ)."""
    from pipeline.passes.qdq import qdq_summary

    summary = qdq_summary(mod)
    if summary is None:
        return None
    lowered, kept = summary["int8"], summary["float"]
    # The keys an int8 run's summary has, so its consumers (the CLI's report) read either.
    quantization = {"source": "qdq", "calibration": "the model's QDQ scales", "synthetic": False,
                    "method": "qdq", "int8_layers": len(lowered), "layers": len(lowered) + len(kept),
                    "int8_macs_fraction": summary["int8_macs_fraction"], "int8": lowered,
                    "kept_fp32": kept}
    recorder.tags({"variant": "qdq", "quantization_source": "qdq"})
    recorder.metrics({"int8_layers": len(lowered), "fp32_layers": len(kept)})
    return quantization


def agreement_gate(config, model, session) -> Int8Gate:
    """For builds whose numbers legitimately differ from the reference (a QDQ model, --precision
    fp16/bf16): judged like an int8 build (top-1 agreement / cosine over seeded inputs, bounded by
    --max-accuracy-drop) against ONNX Runtime on the model as given. For a QDQ model that model is
    quantized too. Both compute the same
    integers, but a requantization rounding tie decided the other way moves an output by a whole
    quantization step (0.7% of the output range on the tests' small CNN), past the fp32 tolerance."""
    from pipeline.quantize import eval_set
    from pipeline.verify import seeded_inputs

    feeds = [seeded_inputs(model.inputs, config.seed + EVAL_SEED_OFFSET + i)
             for i in range(config.accuracy_samples)]
    evaluation = eval_set(feeds, lambda feed: session.run(None, feed))
    return Int8Gate(model, session, evaluation, config.max_accuracy_drop, config.verify_samples,
                    config.seed)
