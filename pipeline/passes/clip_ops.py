"""ClipCallTIRToOps: turn the ONNX frontend's ReLU6 back into Relax ops.

The frontend lowers Clip straight to `call_tir(topi.maximum / topi.minimum)` with the bound as a
0-d tensor. ConvertLayout cannot see through call_tir, so every ReLU6 in MobileNetV2 came out
wrapped in an NHWC->NCHW->NHWC transpose pair (a third of its kernels). `R.maximum` /
`R.minimum` with the same 0-d bound compute the same thing, follow the layout, and fuse into the
conv's epilogue.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

_OPS = {"maximum": relax.op.maximum, "minimum": relax.op.minimum}


def _elementwise_op(gv, func) -> str | None:
    """'maximum' / 'minimum' when `func` is topi's elementwise max/min of a tensor and a scalar
    (the frontend names them after the topi op, numbered)."""
    if not isinstance(func, tirx.PrimFunc) or len(func.params) != 3:
        return None
    base = gv.name_hint.rstrip("0123456789_")
    return base if base in _OPS else None


def _ndim(expr) -> int | None:
    return int(expr.ty.ndim) if hasattr(expr.ty, "ndim") else None


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod_ = mod

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op != tvm.ir.Op.get("relax.call_tir") or not isinstance(call.args[0], relax.GlobalVar):
            return call
        op = _elementwise_op(call.args[0], self.mod_[call.args[0]])
        args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else []
        if op is None or len(args) != 2:
            return call
        if _ndim(args[1]) != 0:
            return call
        return _OPS[op](args[0], args[1])


@tvm.transform.module_pass(opt_level=0, name="ClipCallTIRToOps")
def ClipCallTIRToOps(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    rewriter = _Rewriter(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mod[gv] = rewriter.visit_expr(func)
    return relax.transform.DeadCodeElimination()(mod)
