"""Int8 rewrite of conv2d / matmul with constant weights (post-training static quantization).

Each quantized site `y = conv2d(x, W) [+ b]` becomes

    xq  = quantize(x, s_x, z_x)                      (uint8 or int8, per tensor)
    acc = conv2d(xq, Wq, out_dtype=int32) + b_q       (Wq int8, symmetric per output channel)
    y   = float(acc) * (s_x * s_w)                    (per output channel)

with `b_q = round(b / (s_x * s_w)) - z_x * sum(Wq)`: the bias and the activation zero point fold into
one int32 constant. For the zero-point term to be exact under padding, an input with z_x != 0 is
padded explicitly with z_x (its real value 0) before a conv without padding. FuseOps then puts the
dequantize, bias, ReLU, residual add and the next layer's quantize into the integer kernel's
epilogue, so activations between quantized layers travel as 8-bit.

Sites are named `conv2d_<i>` / `matmul_<i>` in graph order; `--keep-fp32` takes these names.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from pipeline.calibrate import QuantParams, quantize_weight, weight_scales


@dataclass
class QuantSite:
    name: str                     # conv2d_<i> / matmul_<i>, graph order
    kind: str                     # "conv2d" or "matmul"
    output: relax.Var             # the op's result var
    data: relax.Var               # the activation operand
    weight: np.ndarray            # OHWI (conv2d) or [K, N] (matmul), float32
    bias_var: relax.Var | None = None   # the `add` that only adds a per-channel constant
    bias: np.ndarray | None = None      # [channels]
    macs: int = 0
    attrs: dict = field(default_factory=dict)   # conv2d: strides, padding, dilation (ints)

    @property
    def channels_last_axis(self) -> int:
        return 0 if self.kind == "conv2d" else 1


@dataclass
class QuantPlan:
    activations: dict[str, QuantParams] = field(default_factory=dict)   # site name -> x's params
    keep_fp32: dict[str, str] = field(default_factory=dict)             # site name -> why
    # Site name -> per-output-channel weight scales to use instead of max|w| / 127: a pre-quantized
    # (QDQ) model's own scales, so the int8 weights are exactly the model's integers.
    weight_scales: dict[str, np.ndarray] = field(default_factory=dict)
    weight_max: int = 127       # |int8 weight| bound of the target's kernel (63: pmaddubsw)


def _const(expr) -> np.ndarray | None:
    if isinstance(expr, tvm.ir.expr.GenericConst):
        return expr.value.numpy()
    return None


def _bindings(func: relax.Function):
    for block in func.body.blocks:
        yield from block.bindings


def _uses(func: relax.Function) -> dict[relax.Var, int]:
    counts: dict = {}

    def visit(e):
        if isinstance(e, relax.Var):
            counts[e] = counts.get(e, 0) + 1
        elif isinstance(e, relax.Tuple):
            for f in e.fields:
                visit(f)
        elif isinstance(e, relax.Call):
            for a in e.args:
                visit(a)
    for b in _bindings(func):
        visit(b.value)
    visit(func.body.body)
    return counts


def find_sites(func: relax.Function) -> list[QuantSite]:
    """The float32 conv2d (NHWC/OHWI, groups 1) and matmul ([..., K] x const [K, N]) calls."""
    conv_op, matmul_op, add_op = (tvm.ir.Op.get(n) for n in ("relax.nn.conv2d", "relax.matmul",
                                                              "relax.add"))
    sites: list[QuantSite] = []
    by_output: dict = {}
    uses = _uses(func)
    counters = {"conv2d": 0, "matmul": 0}
    for b in _bindings(func):
        call = b.value
        if not isinstance(call, relax.Call):
            continue
        if call.op.same_as(add_op) and isinstance(call.args[0], relax.Var) \
                and call.args[0] in by_output and uses.get(call.args[0], 0) == 1:
            site, bias = by_output[call.args[0]], _const(call.args[1])
            channels = site.weight.shape[site.channels_last_axis]
            if bias is not None and bias.size == channels and bias.shape[-1] == channels:
                site.bias_var, site.bias = b.var, bias.reshape(-1).astype(np.float32)
            continue
        kind = "conv2d" if call.op.same_as(conv_op) else "matmul" if call.op.same_as(matmul_op) else None
        if kind is None or not isinstance(call.args[0], relax.Var):
            continue
        weight = _const(call.args[1])
        if weight is None or str(call.args[0].ty.dtype) != "float32" or weight.dtype != np.float32:
            continue
        if kind == "conv2d":
            a = call.attrs
            if (a.data_layout, a.kernel_layout, int(a.groups)) != ("NHWC", "OHWI", 1):
                continue
            out_shape = [int(d) for d in b.var.ty.shape]
            macs = int(np.prod(out_shape)) * int(np.prod(weight.shape[1:]))
            attrs = {k: [int(v) for v in getattr(a, k)] for k in ("strides", "padding", "dilation")}
        else:
            if weight.ndim != 2:
                continue
            out_shape = [int(d) for d in b.var.ty.shape]
            macs = int(np.prod(out_shape)) * weight.shape[0]
            attrs = {}
        site = QuantSite(f"{kind}_{counters[kind]}", kind, b.var, call.args[0], weight, macs=macs,
                         attrs=attrs)
        counters[kind] += 1
        sites.append(site)
        by_output[b.var] = site
    return sites


def observer_module(mod: tvm.IRModule, sites: list[QuantSite]) -> tvm.IRModule:
    """`main` also returns every site's activation input (after the original outputs), so one
    run of the float model gives the calibration statistics."""
    func = mod["main"]
    block = func.body.blocks[-1]
    if not isinstance(block, relax.DataflowBlock):
        raise TypeError("main has no dataflow block to observe")
    observed = list(dict.fromkeys(s.data for s in sites))
    out = func.body.body
    fields = list(out.fields) if isinstance(out, relax.Tuple) else [out]
    bb = relax.BlockBuilder()
    with bb.function("main", list(func.params), attrs=_attrs(func)):
        with bb.dataflow():
            remap = {}
            for binding in _bindings(func):
                remap[binding.var] = bb.emit(_substitute(binding.value, remap))
            result = bb.emit_output(relax.Tuple([_substitute(f, remap) for f in fields]
                                                + [remap.get(v, v) for v in observed]))
        bb.emit_func_output(result)
    new = mod.clone() if hasattr(mod, "clone") else tvm.IRModule(dict(mod.functions_items()))
    new["main"] = bb.get()["main"]
    return new


def _substitute(expr, remap: dict):
    if isinstance(expr, relax.Var):
        return remap.get(expr, expr)
    if isinstance(expr, relax.Tuple):
        return relax.Tuple([_substitute(f, remap) for f in expr.fields])
    if isinstance(expr, relax.TupleGetItem):
        return relax.TupleGetItem(_substitute(expr.tuple_value, remap), expr.index)
    if isinstance(expr, relax.Call):
        return relax.Call(expr.op, [_substitute(a, remap) for a in expr.args], expr.attrs,
                          expr.ty_args)
    return expr


def quantize_int8(mod: tvm.IRModule, sites: list[QuantSite], plan: QuantPlan) -> tvm.IRModule:
    """Rewrite the sites that have activation parameters in `plan` (and are not kept in fp32)."""
    func = mod["main"]
    chosen = {s.output: s for s in sites if s.name in plan.activations and s.name not in plan.keep_fp32}
    bias_of = {s.bias_var: s for s in chosen.values() if s.bias_var is not None}
    producers = {b.var: b.value for b in _bindings(func)}
    float_uses = _uses(func)          # minus the quantized sites' own reads, below
    for s in chosen.values():
        float_uses[s.data] -= 1
    outputs = set(_uses_in(func.body.body))
    bb = relax.BlockBuilder()
    with bb.function("main", list(func.params), attrs=_attrs(func)):
        remap: dict = {}
        quantized: dict = {}          # (input var, params) -> quantized activation, shared by sites
        for block in func.body.blocks:
            with bb.dataflow() if isinstance(block, relax.DataflowBlock) else nullcontext():
                for binding in block.bindings:
                    var = binding.var
                    if var in chosen:
                        site = chosen[var]
                        act = plan.activations[site.name]
                        key = (site.data, act.scale, act.zero_point, act.dtype)
                        if key not in quantized:
                            quantized[key] = _quantize_input(bb, site.data, act, remap, producers)
                            if float_uses.get(site.data, 0) > 0 and site.data not in outputs:
                                # The other readers (a residual add) take the 8-bit value too, so
                                # its producer has one consumer and FuseOps puts the quantize in its
                                # epilogue: one 8-bit tensor written instead of a float one and a
                                # separate quantize pass over it. ORT's QDQ graphs do the same.
                                remap[site.data] = bb.emit(_dequantize(quantized[key], act))
                        value = _emit_site(bb, site, act, remap.get(site.data, site.data),
                                           binding.value, quantized,
                                           plan.weight_scales.get(site.name), plan.weight_max)
                    elif var in bias_of:
                        value = remap[bias_of[var].output]       # the bias is inside the int32 sum
                    else:
                        value = _substitute(binding.value, remap)
                    is_output = not isinstance(var, relax.DataflowVar) and isinstance(
                        block, relax.DataflowBlock)
                    remap[var] = bb.emit_output(value) if is_output else bb.emit(value)
        bb.emit_func_output(_substitute(func.body.body, remap))
    new = tvm.IRModule(dict(mod.functions_items()))
    new["main"] = bb.get()["main"]
    # The float producers the 8-bit values replaced (a max pool before its quantize) are dead now.
    return relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(new))


def _uses_in(expr) -> list:
    if isinstance(expr, relax.Var):
        return [expr]
    if isinstance(expr, relax.Tuple):
        return [v for f in expr.fields for v in _uses_in(f)]
    return []


def _scale_and_zero_point(data, act: QuantParams):
    """Per-channel-shaped (equal values) where the channel count is static: a scalar constant is
    inlined into the kernel as a literal, which makes each kernel's tuning workload depend on the
    calibration; as arrays they are kernel arguments, and tuning records carry over to any
    calibration of the same model."""
    shape = getattr(getattr(data, "ty", None), "shape", None)
    last = shape[-1] if shape is not None and len(shape) else None
    if isinstance(last, tvm.tirx.IntImm):
        n = int(last)
        return (relax.const(np.full(n, act.scale, np.float32)),
                relax.const(np.full(n, act.zero_point, np.dtype(act.dtype))))
    return relax.const(np.float32(act.scale)), relax.const(np.dtype(act.dtype).type(act.zero_point))


def _quantize(data, act: QuantParams):
    scale, zero_point = _scale_and_zero_point(data, act)
    return relax.op.quantize(data, scale, zero_point, axis=-1, out_dtype=act.dtype)


def _dequantize(xq, act: QuantParams):
    scale, zero_point = _scale_and_zero_point(xq, act)
    return relax.op.dequantize(xq, scale, zero_point, axis=-1, out_dtype="float32")


_MAX_POOL = tvm.ir.Op.get("relax.nn.max_pool2d")
DOT_DEPTH = 4    # 8-bit products per int32 lane of every dot instruction we use (VNNI, pmaddubsw, sdot)
VECTOR_LANES = 16   # int32 accumulators per vector the widest kernel (AVX-512) tiles output channels by


def _quantize_input(bb: relax.BlockBuilder, data: relax.Var, act: QuantParams, remap: dict,
                    producers: dict):
    """quantize(data), emitted. quantize(max_pool(x)) == max_pool(quantize(x)) (quantize is
    monotonic, and the 8-bit pool pads with the type's minimum, which quantize maps -inf to), so a
    max pool's input is quantized instead: the quantize fuses into the conv before the pool and the
    pool moves a quarter of the bytes (ResNet's stem: 2.6 ms of float pool + quantize otherwise)."""
    pool = producers.get(data)
    if isinstance(pool, relax.Call) and pool.op.same_as(_MAX_POOL) and isinstance(pool.args[0], relax.Var):
        xq = bb.emit(_quantize(remap.get(pool.args[0], pool.args[0]), act))
        return bb.emit(relax.Call(pool.op, [xq], pool.attrs))
    return bb.emit(_quantize(remap.get(data, data), act))


def _emit_site(bb: relax.BlockBuilder, site: QuantSite, act: QuantParams, data, call: relax.Call,
               quantized: dict, w_scales: np.ndarray | None = None, weight_max: int = 127):
    axis = site.channels_last_axis
    if w_scales is None:
        w_scales = weight_scales(site.weight, axis, weight_max)
    wq = quantize_weight(site.weight, w_scales, axis, weight_max)
    key = (site.data, act.scale, act.zero_point, act.dtype)
    if key not in quantized:
        quantized[key] = bb.emit(_quantize(data, act))
    xq = quantized[key]
    other_axes = tuple(i for i in range(wq.ndim) if i != axis)
    w_sum = wq.astype(np.int64).sum(axis=other_axes)
    combined = (np.float64(act.scale) * w_scales.astype(np.float64))
    bias = site.bias.astype(np.float64) if site.bias is not None else np.zeros_like(combined)
    bias_q = np.round(bias / combined) - act.zero_point * w_sum
    if site.kind == "conv2d":
        a = call.attrs
        padding = [int(p) for p in a.padding]
        # Input channels up to the dot product's depth (an RGB stem: 3 -> 4), with zero weights,
        # so the layer runs on the integer kernel; the pad value is then irrelevant.
        extra = -wq.shape[3] % DOT_DEPTH
        if extra:
            wq = np.pad(wq, [(0, 0), (0, 0), (0, 0), (0, extra)])
        if (act.zero_point != 0 and any(padding)) or extra:
            top, left, bottom, right = padding
            xq = bb.emit(relax.op.nn.pad(xq, [0, 0, top, bottom, left, right, 0, extra],
                                         pad_value=float(act.zero_point)))
            padding = [0, 0, 0, 0]
        acc = bb.emit(relax.op.nn.conv2d(xq, relax.const(wq), strides=a.strides, padding=padding,
                                         dilation=a.dilation, data_layout="NHWC", kernel_layout="OHWI",
                                         out_dtype="int32"))
    else:
        # Output features up to the kernel's vector of 16 (a 1000-class head), with zero weights,
        # sliced off again: the head then reads a quarter of the weight bytes it reads in fp32.
        n = wq.shape[1]
        extra = -n % VECTOR_LANES
        acc = bb.emit(relax.op.matmul(xq, relax.const(np.pad(wq, [(0, 0), (0, extra)])),
                                      out_dtype="int32"))
        if extra:
            acc = bb.emit(relax.op.strided_slice(acc, axes=[-1], begin=[0], end=[n]))
    acc = bb.emit(relax.op.add(acc, relax.const(bias_q.astype(np.int32))))
    return relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(combined.astype(np.float32)))


def _attrs(func: relax.Function) -> dict:
    return {k: v for k, v in func.attrs.items() if k != "global_symbol"} if func.attrs else {}
