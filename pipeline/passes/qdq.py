"""Pre-quantized ONNX models (QDQ form) onto the integer kernels, with the model's own scales.

A QDQ model (onnxruntime.quantization.quantize_static, QuantFormat.QDQ) imports as float ops wrapped in
`quantize`/`dequantize` pairs: `conv2d(dequantize(quantize(x, s_x, z_x)), dequantize(Wq, s_w))`, run in
float (fake-quant). Each such conv2d / matmul becomes the integer form of passes/quantize.py (uint8 x int8
-> int32, bias and zero point folded, `* (s_x * s_w)`), with no calibration: s_x, z_x come from the QDQ
pair and the weights are the model's integers at the model's scales.

Two passes, because the weight scales do not survive to where the integer rewrite runs:

    RecordQDQWeights  before the first FoldConstant, which folds `dequantize(Wq, s_w)` into a float constant
                      and ConvertLayout then transposes it, so the (Wq, s_w, z_w, axis) of every constant
                      dequantize is kept as a module attribute before that happens.
    QDQToInteger      just before WinogradConv2D, where our own int8 rewrite runs (the sites must be
                      NHWC / OHWI already): a site's float constant weight is matched to the record it was
                      folded from, and the site is rewritten by passes.quantize.quantize_int8.

The activation Q/DQ pairs stay: their other users (a residual add, a pool) still read the fake-quantized
value, and a Q whose zero point is 0 is the ReLU that ORT's quantizer removed. Only the integer input of a
site is shortened: quantize(dequantize(q)) is q, and ConvertLayout's transposes around the pair (it has no
layout rule for quantize) cancel, so a site reads quantize(y) of the previous layer's NHWC output. A site
whose QDQ the target's kernel does not take (int8 activations on x86 VNNI, asymmetric or 8-bit-range
weights, channel counts the dot product cannot tile) keeps the float path, with the reason logged.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from pipeline.calibrate import QuantParams, quantize_weight
from pipeline.passes.quantize import QuantPlan, QuantSite, _attrs, _substitute, find_sites, quantize_int8

log = logging.getLogger(__name__)

WEIGHTS_ATTR = "tvm_autotune.qdq_weights"   # [[Wq, scale, zero point, axis], ...] until QDQToInteger
SUMMARY_ATTR = "tvm_autotune.qdq"           # JSON: which sites run in integers, which stay float and why
_LAYOUT_OPS = ("relax.permute_dims", "relax.reshape")


def _op(name: str):
    return tvm.ir.Op.get(name)


def _is_call(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.same_as(_op(name))


def _const(expr) -> np.ndarray | None:
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.GenericConst) else None


def _relax_functions(mod: tvm.IRModule):
    return [f for _, f in mod.functions_items() if isinstance(f, relax.Function)]


def has_qdq(mod: tvm.IRModule) -> bool:
    """Whether any Relax function in `mod` has a quantize or dequantize call."""
    found = []

    def visit(e):
        if _is_call(e, "relax.quantize") or _is_call(e, "relax.dequantize"):
            found.append(e)
    for func in _relax_functions(mod):
        relax.analysis.post_order_visit(func, visit)
        if found:
            return True
    return False


def qdq_summary(mod: tvm.IRModule) -> dict | None:
    """What QDQToInteger did to `mod` ({"int8": [site, ...], "float": {site: why}, "int8_macs_fraction"}),
    None for a model without QDQ."""
    value = mod.attrs.get(SUMMARY_ATTR) if mod.attrs else None
    return json.loads(str(value)) if value is not None else None


# --- RecordQDQWeights -------------------------------------------------------------------------------------

@tvm.transform.module_pass(opt_level=0, name="RecordQDQWeights")
def RecordQDQWeights(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    if not has_qdq(mod):
        return mod
    records = []

    def visit(e):
        if not _is_call(e, "relax.dequantize"):
            return
        q, scale, zp = (_const(a) for a in e.args)
        if q is not None and scale is not None and zp is not None and q.ndim >= 2:
            records.append([e.args[0], e.args[1], e.args[2], int(e.attrs.axis)])
    for func in _relax_functions(mod):
        relax.analysis.post_order_visit(func, visit)
    log.info("QDQ model: %d constant weight dequantizes recorded", len(records))
    return mod.with_attr(WEIGHTS_ATTR, records)


@dataclass
class _WeightRecord:
    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int


def _records(mod: tvm.IRModule) -> list[_WeightRecord]:
    raw = mod.attrs.get(WEIGHTS_ATTR) if mod.attrs else None
    return [_WeightRecord(r[0].value.numpy(), r[1].value.numpy(), r[2].value.numpy(), int(r[3]))
            for r in (raw or [])]


def _match_weight(site: QuantSite, records: list[_WeightRecord], weight_max: int = 127
                  ) -> tuple[np.ndarray | None, str]:
    """(per-output-channel scales, "") for the record `site.weight` was folded from, or (None, why)."""
    w = site.weight
    axis = site.channels_last_axis
    perms = [tuple(range(w.ndim))] + ([(0, 2, 3, 1)] if w.ndim == 4 else [(1, 0)] if w.ndim == 2 else [])
    for r in records:
        if r.q.ndim != w.ndim or r.q.size != w.size:
            continue
        for perm in perms:
            q = r.q.transpose(perm)
            if q.shape != w.shape:
                continue
            per_channel = r.scale.ndim == 1 and r.scale.size > 1
            moved = perm.index(r.axis % r.q.ndim)
            if per_channel and moved != axis:
                continue
            shape = [1] * w.ndim
            if per_channel:
                shape[axis] = -1
            scale = r.scale.astype(np.float32).reshape(shape)
            zp = r.zero_point.astype(np.float32).reshape(shape) if r.zero_point.size > 1 else \
                np.float32(r.zero_point.reshape(()))
            if not np.allclose((q.astype(np.float32) - zp) * scale, w, rtol=1e-6, atol=0):
                continue
            if r.q.dtype != np.int8 or np.any(r.zero_point != 0):
                return None, (f"weights are {r.q.dtype} with zero point "
                              f"{'non-zero' if np.any(r.zero_point != 0) else 0}: the kernel takes "
                              "symmetric int8 weights")
            scales = np.broadcast_to(r.scale.astype(np.float32).reshape(-1), (w.shape[axis],)).copy()
            if not np.array_equal(quantize_weight(w, scales, axis), q):
                return None, "weights use -128, outside the kernel's symmetric [-127, 127]"
            if np.abs(q.astype(np.int16)).max() > weight_max:
                # pmaddubsw (x86 without VNNI) saturates its int16 pair sums past |w| = 63; a model
                # quantized with ORT's reduce_range fits, a full-range one would be wrong, not slow.
                return None, (f"weights reach |q| = {np.abs(q.astype(np.int16)).max()}; the target's "
                              f"kernel is exact up to {weight_max}")
            return scales, ""
    return None, "weight is no dequantize of a constant (not quantized in the model)"


# --- QDQToInteger ------------------------------------------------------------------------------------------

def _scalar(expr) -> float | None:
    v = _const(expr)
    return v.reshape(()).item() if v is not None and v.size == 1 else None


def _params(call: relax.Call) -> tuple[float, int] | None:
    """(scale, zero point) of a per-tensor quantize / dequantize."""
    scale, zp = _scalar(call.args[1]), _scalar(call.args[2])
    return (float(np.float32(scale)), int(zp)) if scale is not None and zp is not None else None


def _through_layout(expr, bound: dict) -> tuple[object, list[relax.Call]]:
    """(the first value that is no layout op, the layout ops from it outwards to `expr`)."""
    ops = []
    while isinstance(expr, relax.Var) and any(_is_call(bound.get(expr), n) for n in _LAYOUT_OPS):
        ops.append(bound[expr])
        expr = bound[expr].args[0]
    return expr, ops[::-1]


def _is_identity(ops: list[relax.Call], ndim: int) -> bool:
    perm = list(range(ndim))
    for call in ops:
        if not _is_call(call, "relax.permute_dims"):
            return False
        axes = call.attrs.axes
        axes = [int(a) for a in axes] if axes is not None else list(range(len(perm)))[::-1]
        perm = [perm[a] for a in axes]
    return perm == list(range(ndim))


def _activation(site: QuantSite, bound: dict) -> tuple[QuantParams | None, relax.Var, str]:
    """The site's input quantization from its QDQ pair, and the float var to quantize: the pre-Q tensor
    when only cancelling transposes lie between it and the site, else the site's own input."""
    dq_var, after = _through_layout(site.data, bound)
    dq = bound.get(dq_var)
    if not _is_call(dq, "relax.dequantize"):
        return None, site.data, "activation is not dequantized (not quantized in the model)"
    params = _params(dq)
    if params is None:
        return None, site.data, "activation quantized per channel"
    act = QuantParams(params[0], params[1], str(dq.args[0].ty.dtype))
    y, before = _through_layout(dq.args[0], bound)
    q = bound.get(y)
    if _is_call(q, "relax.quantize") and _params(q) == params and isinstance(q.args[0], relax.Var):
        src, layout = _through_layout(q.args[0], bound)
        if isinstance(src, relax.Var) and _is_identity(layout + before + after, int(site.data.ty.ndim)):
            return act, src, ""
    return act, site.data, ""


