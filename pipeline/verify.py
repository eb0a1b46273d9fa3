"""Stage 5, verify: the compiled module against ONNX Runtime on seeded inputs."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx

from pipeline.errors import PipelineError
from pipeline.importer import ImportedModel, TensorSpec


@dataclass
class Verification:
    passed: bool
    tolerance: float                 # bound on max|tvm - ref| / max|ref|, per output
    max_abs_err: float
    max_rel_err: float               # max|tvm - ref| / max|ref|, worst output
    min_cosine: float
    samples: int
    inputs: list[dict[str, np.ndarray]]
    outputs: list[list[np.ndarray]]  # what the compiled module produced, per sample
    accuracy: dict | None = None     # int8 builds: the accuracy report that decided `passed`

    def as_dict(self) -> dict:
        out = {"passed": self.passed, "tolerance": self.tolerance, "max_abs_err": self.max_abs_err,
               "max_rel_err": self.max_rel_err, "min_cosine": self.min_cosine,
               "samples": self.samples}
        return {**out, "accuracy": self.accuracy} if self.accuracy is not None else out


def seeded_inputs(specs: list[TensorSpec], seed: int) -> dict[str, np.ndarray]:
    """Inputs that exercise the model: unit normal floats, valid token ids, all-ones masks."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        if s.dtype.startswith("float"):
            out[s.name] = rng.standard_normal(s.shape).astype(s.dtype)
        elif "mask" in s.name.lower():
            out[s.name] = np.ones(s.shape, s.dtype)
        elif s.dtype == "bool":
            out[s.name] = rng.integers(0, 2, s.shape).astype(bool)
        else:
            out[s.name] = rng.integers(0, 100, s.shape).astype(s.dtype)
    return out


def onnxruntime_session(model: ImportedModel, threads: int):
    """An ONNX Runtime session on the model as given. A model saved by a newer onnx than ONNX
    Runtime knows gets its IR version lowered to the newest one ONNX Runtime accepts (the opset,
    which decides the semantics, is untouched)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    proto = model.onnx_model
    try:
        return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        found = re.search(r"max supported IR version: (\d+)", str(exc))
        if not found:
            raise PipelineError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}") from exc
    lowered = onnx.ModelProto()
    lowered.CopyFrom(proto)
    lowered.ir_version = int(found.group(1))
    return ort.InferenceSession(lowered.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def verify(model: ImportedModel, compiled, session, tolerance: float = 1e-3, samples: int = 2,
           seed: int = 0) -> Verification:
    """`compiled` is a pipeline.runtime.CompiledModel; `session` an ONNX Runtime session."""
    max_abs = max_rel = 0.0
    min_cos = 1.0
    inputs, outputs = [], []
    for i in range(samples):
        feeds = seeded_inputs(model.inputs, seed + i)
        got = compiled([feeds[s.name] for s in model.inputs])
        ref = session.run(None, feeds)
        for g, r in zip(got, ref):
            g64, r64 = g.astype(np.float64).ravel(), np.asarray(r, np.float64).ravel()
            err = float(np.max(np.abs(g64 - r64))) if g64.size else 0.0
            scale = max(float(np.max(np.abs(r64))) if r64.size else 0.0, 1e-12)
            max_abs, max_rel = max(max_abs, err), max(max_rel, err / scale)
            denom = np.linalg.norm(g64) * np.linalg.norm(r64)
            min_cos = min(min_cos, float(g64 @ r64 / denom) if denom > 0 else float(err == 0))
        inputs.append(feeds)
        outputs.append(got)
    return Verification(max_rel <= tolerance, tolerance, max_abs, max_rel, min_cos, samples,
                        inputs, outputs)
