"""The graph-pass list. Each entry is (name, why, pass); the list is printed by `--show-passes`,
logged with every run, and applied in order. A step that does not apply to a target is an empty
Sequential, not an `if` around the call, so the list reads the same everywhere."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NamedPass:
    name: str
    why: str
    make: Callable[[], object]   # builds the tvm.transform.Pass (lazily: passes hold no state)


def _layout_pass(layout: str):
    from tvm import relax, transform

    if layout == "NHWC":
        return relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})
    return transform.Sequential([], name="KeepLayout")


def _prepack_marker(prepack: bool):
    from tvm import relax, transform

    return relax.transform.AttachAttrLayoutFreeBuffers() if prepack else \
        transform.Sequential([], name="NoWeightPrepack")


def _winograd_pass(winograd: bool):
    from tvm import transform

    from pipeline.passes.winograd import WinogradConv2D

    return WinogradConv2D if winograd else transform.Sequential([], name="NoWinograd")


def _legalize_ops():
    from pipeline.passes.legalize import legalize_ops

    return legalize_ops()


def graph_passes(layout: str = "NCHW", prepack: bool = False, winograd: bool = False,
                 precision: str = "fp32") -> list[NamedPass]:
    from tvm.relax import transform as T

    from pipeline.passes.clip_ops import ClipCallTIRToOps
    from pipeline.passes.qdq import QDQToInteger, RecordQDQWeights
    from pipeline.precision import mixed_precision_pass

    return [
        NamedPass("ClipCallTIRToOps", "ReLU6 as Relax max/min ops, so the layout change and fusion "
                  "see through it (the ONNX frontend emits call_tir)", lambda: ClipCallTIRToOps),
        NamedPass("RecordQDQWeights", "pre-quantized (QDQ) models: keep each weight's int8 values and "
                  "scales before FoldConstant folds its dequantize (no-op without QDQ)",
                  lambda: RecordQDQWeights),
        NamedPass("FoldBatchnormToConv2D", "fold BN into the preceding conv's weights (the import "
                  "already fused Conv+BN in ONNX; this catches the rest)", T.FoldBatchnormToConv2D),
        NamedPass("FoldConstant", "materialise the folded weights (ConvertLayout needs constants)",
                  T.FoldConstant),
        NamedPass("DecomposeOpsForInference", "lower the BNs no conv precedes to elementwise ops",
                  T.DecomposeOpsForInference),
        NamedPass("CanonicalizeBindings", "drop trivial bindings left by the rewrites",
                  T.CanonicalizeBindings),
        NamedPass(f"ConvertLayout({layout})", "the data layout the target's conv schedules want",
                  lambda: _layout_pass(layout)),
        NamedPass("FoldConstant", "fold weight transposes from the layout change", T.FoldConstant),
        NamedPass("QDQToInteger", "QDQ models: conv2d / matmul between quantize/dequantize pairs to "
                  "the integer kernels, at the model's own scales (no-op without QDQ)",
                  lambda: QDQToInteger),
        NamedPass(f"WinogradConv2D({'on' if winograd else 'off'})", "3x3 stride-1 convs as Winograd "
                  "F(4x4) / F(2x2): 2.25-4x fewer multiplies, weights transformed at compile time",
                  lambda: _winograd_pass(winograd)),
        NamedPass("FastMathTransform", "erf, exp, tanh and softmax as vectorizable polynomial "
                  "approximations (libm's erff is scalar: BERT-mini's GELU kernel took 2x its "
                  "matmul); verification checks the result", T.FastMathTransform),
        NamedPass(f"ToMixedPrecision({precision})", "--precision fp16|bf16: conv2d / matmul operands "
                  "in half precision, accumulated in fp32; elementwise ops between them in half "
                  "precision (empty for fp32)", lambda: mixed_precision_pass(precision)),
        NamedPass("LegalizeOps", "lower each Relax op to a TIR PrimFunc (quantize: times the "
                  "reciprocal scale, not a per-element division)", _legalize_ops),
        NamedPass("AnnotateTIROpPattern", "classify kernels (injective, reduction, ...) for fusion",
                  T.AnnotateTIROpPattern),
        NamedPass("FoldConstant", "fold TIR computations on constants", T.FoldConstant),
        NamedPass("FuseOps", "group producers with their elementwise consumers", T.FuseOps),
        NamedPass("FuseTIR", "merge each group into one PrimFunc: one tuning task", T.FuseTIR),
        NamedPass("DeadCodeElimination", "remove functions nothing calls any more",
                  T.DeadCodeElimination),
        NamedPass(f"AttachAttrLayoutFreeBuffers({'on' if prepack else 'off'})",
                  "mark weights as layout-free so tuned kernels may ask for a prepacked layout",
                  lambda: _prepack_marker(prepack)),
    ]


def preset_passes(tuning: dict, winograd: bool | None = None, precision: str = "fp32"
                  ) -> tuple[list[NamedPass], list[NamedPass]]:
    """(graph passes, post-tuning passes) for a target preset's `tuning` section; `winograd`
    overrides the preset's choice when not None."""
    prepack = bool(tuning.get("weight_prepack", False))
    use_winograd = bool(tuning.get("winograd", False)) if winograd is None else winograd
    return (graph_passes(tuning.get("layout", "NCHW"), prepack, use_winograd, precision),
            post_tuning_passes(prepack))


def post_tuning_passes(prepack: bool = False) -> list[NamedPass]:
    """After the database is applied: move the weight layout rewrites the tuned kernels asked for
    out of the kernels, and fold them into the (constant) weights, so they run at build time once."""
    from tvm.relax import transform as T

    if not prepack:
        return []
    return [
        NamedPass("SplitLayoutRewritePreproc", "split each kernel's weight rewrite into its own function",
                  T.SplitLayoutRewritePreproc),
        NamedPass("FoldConstant", "run the rewrites on the constant weights now, not per inference",
                  T.FoldConstant),
        NamedPass("DeadCodeElimination", "drop the rewrite functions", T.DeadCodeElimination),
    ]


QUANTIZE_AT = "WinogradConv2D"   # int8 rewrites run on the module just before this pass


def split_passes(passes: list[NamedPass], before: str) -> tuple[list[NamedPass], list[NamedPass]]:
    """(passes before the first one named `before...`, the rest): where a stage that is not a
    pass (int8 calibration needs to run the model) goes in between."""
    for i, p in enumerate(passes):
        if p.name.startswith(before):
            return passes[:i], passes[i:]
    return passes, []


def fuse_for_build(mod):
    """A hand-built Relax module (a benchmark kernel, a test) as the graph passes leave a model for
    `build`: legalized, fused into one PrimFunc per kernel, weights marked layout-free for
    prepacking."""
    from tvm import relax

    for p in (relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
              relax.transform.FuseOps(), relax.transform.FuseTIR(),
              relax.transform.AttachAttrLayoutFreeBuffers()):
        mod = p(mod)
    return mod


def describe_passes(passes: list[NamedPass]) -> list[str]:
    return [f"{i + 1:2d}. {p.name}: {p.why}" for i, p in enumerate(passes)]


def apply_passes(mod, target, passes: list[NamedPass]):
    """Run the list in order under `target`, logging each step's wall time."""
    import tvm

    with target:
        for p in passes:
            start = time.perf_counter()
            mod = p.make()(mod)
            log.info("pass %s: %.2fs", p.name, time.perf_counter() - start)
    return tvm.relax.transform.Normalize()(mod)