def _plan(func: relax.Function, sites: list[QuantSite], records: list[_WeightRecord], act_dtype: str,
          weight_max: int) -> tuple[QuantPlan, dict[str, str]]:
    from pipeline.quantize import unsupported

    bound = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    plan, kept = QuantPlan(weight_max=weight_max), {}
    for site in sites:
        act, data, why = _activation(site, bound)
        if act is None:
            log.debug("QDQ: %s is not quantized in the model: %s", site.name, why)
            continue
        scales, why = _match_weight(site, records, weight_max)
        if scales is not None and act.dtype != act_dtype:
            why = f"activations are {act.dtype}; the target's dot-product kernel takes {act_dtype}"
        why = why or unsupported(site)
        if why:
            kept[site.name] = why
            log.info("QDQ: %s stays on the float (fake-quant) path: %s", site.name, why)
            continue
        site.data = data
        plan.activations[site.name] = act
        plan.weight_scales[site.name] = scales
    return plan, kept


def _fold_requantize(mod: tvm.IRModule) -> tvm.IRModule:
    """quantize(L(dequantize(q, s, z)), s, z) -> L(q) for layout ops L: the round trip is exact."""
    func = mod["main"]
    bound = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    bb = relax.BlockBuilder()
    with bb.function("main", list(func.params), attrs=_attrs(func)):
        remap: dict = {}
        for block in func.body.blocks:
            with bb.dataflow() if isinstance(block, relax.DataflowBlock) else nullcontext():
                for binding in block.bindings:
                    value = _requantized(binding.value, bound, remap)
                    if value is None:
                        value = _substitute(binding.value, remap)
                    var = binding.var
                    is_output = isinstance(block, relax.DataflowBlock) and \
                        not isinstance(var, relax.DataflowVar)
                    remap[var] = bb.emit_output(value) if is_output else bb.emit(value)
        bb.emit_func_output(_substitute(func.body.body, remap))
    new = tvm.IRModule(dict(mod.functions_items()))
    new["main"] = bb.get()["main"]
    return new


