"""WinogradConv2D: rewrite 3x3 stride-1 NHWC convs with constant weights into Winograd form.

    conv2d(x, w)  ->  output_transform( matmul( input_transform(x), U ) )

with U = G w G^T computed here, once, from the constant weight. The matmul is an ordinary Relax
matmul of alpha^2 independent GEMMs, so it is legalized, fused, tuned and prepacked like any other;
the transforms are our TE kernels (schedules/cpu/winograd.py). The output transform is injective,
so FuseOps folds the conv's bias, residual add and ReLU into it.

Which convs, and which tile: a larger tile saves more multiplies but multiplies the weight by
alpha^2 / 9 (U is what the GEMM streams from memory) and wastes work on partial tiles. ResNet-50
on this 2-core AVX-512 machine: F(4x4) wins at 56x56 and 28x28, F(2x2) at 14x14, and direct
convolution at 7x7, where a few tiles would stream 4x (F(4)) or 1.8x (F(2)) the weights.
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

log = logging.getLogger(__name__)

MIN_TILES = 32          # tiles per image below which the GEMMs are too short to pay for U
MIN_CHANNELS = 16
OPAQUE = 8              # relax OpPatternKind::kOpaque


def winograd_tile(height: int, width: int, in_channels: int, out_channels: int) -> int | None:
    """The output tile m for a 3x3 stride-1 conv of this output size, or None for direct conv."""
    if min(in_channels, out_channels) < MIN_CHANNELS:
        return None
    for m in (4, 2):
        if height % m == 0 and width % m == 0 and (height // m) * (width // m) >= MIN_TILES:
            return m
    return None


def _conv_tile(call: relax.Call) -> int | None:
    attrs = call.attrs
    data, weight = call.args
    if not isinstance(weight, tvm.ir.expr.GenericConst):
        return None
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NHWC", "OHWI", "NHWC"):
        return None
    if int(attrs.groups) != 1 or [int(s) for s in attrs.strides] != [1, 1] or \
            [int(d) for d in attrs.dilation] != [1, 1] or [int(p) for p in attrs.padding] != [1] * 4:
        return None
    shape = data.ty.shape if hasattr(data.ty, "shape") else None
    if shape is None or not all(isinstance(s, tvm.tirx.IntImm) for s in shape):
        return None
    if str(data.ty.dtype) != "float32" or str(call.ty.dtype) != "float32":
        return None
    k, kh, kw, c = (int(x) for x in weight.value.shape)
    if (kh, kw) != (3, 3):
        return None
    _, h, w, _ = (int(s) for s in shape)
    return winograd_tile(h, w, c, k)


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.rewritten: list[str] = []

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op != tvm.ir.Op.get("relax.nn.conv2d"):
            return call
        m = _conv_tile(call)
        if m is None:
            return call
        from schedules.cpu.winograd import input_transform, output_transform, transform_weight

        data, weight = call.args
        n, h, w, _ = (int(s) for s in data.ty.shape)
        k = int(weight.value.shape[0])
        u = relax.const(transform_weight(weight.value.numpy(), m))
        # Opaque to FuseOps: fused behind the previous conv's output transform (conv -> ReLU ->
        # conv in ResNet-18), it would recompute that whole transform for every tile it reads.
        v = self.builder_.emit(self.builder_.call_te(
            input_transform, data, m, primfunc_name_hint="winograd_input",
            primfunc_attrs={"op_pattern": OPAQUE}))
        product = self.builder_.emit(relax.op.matmul(v, u))
        self.rewritten.append(f"{n}x{h}x{w}x{k}:F({m}x{m},3x3)")
        return self.builder_.call_te(output_transform, product, m, (n, h, w, k),
                                     primfunc_name_hint="winograd_output")


@tvm.transform.module_pass(opt_level=0, name="WinogradConv2D")
def WinogradConv2D(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    rewriter = _Rewriter(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    mod = rewriter.builder_.get()     # holds the transform PrimFuncs that call_te added
    if rewriter.rewritten:
        log.info("winograd: %d convs (%s)", len(rewriter.rewritten), ", ".join(rewriter.rewritten))
    return mod

