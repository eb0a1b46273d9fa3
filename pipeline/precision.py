"""`--precision fp16|bf16`: mixed precision with Relax's ToMixedPrecision.

Convolutions and matmuls take half-precision operands and accumulate in fp32; the elementwise ops
between them run in half precision. The model's inputs and outputs stay fp32, so the artifact's
interface does not change. bf16 is ToMixedPrecision (which knows only fp16) followed by a rewrite
of every fp16 cast it inserted to bf16. A mixed-precision build is judged like an int8 one
(pipeline.int8.Int8Gate: top-1 agreement / cosine against fp32 ONNX Runtime, bounded by
--max-accuracy-drop), not by the fp32 tolerance.
"""

from __future__ import annotations

from pipeline.errors import UserError

PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision


def mixed_precision_pass(precision: str = "fp32"):
    """The pass for `precision`: an empty Sequential for fp32."""
    from tvm import relax, transform

    check_precision(precision)
    if precision == "fp32":
        return transform.Sequential([], name="KeepFP32")
    steps = [relax.transform.ToMixedPrecision(out_dtype="float32")]
    if precision == "bf16":
        steps += [_fp16_to_bf16(), relax.transform.Normalize()]
    return transform.Sequential(steps, name=f"ToMixedPrecision({precision})")


def _fp16_to_bf16():
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    astype = relax.op.astype

    @mutator
    class _Rewrite(PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if getattr(call.op, "name", "") == "relax.astype" and str(call.attrs.dtype) == "float16":
                return astype(call.args[0], "bfloat16")
            return call

    @relax.transform.function_pass(opt_level=0, name="FP16ToBF16")
    class _Pass:
        def transform_function(self, func, mod, _ctx):
            return _Rewrite(mod).visit_expr(func)

    return _Pass()


def op_dtypes(mod, ops: tuple[str, ...] = ("relax.nn.conv2d", "relax.matmul")) -> dict[str, set[str]]:
    """{op name: dtypes of its first operand} over the Relax functions of `mod` (tests, logs)."""
    from tvm import relax

    found: dict[str, set[str]] = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") in ops:
            found.setdefault(expr.op.name, set()).add(str(expr.args[0].ty.dtype))

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found
