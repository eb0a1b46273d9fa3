"""A small ONNX graph builder with seeded weights, shared by the zoo's architectures.

The zoo builds networks from code (no downloads), so each architecture is a few dozen lines on top of
this builder. Weights use He/Xavier-style scales so activations keep a sane range through deep nets;
that matters for verification (a net whose logits blow up or vanish verifies nothing).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
_ONNX_DTYPES = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "int32": TensorProto.INT32}


class GraphBuilder:
    """Accumulates nodes and initializers; every helper returns the name of its output."""

    def __init__(self, name: str, seed: int = 0) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counts: dict[str, int] = {}

    def _fresh(self, prefix: str) -> str:
        n = self._counts.get(prefix, 0)
        self._counts[prefix] = n + 1
        return f"{prefix}_{n}"

    # -- tensors -------------------------------------------------------------------------------
    def const(self, array: np.ndarray, prefix: str = "const") -> str:
        name = self._fresh(prefix)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, shape: tuple[int, ...], fan_in: int, prefix: str = "w", gain: float = 2.0) -> str:
        std = np.sqrt(gain / max(fan_in, 1))
        return self.const((self.rng.standard_normal(shape) * std).astype(np.float32), prefix)

    def op(self, op_type: str, inputs: list[str], prefix: str | None = None, **attrs) -> str:
        out = self._fresh(prefix or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    # -- layers --------------------------------------------------------------------------------
    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1,
             bias: bool = False) -> str:
        w = self.weight((cout, cin // group, k, k), fan_in=cin // group * k * k, prefix="conv_w")
        inputs = [x, w]
        if bias:
            inputs.append(self.const(np.zeros(cout, np.float32), "conv_b"))
        pad = k // 2
        return self.op("Conv", inputs, "conv", kernel_shape=[k, k], strides=[stride, stride],
                       pads=[pad] * 4, group=group)

    def batch_norm(self, x: str, c: int) -> str:
        gamma = self.const((1.0 + 0.1 * self.rng.standard_normal(c)).astype(np.float32), "bn_gamma")
        beta = self.const((0.1 * self.rng.standard_normal(c)).astype(np.float32), "bn_beta")
        mean = self.const((0.1 * self.rng.standard_normal(c)).astype(np.float32), "bn_mean")
        var = self.const((1.0 + 0.1 * np.abs(self.rng.standard_normal(c))).astype(np.float32), "bn_var")
        return self.op("BatchNormalization", [x, gamma, beta, mean, var], "bn", epsilon=1e-5)

    def relu(self, x: str) -> str:
        return self.op("Relu", [x], "relu")

    def relu6(self, x: str) -> str:
        lo = self.const(np.array(0.0, np.float32), "clip_min")
        hi = self.const(np.array(6.0, np.float32), "clip_max")
        return self.op("Clip", [x, lo, hi], "relu6")

    def linear(self, x: str, fin: int, fout: int, gain: float = 1.0) -> str:
        """MatMul + Add, the pattern transformer exports use (not Gemm), on any rank."""
        w = self.weight((fin, fout), fan_in=fin, prefix="fc_w", gain=gain)
        b = self.const((0.01 * self.rng.standard_normal(fout)).astype(np.float32), "fc_b")
        return self.op("Add", [self.op("MatMul", [x, w], "matmul"), b], "add")

    def gemm(self, x: str, fin: int, fout: int) -> str:
        w = self.weight((fout, fin), fan_in=fin, prefix="fc_w", gain=1.0)
        b = self.const(np.zeros(fout, np.float32), "fc_b")
        return self.op("Gemm", [x, w, b], "gemm", transB=1)

    # -- finish --------------------------------------------------------------------------------
    def build(self, inputs: list[tuple[str, str, list[int]]], outputs: list[tuple[str, str, list[int]]]
              ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, self.name,
            [helper.make_tensor_value_info(n, _ONNX_DTYPES[d], s) for n, d, s in inputs],
            [helper.make_tensor_value_info(n, _ONNX_DTYPES[d], s) for n, d, s in outputs],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="pipeline.models")
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model
