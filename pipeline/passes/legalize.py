"""Our lowering of `relax.quantize` (passed to LegalizeOps): multiply by the reciprocal of a
constant scale instead of dividing by it. TVM's own legalization divides per element, and a vector
division costs ~10x a multiply: in an int8 conv's epilogue (requantizing for the next layer) that
was a third of the work of a small-K 1x1 conv. x * (1/s) and x / s differ by at most an ulp, which
moves a value across a rounding boundary only at an exact tie: within the quantization noise the
accuracy gate judges.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te


def _pick(t: te.Tensor, indices, axis: int):
    """A quantization parameter for the element at `indices`: per channel, or one for all."""
    if len(t.shape) == 0:
        return t()
    if len(t.shape) == 1 and int(t.shape[0]) > 1:
        return t[indices[axis]]
    return t[(0,) * len(t.shape)]


def legalize_quantize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    from tvm.relax.transform.legalize_ops.qdq import _quantize as tvm_quantize

    data, scale, zero_point = call.args
    if not isinstance(scale, tvm.ir.expr.GenericConst) or not isinstance(
            zero_point, tvm.ir.expr.GenericConst):
        return tvm_quantize(bb, call)
    inverse = relax.const((1.0 / scale.value.numpy().astype(np.float64)).astype(np.float32))
    out_dtype = str(call.attrs.out_dtype)
    axis = int(call.attrs.axis) % len(data.ty.shape)
    lo, hi = (float(v) for v in (np.iinfo(out_dtype).min, np.iinfo(out_dtype).max))

    def compute(x: te.Tensor, inv: te.Tensor, zp: te.Tensor) -> te.Tensor:
        def element(*indices):
            value = te.round(x(*indices) * _pick(inv, indices, axis)) + \
                _pick(zp, indices, axis).astype("float32")
            return te.max(te.min(value, hi), lo).astype(out_dtype)
        return te.compute(x.shape, element, name="quantized")

    return bb.call_te(compute, data, inverse, zero_point, primfunc_name_hint="quantize")


def legalize_ops():
    """LegalizeOps with our quantize lowering."""
    return relax.transform.LegalizeOps({"relax.quantize": legalize_quantize})
