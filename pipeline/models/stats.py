"""Parameter count and FLOPs of an ONNX graph (for `tune models`), from its inferred shapes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from pipeline.importer import TensorSpec, _specs


@dataclass(frozen=True)
class GraphStats:
    inputs: list[TensorSpec]
    params: int
    flops: float   # multiply-adds count as two


def _shape(shapes: dict, name: str) -> list[int]:
    return shapes.get(name, [])


def graph_stats(model: onnx.ModelProto) -> GraphStats:
    inferred = shape_inference.infer_shapes(model)
    g = inferred.graph
    inits = {i.name: numpy_helper.to_array(i).shape for i in g.initializer}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(g.value_info) + list(g.input) + list(g.output)}
    shapes.update({k: list(v) for k, v in inits.items()})
    flops = 0.0
    for node in g.node:
        out = _shape(shapes, node.output[0])
        if node.op_type == "Conv" and out:
            w = _shape(shapes, node.input[1])          # (Cout, Cin/group, kh, kw)
            flops += 2.0 * np.prod(out) * np.prod(w[1:])
        elif node.op_type in ("MatMul", "Gemm") and out:
            a = _shape(shapes, node.input[0])
            k = a[-1] if node.op_type == "MatMul" or not _attr(node, "transA") else a[-2]
            flops += 2.0 * np.prod(out) * k
    init_names = set(inits)
    return GraphStats(inputs=_specs([i for i in g.input if i.name not in init_names]),
                      params=int(sum(np.prod(s) for s in inits.values())), flops=float(flops))


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)