def _requantized(value, bound: dict, remap: dict):
    if not _is_call(value, "relax.quantize") or not isinstance(value.args[0], relax.Var):
        return None
    dq_var, layout = _through_layout(value.args[0], bound)
    dq = bound.get(dq_var)
    if not _is_call(dq, "relax.dequantize") or _params(dq) is None or _params(dq) != _params(value) \
            or str(dq.args[0].ty.dtype) != str(value.attrs.out_dtype):
        return None
    out = remap.get(dq.args[0], dq.args[0])
    for call in layout:
        out = relax.Call(call.op, [out, *call.args[1:]], call.attrs, call.ty_args) \
            if _is_call(call, "relax.permute_dims") else relax.op.reshape(out, call.args[1])
    return out


def _target_kernel() -> tuple[str, int]:
    """(activation dtype, |weight| bound) of the current target's integer kernel."""
    from pipeline.int8 import activation_dtype, weight_max

    target = tvm.target.Target.current(allow_none=True)
    return (activation_dtype(target), weight_max(target)) if target is not None else ("uint8", 127)


@tvm.transform.module_pass(opt_level=0, name="QDQToInteger")
def QDQToInteger(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    if not has_qdq(mod) and not (mod.attrs and WEIGHTS_ATTR in mod.attrs):
        return mod
    # quantize_int8 builds a new module: keep the others' module attributes, drop our records.
    attrs = {k: v for k, v in (mod.attrs or {}).items() if k != WEIGHTS_ATTR}
    records = _records(mod)
    sites = find_sites(mod["main"])
    plan, kept = _plan(mod["main"], sites, records, *_target_kernel())
    lowered = [s.name for s in sites if s.name in plan.activations]
    if lowered:
        mod = _fold_requantize(quantize_int8(mod, sites, plan))
        mod = relax.transform.DeadCodeElimination(["main"])(mod)
    macs = sum(s.macs for s in sites if s.name in plan.activations or s.name in kept) or 1
    int8_macs = sum(s.macs for s in sites if s.name in plan.activations) / macs
    log.info("QDQ model: %d conv2d/matmul in integers (%s, %.0f%% of the quantized MACs), %d kept float",
             len(lowered), ", ".join(lowered) or "none", 100 * int8_macs, len(kept))
    if mod.attrs and WEIGHTS_ATTR in mod.attrs:
        mod = mod.without_attr(WEIGHTS_ATTR)
    for k, v in attrs.items():
        mod = mod.with_attr(k, v)
    return mod.with_attr(SUMMARY_ATTR, json.dumps({"int8": lowered, "float": kept,
                                                   "int8_macs_fraction": round(int8_macs, 4)}))
