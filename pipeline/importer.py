"""Stage 1, import: a zoo name or an .onnx path -> a cleaned ONNX graph -> a Relax IRModule.

Exported graphs are simplified (onnxsim: shape inference, constant folding, Conv+BN fusion, dead-node removal) before the
Relax frontend sees them, because the frontend fails on patterns that are constant once shapes are known
(e.g. `Shape -> ConstantOfShape -> Expand` in transformer exports). Unsupported ops are reported with
their node names before conversion starts.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import onnx

from pipeline.errors import UnsupportedModelError, UserError
from pipeline.models import get_model

log = logging.getLogger(__name__)

_NP_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64",
              onnx.TensorProto.INT32: "int32", onnx.TensorProto.FLOAT16: "float16",
              onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT8: "int8",
              onnx.TensorProto.BOOL: "bool", onnx.TensorProto.DOUBLE: "float64"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class ImportedModel:
    name: str
    source: str                      # zoo name or the path it came from
    onnx_model: onnx.ModelProto      # as given (the reference runtime runs this one)
    simplified: onnx.ModelProto      # what the frontend converted
    sha256: str                      # of the serialized model as given
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    task: str = "generic"            # "image", "text" or "generic": picks seeded inputs
    mod: object = None               # tvm.IRModule; weights are constants inside `main`


def load_onnx(source: str, options: dict[str, object] | None = None) -> tuple[str, onnx.ModelProto, str]:
    """Resolve `source` (zoo name or .onnx path) to (name, ModelProto, task)."""
    path = Path(source)
    if source.endswith(".onnx") or path.exists():
        if not path.is_file():
            raise UserError(f"model file not found: {source}")
        try:
            model = onnx.load(str(path))
            onnx.checker.check_model(model)
        except Exception as exc:  # onnx raises DecodeError, ValidationError, ... for bad files
            raise UserError(f"{source} is not a valid ONNX model: {str(exc).splitlines()[0]}") from exc
        if options:
            raise UserError("model options only apply to zoo models, not to .onnx files")
        return path.stem, model, "generic"
    entry = get_model(source)
    return entry.name, entry.build(**(options or {})), entry.task


def _static_shapes(model: onnx.ModelProto, overrides: dict[str, list[int]]) -> dict[str, list[int]]:
    """Input shapes with every symbolic dim fixed: from `overrides`, else 1 (with a warning)."""
    init_names = {i.name for i in model.graph.initializer}
    shapes = {}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        if inp.name in overrides:
            shapes[inp.name] = list(overrides[inp.name])
            continue
        dims = []
        for d in inp.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            else:
                log.warning("input %s: symbolic dim %r fixed to 1 (use --input-shape to choose)",
                            inp.name, d.dim_param or "?")
                dims.append(1)
        shapes[inp.name] = dims
    unknown = set(overrides) - set(shapes)
    if unknown:
        raise UserError(f"--input-shape names unknown input(s) {sorted(unknown)}; "
                        f"the model's inputs are {sorted(shapes)}")
    return shapes


def simplify(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """Shape inference, constant folding and Conv+BN fusion with onnxsim.

    onnxsim folds BN into conv weights in C++ in well under a second; the same fold through Relax's
    FoldConstant costs ~17 s on ResNet-50, since it compiles and runs every constant expression.
    BNs that do not follow a conv stay for the Relax passes."""
    import onnxsim

    try:
        simplified, ok = onnxsim.simplify(model, overwrite_input_shapes=shapes)
    except Exception as exc:  # onnxsim fails on some graphs; the frontend may still cope
        log.warning("onnxsim could not simplify the model (%s); using shape inference only",
                    str(exc).splitlines()[0])
        return onnx.shape_inference.infer_shapes(model)
    if not ok:
        log.warning("onnxsim's self-check failed; using the unsimplified model")
        return onnx.shape_inference.infer_shapes(model)
    return simplified


def check_supported(model: onnx.ModelProto) -> None:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"If"}  # `If` is converted outside the table
    missing: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in known:
            missing.setdefault(node.op_type, []).append(node.name or "<unnamed>")
    if missing:
        parts = [f"{op} (node {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                 for op, names in missing.items()]
        raise UnsupportedModelError("the TVM ONNX frontend does not support: " + "; ".join(parts))


def _specs(values, shapes: dict[str, list[int]] | None = None) -> list[TensorSpec]:
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = shapes[v.name] if shapes and v.name in shapes else [d.dim_value for d in t.shape.dim]
        out.append(TensorSpec(v.name, tuple(int(d) for d in shape), _NP_DTYPES.get(t.elem_type, "?")))
    return out


def import_model(source: str, options: dict[str, object] | None = None,
                 input_shapes: dict[str, list[int]] | None = None,
                 loaded: tuple[str, onnx.ModelProto, str] | None = None) -> ImportedModel:
    """Load, simplify, check and convert a model to Relax.

    Weights stay constants in `main` (the frontend needs initializers such as Reshape's shape as
    constants; the passes fold into them); `LiftConstantsToParams` detaches them again for export.
    `loaded` is what `load_onnx(source, options)` returned, when the caller has it already.
    """
    from tvm.relax.frontend.onnx import from_onnx

    name, model, task = loaded or load_onnx(source, options)
    sha = hashlib.sha256(model.SerializeToString()).hexdigest()
    shapes = _static_shapes(model, input_shapes or {})
    simplified = simplify(model, shapes)
    check_supported(simplified)
    init_names = {i.name for i in simplified.graph.initializer}
    inputs = _specs([i for i in simplified.graph.input if i.name not in init_names], shapes)
    outputs = _specs(simplified.graph.output)
    try:
        mod = from_onnx(simplified, shape_dict=shapes, dtype_dict={s.name: s.dtype for s in inputs})
    except Exception as exc:
        raise UnsupportedModelError(f"the TVM ONNX frontend failed on {name}: "
                                    f"{str(exc).strip().splitlines()[-1]}") from exc
    log.info("imported %s: %d inputs, %d initializers, %d nodes", name, len(inputs),
             len(simplified.graph.initializer), len(simplified.graph.node))
    return ImportedModel(name=name, source=source, onnx_model=model, simplified=simplified, sha256=sha,
                         inputs=inputs, outputs=outputs, task=task, mod=mod)
