import numpy as np

from pipeline.passes import LiftConstantsToParams, describe_passes, graph_passes


def _ops(mod):
    return mod["main"].script()


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
    import onnx
    from onnx import TensorProto, helper, numpy_helper

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
    graph = helper.make_graph(nodes, "relu6", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "relu6.onnx")

    tvm_compat.apply()
    imported = import_model(str(tmp_path / "relu6.onnx"))
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
