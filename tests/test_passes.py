import numpy as np

from pipeline.passes import LiftConstantsToParams, describe_passes, graph_passes


def _ops(mod):
    return mod["main"].script()


def test_pass_list_is_named_and_ordered():
    names = [p.name for p in graph_passes("NHWC")]
    assert names.index("FoldBatchnormToConv2D") < names.index("LegalizeOps") < names.index("FuseTIR")
    assert "ConvertLayout(NHWC)" in names
    lines = describe_passes(graph_passes("NCHW"))
    assert lines[0].startswith(" 1. FoldBatchnormToConv2D:")


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
