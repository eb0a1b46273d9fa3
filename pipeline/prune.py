"""Magnitude pruning of an ONNX model's linear weights, and a sparsity report per weight.

Pruned: the constant weight of MatMul (B, [K, N]), Gemm (B, [K, N] or [N, K] with transB) and
1x1 Conv ([O, I, 1, 1]). Unstructured pruning zeroes the smallest |w|; block pruning (RxC, in the
[K, N] orientation the sparse kernel reads: R input features x C output features) zeroes the
blocks with the smallest L2 norm, so the sparse pass sees whole empty blocks. Tensors smaller
than `min_size` elements (biases, tiny heads) are left alone: pruning them saves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.errors import UserError


@dataclass
class WeightSparsity:
    name: str
    op: str                   # MatMul, Gemm or Conv
    shape: list[int]          # as stored in the model
    sparsity: float           # fraction of zero elements
    block_sparsity: float     # fraction of all-zero blocks ([K, N] orientation)

    def as_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "shape": self.shape,
                "sparsity": round(self.sparsity, 4), "block_sparsity": round(self.block_sparsity, 4)}


def _kn_view(arr: np.ndarray, op: str, trans_b: bool) -> np.ndarray:
    """The weight as [K, N] (a view or transpose; writes go back through `_from_kn`)."""
    if op == "Conv":
        return arr.reshape(arr.shape[0], arr.shape[1]).T
    return arr.T if trans_b else arr


def _from_kn(kn: np.ndarray, op: str, trans_b: bool, shape) -> np.ndarray:
    if op == "Conv":
        return kn.T.reshape(shape)
    return kn.T if trans_b else kn


def linear_weights(model: onnx.ModelProto, min_size: int = 1024):
    """(initializer, op type, transB) for each prunable weight, each initializer once."""
    inits = {i.name: i for i in model.graph.initializer}
    seen = set()
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
            continue
        name = node.input[1]
        if name not in inits or name in seen:
            continue
        init = inits[name]
        dims = list(init.dims)
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(dims)) < min_size:
            continue
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        if node.op_type == "Conv":
            groups = next((a.i for a in node.attribute if a.name == "group"), 1)
            if len(dims) != 4 or dims[2:] != [1, 1] or groups != 1:
                continue
        elif len(dims) != 2:
            continue
        seen.add(name)
        yield init, node.op_type, trans_b


def prune_array(w: np.ndarray, sparsity: float, block: tuple[int, int] = (1, 1)) -> np.ndarray:
    """W[K, N] with the `sparsity` fraction of its elements (or RxC blocks, by L2 norm) zeroed."""
    r, c = block
    k, n = w.shape
    kp, np_ = -(-k // r) * r, -(-n // c) * c
    padded = np.zeros((kp, np_), w.dtype)
    padded[:k, :n] = w
    norms = np.sqrt((padded.astype(np.float64) ** 2).reshape(kp // r, r, np_ // c, c).sum(axis=(1, 3)))
    drop = round(sparsity * norms.size)
    keep = np.ones(norms.size, bool)
    keep[np.argsort(norms, axis=None, kind="stable")[:drop]] = False
    mask = np.repeat(np.repeat(keep.reshape(norms.shape), r, 0), c, 1)[:k, :n]
    return np.where(mask, w, 0).astype(w.dtype)


def prune_model(model: onnx.ModelProto, sparsity: float, block: tuple[int, int] = (1, 1),
                min_size: int = 1024) -> onnx.ModelProto:
    """A copy of `model` with every prunable weight pruned to `sparsity` (per tensor)."""
    if not 0 <= sparsity < 1:
        raise UserError(f"--sparsity must be in [0, 1), got {sparsity:g}")
    if min(block) < 1:
        raise UserError(f"bad block {block}: sizes must be positive")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    found = False
    for init, op, trans_b in linear_weights(out, min_size):
        arr = numpy_helper.to_array(init)
        pruned = prune_array(np.ascontiguousarray(_kn_view(arr, op, trans_b)), sparsity, block)
        init.CopyFrom(numpy_helper.from_array(
            np.ascontiguousarray(_from_kn(pruned, op, trans_b, arr.shape)), init.name))
        found = True
    if not found:
        raise UserError("the model has no MatMul/Gemm/1x1-Conv weight to prune")
    return out


def sparsity_report(model: onnx.ModelProto, block: tuple[int, int] = (1, 16),
                    min_size: int = 1024) -> list[WeightSparsity]:
    """Zero fraction of each prunable weight, elementwise and in `block` blocks."""
    from pipeline.passes.sparse import block_sparsity

    rows = []
    for init, op, trans_b in linear_weights(model, min_size):
        arr = numpy_helper.to_array(init)
        kn = _kn_view(arr, op, trans_b)
        rows.append(WeightSparsity(init.name, op, list(arr.shape), float((arr == 0).mean()),
                                   block_sparsity(kn, block)))
    return rows
