import re

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline import tvm_compat
from pipeline.importer import import_model
from pipeline.passes import LiftConstantsToParams, apply_passes, describe_passes, graph_passes
from pipeline.targets import resolve_target


def _ops(mod):
    return mod["main"].script()


def _save(path, nodes, x_shape, y_shape, inits) -> str:
    """A one-input ("x"), one-output ("y") ONNX graph, opset 17."""
    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return str(path)


def test_pass_list_is_named_and_ordered():
    names = [p.name for p in graph_passes("NHWC")]
    assert names.index("FoldBatchnormToConv2D") < names.index("LegalizeOps") < names.index("FuseTIR")
    assert "ConvertLayout(NHWC)" in names
    lines = describe_passes(graph_passes("NCHW"))
    assert lines[0].startswith(" 1. ClipCallTIRToOps:")


def test_bn_is_folded_and_kernels_fused(tiny_mod):
    _, mod, _ = tiny_mod
    funcs = [gv.name_hint for gv, _ in mod.functions_items()]
    conv = [f for f in funcs if "conv2d" in f]
    assert conv and all("subtract" not in f and "divide" not in f for f in conv), funcs
    assert all(f.startswith("fused_conv2d") for f in conv)  # bias add + relu fused into the conv
    assert "batch_norm" not in _ops(mod)


def test_nhwc_layout_for_x86(tiny_mod):
    _, mod, _ = tiny_mod
    assert "(1, 16, 16, 8)" in _ops(mod)   # NHWC activations


def test_lift_constants_keeps_numerics(tiny_mod):
    import tvm
    from tvm import relax

    model, mod, target = tiny_mod
    lifted, params = LiftConstantsToParams(mod)
    assert len(params) >= 4 and len(lifted["main"].params) == 1 + len(params)
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    dev = tvm.cpu()
    vm_bound = relax.VirtualMachine(tvm.compile(mod, target), dev)
    vm_lifted = relax.VirtualMachine(tvm.compile(lifted, target), dev)
    a = vm_bound["main"](tvm.runtime.tensor(x)).numpy()
    b = vm_lifted["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(p) for p in params.values()]).numpy()
    np.testing.assert_array_equal(a, b)


def test_relu6_follows_the_layout_and_fuses_into_the_conv(tmp_path):
    """ONNX Clip(0, 6) after a conv: the frontend's call_tir max/min become Relax ops, so NHWC
    needs no transposes around them and the clip lands in the conv's kernel; numerics unchanged."""
    from onnx import helper, numpy_helper

    from pipeline import tvm_compat
    from pipeline.build import build
    from pipeline.importer import import_model
    from pipeline.passes import apply_passes, post_tuning_passes
    from pipeline.runtime import CompiledModel
    from pipeline.targets import resolve_target
    from pipeline.verify import onnxruntime_session, seeded_inputs

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4),
             helper.make_node("Clip", ["c", "lo", "hi"], ["y"])]
    tvm_compat.apply()
    imported = import_model(_save(tmp_path / "relu6.onnx", nodes, [1, 8, 8, 8], [1, 16, 8, 8], inits))
    resolved = resolve_target("auto")
    target = resolved.tvm_target()
    mod = apply_passes(imported.mod, target, graph_passes("NHWC", True))
    kernels = [gv.name_hint for gv, _ in mod.functions_items() if gv.name_hint != "main"]
    conv = [k for k in kernels if "conv2d" in k]
    assert len(conv) == 1 and "maximum" in conv[0] and "minimum" in conv[0], kernels
    assert sum("transpose" in k for k in kernels) <= 2          # the model's own NCHW<->NHWC ends only
    built = build(mod, target, None, post_tuning_passes(True))
    feeds = seeded_inputs(imported.inputs, 0)
    got = CompiledModel(built.executable, list(built.params.values()))([feeds["x"]])[0]
    ref = onnxruntime_session(imported, 1).run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert got.max() <= 6.0 and got.min() >= 0.0


def test_winograd_matrices_compute_a_3x3_convolution():
    rng = np.random.default_rng(0)
    for m, hw in ((2, 6), (4, 8)):
        x = rng.standard_normal((2, hw, hw, 5)).astype(np.float32)
        w = rng.standard_normal((7, 3, 3, 5)).astype(np.float32)
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(np.float64)
        direct = sum(np.einsum("nhwc,kc->nhwk", padded[:, i:i + hw, j:j + hw], w[:, i, j])
                     for i in range(3) for j in range(3))
        # U is float32 (what the kernels get): ~1e-6 of the output scale
        np.testing.assert_allclose(_winograd_reference(x, w, m), direct, rtol=0,
                                   atol=1e-5 * np.abs(direct).max())


def test_winograd_tile_choice():
    from pipeline.passes.winograd import winograd_tile

    assert winograd_tile(56, 56, 64, 64) == 4
    assert winograd_tile(28, 28, 128, 128) == 4
    assert winograd_tile(14, 14, 256, 256) == 2      # 3.5 tiles of 4: F(2x2)
    assert winograd_tile(7, 7, 512, 512) is None     # too few tiles to pay for the larger weight
    assert winograd_tile(56, 56, 3, 64) is None      # too few channels for the GEMMs


def test_winograd_pass_rewrites_only_eligible_convs(tmp_path):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32), n)
             for n in ("w0", "w1", "w2", "w3")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c"], pads=[1] * 4),                  # yes
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w1"], ["a"], pads=[1] * 4),                  # yes
             helper.make_node("Conv", ["a", "w2"], ["b"], pads=[1] * 4, strides=[2, 2]),  # strided
             helper.make_node("Conv", ["b", "w3"], ["y"], pads=[1] * 4)]                  # 6x6: 9 tiles
    tvm_compat.apply()
    imported = import_model(_save(tmp_path / "w.onnx", nodes, [1, 16, 12, 12], [1, 16, 6, 6], inits))
    target = resolve_target("auto").tvm_target()
    off = apply_passes(imported.mod, target, graph_passes("NHWC", True, winograd=False))
    on = apply_passes(imported.mod, target, graph_passes("NHWC", True, winograd=True))

    def kernels(mod):
        return [gv.name_hint for gv, _ in mod.functions_items() if gv.name_hint != "main"]

    assert not any("winograd" in k for k in kernels(off))
    calls = on["main"].script()
    assert calls.count("call_tir(winograd_input") == 2     # one kernel (same shapes), called twice
    assert len(re.findall(r"call_tir\(\w*winograd_output", calls)) == 2
    assert sum("conv2d" in k for k in kernels(on)) == 2
    # conv -> ReLU -> conv: the second input transform stays its own kernel (fused behind the first
    # output transform it would recompute it per tile)
    assert not any("winograd_input" in k and "winograd_output" in k for k in kernels(on))


def _winograd_reference(x: np.ndarray, w: np.ndarray, m: int) -> np.ndarray:
    """Numpy Winograd conv (NHWC, OHWI, pad 1): the same algebra as the TVM kernels."""
    from schedules.cpu.winograd import WINOGRAD, transform_weight

    mats = WINOGRAD[m]
    a = mats.alpha
    n, h, wd, c = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1 + a), (1, 1 + a), (0, 0)))
    u = transform_weight(w, m).astype(np.float64).reshape(a, a, c, -1)
    y = np.zeros((n, h, wd, w.shape[0]))
    for th in range(0, h, m):
        for tw in range(0, wd, m):
            d = xp[:, th:th + a, tw:tw + a, :]
            v = np.einsum("ai,nijc,bj->nabc", mats.BT, d, mats.BT)
            prod = np.einsum("nabc,abck->nabk", v, u)
            y[:, th:th + m, tw:tw + m, :] = np.einsum("ra,nabk,sb->nrsk", mats.AT, prod, mats.AT)
    return y
