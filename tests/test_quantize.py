"""pipeline/quantize.py and pipeline/passes/quantize.py: the int8 rewrite computes exactly the
fake-quantized arithmetic it stands for (per operator), calibration observes the right tensors,
and the accuracy fallback moves sensitive layers back to fp32."""

import numpy as np
import pytest
from tvm import relax

from pipeline import tvm_compat
from pipeline.build import build
from pipeline.calibrate import CalibrationSet, quantize_weight, weight_scales
from pipeline.errors import UserError
from pipeline.passes import apply_passes, graph_passes, post_tuning_passes, split_passes
from pipeline.passes.quantize import observer_module
from pipeline.quantize import (
    QuantizeSettings,
    _apply,
    calibrate,
    eval_set,
    quantize_model,
    sites_of,
)
from pipeline.runtime import CompiledModel
from pipeline.targets import resolve_target


@pytest.fixture(scope="module")
def host():
    tvm_compat.apply()
    resolved = resolve_target("auto")
    _, late = split_passes(graph_passes("NHWC", True, False), "WinogradConv2D")
    return resolved.tvm_target(), late


def _compile(host):
    target, late = host

    def compile_fn(mod):
        built = build(apply_passes(mod, target, late), target, None, post_tuning_passes(True))
        compiled = CompiledModel(built.executable, list(built.params.values()))
        compile_fn.rules = built.default_scheduled
        return lambda feed: compiled([feed["x"]])
    return compile_fn


def _conv_module(shape, weight, bias, stride, padding, relu_input):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            inp = bb.emit(relax.op.nn.relu(x)) if relu_input else x
            y = bb.emit(relax.op.nn.conv2d(inp, relax.const(weight), strides=stride, padding=padding,
                                           data_layout="NHWC", kernel_layout="OHWI"))
            out = bb.emit_output(relax.op.add(y, relax.const(bias.reshape(1, 1, 1, -1))))
        bb.emit_func_output(out)
    return bb.get()


def _matmul_module(shape, weight, bias):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(weight)))
            out = bb.emit_output(relax.op.add(y, relax.const(bias)))
        bb.emit_func_output(out)
    return bb.get()


def _fake_quant(site, x, params):
    axis = site.channels_last_axis
    scales = weight_scales(site.weight, axis)
    shape = [1] * site.weight.ndim
    shape[axis] = -1
    w = quantize_weight(site.weight, scales, axis).astype(np.float32) * scales.reshape(shape)
    info = np.iinfo(params.dtype)
    q = np.clip(np.round(x / params.scale) + params.zero_point, info.min, info.max)
    return _apply(site, ((q - params.zero_point) * params.scale).astype(np.float32), w) + site.bias


@pytest.mark.parametrize("relu_input,stride,padding,channels", [
    (True, 1, 1, 16),      # post-ReLU input: uint8 with zero point 0, the conv pads with 0
    (False, 2, 1, 16),     # signed input: zero point != 0, padded explicitly with it
    (False, 1, 0, 16),
    (False, 2, 3, 3),      # an RGB stem: channels padded to the dot product's 4
])
def test_conv2d_rewrite_matches_fake_quantized_reference(host, relu_input, stride, padding, channels):
    rng = np.random.default_rng(0)
    shape, weight = (1, 10, 10, channels), rng.standard_normal((32, 3, 3, channels)).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    mod = _conv_module(shape, weight, bias, stride, padding, relu_input)
    x = rng.standard_normal(shape).astype(np.float32)
    compile_fn = _compile(host)
    data = CalibrationSet([{"x": x}], "test", False)
    sites = sites_of(mod)
    assert [s.name for s in sites] == ["conv2d_0"] and sites[0].bias is not None
    cal = calibrate(mod, sites, data, compile_fn, "minmax", "uint8", [])
    params = cal.plan.activations["conv2d_0"]
    assert (params.zero_point == 0) == relu_input
    from pipeline.quantize import apply_plan

    got = compile_fn(apply_plan(mod, cal))({"x": x})[0]
    assert "int8_dot" in compile_fn.rules.values() or not _has_vnni(host[0])
    inp = np.maximum(x, 0) if relu_input else x
    ref = _fake_quant(sites[0], inp, params)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    exact = _apply(sites[0], inp, weight) + bias
    assert np.abs(got - exact).max() <= 0.05 * np.abs(exact).max()     # and close to fp32


def test_matmul_rewrite_matches_fake_quantized_reference(host):
    rng = np.random.default_rng(1)
    weight, bias = rng.standard_normal((64, 32)).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    mod = _matmul_module((1, 8, 64), weight, bias)
    x = rng.standard_normal((1, 8, 64)).astype(np.float32)
    compile_fn = _compile(host)
    sites = sites_of(mod)
    cal = calibrate(mod, sites, CalibrationSet([{"x": x}], "test", False), compile_fn, "minmax", "uint8", [])
    from pipeline.quantize import apply_plan

    got = compile_fn(apply_plan(mod, cal))({"x": x})[0]
    ref = _fake_quant(sites[0], x, cal.plan.activations["matmul_0"])
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_observer_module_returns_each_quantized_input(host):
    rng = np.random.default_rng(2)
    mod = _conv_module((1, 6, 6, 8), rng.standard_normal((16, 1, 1, 8)).astype(np.float32),
                       np.zeros(16, np.float32), 1, 0, True)
    observed = observer_module(mod, sites_of(mod))
    x = rng.standard_normal((1, 6, 6, 8)).astype(np.float32)
    target, late = host
    built = build(apply_passes(observed, target, late), target, None, post_tuning_passes(True))
    outs = CompiledModel(built.executable, list(built.params.values()))([x])
    assert len(outs) == 2
    np.testing.assert_allclose(outs[1], np.maximum(x, 0))


def test_unknown_keep_fp32_layer_is_a_user_error(host):
    rng = np.random.default_rng(3)
    mod = _matmul_module((1, 4, 16), rng.standard_normal((16, 16)).astype(np.float32),
                         np.zeros(16, np.float32))
    with pytest.raises(UserError, match="no layer named conv2d_9"):
        calibrate(mod, sites_of(mod), CalibrationSet([{"x": np.ones((1, 4, 16), np.float32)}], "t", False),
                  _compile(host), "minmax", "uint8", ["conv2d_9"])


def test_fallback_moves_sensitive_layers_to_fp32_until_the_bound_holds(host):
    rng = np.random.default_rng(4)
    mod = _matmul_module((1, 4, 64), rng.standard_normal((64, 32)).astype(np.float32),
                         np.zeros(32, np.float32))
    compile_fn = _compile(host)
    # Calibrated on tiny values, judged on large ones: every activation saturates in int8.
    data = CalibrationSet([{"x": 1e-3 * rng.standard_normal((1, 4, 64)).astype(np.float32)}], "t", False)
    feeds = [{"x": rng.standard_normal((1, 4, 64)).astype(np.float32)} for _ in range(4)]
    reference = compile_fn(mod)
    evaluation = eval_set(feeds, reference)
    strict = quantize_model(mod, data, evaluation, compile_fn, QuantizeSettings("minmax", [], 1.0), "uint8")
    assert strict.rounds[0]["drop_points"] > 1.0            # int8 broke it ...
    assert strict.rounds[-1]["int8_layers"] == 0           # ... so the layer went back to fp32
    assert strict.report.drop_points == pytest.approx(0.0, abs=1e-6)
    assert strict.calibration.layers["matmul_0"].reason.startswith("accuracy fallback")
    none = quantize_model(mod, data, evaluation, compile_fn,
                          QuantizeSettings("minmax", [], 1.0, fallback_rounds=0), "uint8")
    assert none.rounds[-1]["int8_layers"] == 1 and none.report.drop_points > 1.0


def _has_vnni(target) -> bool:
    from schedules.cpu.int8 import VNNI, dot_instruction

    return dot_instruction(target) is VNNI


def _block_module(shape, w0, w1, pool: bool):
    """conv0 -> relu -> [max pool] -> conv1 (+ the pool/relu output as a residual): the layout of a
    ResNet stem and bottleneck block in miniature."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y0 = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, relax.const(w0), padding=1,
                                                            data_layout="NHWC", kernel_layout="OHWI")))
            if pool:
                y0 = bb.emit(relax.op.nn.max_pool2d(y0, 3, 2, 1, layout="NHWC"))
            y1 = bb.emit(relax.op.nn.conv2d(y0, relax.const(w1), padding=1, data_layout="NHWC",
                                            kernel_layout="OHWI"))
            out = bb.emit_output(relax.op.nn.relu(relax.op.add(y1, y0)))
        bb.emit_func_output(out)
    return bb.get()


def _calls(mod, op_name):
    import tvm

    op = tvm.ir.Op.get(op_name)
    found = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(e) if isinstance(
        e, relax.Call) and e.op.same_as(op) else None)
    return found


@pytest.mark.parametrize("pool", [False, True])
def test_residual_and_pool_read_the_8bit_tensor(host, pool):
    """The residual add reads the dequantized 8-bit tensor the next conv reads, so no float copy of
    it survives; a max pool before a quantized conv runs on the quantized tensor (they commute)."""
    rng = np.random.default_rng(5)
    w0 = rng.standard_normal((16, 3, 3, 16)).astype(np.float32) * 0.2
    w1 = rng.standard_normal((16, 3, 3, 16)).astype(np.float32) * 0.2
    mod = _block_module((1, 12, 12, 16), w0, w1, pool)
    x = rng.standard_normal((1, 12, 12, 16)).astype(np.float32)
    compile_fn = _compile(host)
    sites = sites_of(mod)
    cal = calibrate(mod, sites, CalibrationSet([{"x": x}], "test", False), compile_fn, "minmax",
                    "uint8", [])
    from pipeline.quantize import apply_plan

    qmod = apply_plan(mod, cal)
    assert len(_calls(qmod, "relax.dequantize")) == 1          # the residual's
    if pool:
        (pool_call,) = _calls(qmod, "relax.nn.max_pool2d")
        assert str(pool_call.args[0].ty.dtype) == "uint8"
    # Scales are kernel arguments (arrays), not literals: tuning records outlive a recalibration.
    assert all(len(q.args[1].ty.shape) == 1 for q in _calls(qmod, "relax.quantize"))
    got = compile_fn(qmod)({"x": x})[0]
    ref = compile_fn(mod)({"x": x})[0]
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()


def test_weights_stay_within_the_kernels_exact_range(host):
    """x86 without VNNI (pmaddubsw): weights quantized to [-63, 63] so int16 pair sums never saturate."""
    rng = np.random.default_rng(6)
    weight, bias = rng.standard_normal((64, 32)).astype(np.float32), np.zeros(32, np.float32)
    mod = _matmul_module((1, 8, 64), weight, bias)
    x = rng.standard_normal((1, 8, 64)).astype(np.float32)
    sites = sites_of(mod)
    cal = calibrate(mod, sites, CalibrationSet([{"x": x}], "test", False), _compile(host), "minmax",
                    "uint8", [], weight_max=63)
    from pipeline.quantize import apply_plan

    qmod = apply_plan(mod, cal)
    consts = [c.args[1] for c in _calls(qmod, "relax.matmul")]
    (wq,) = [c.value.numpy() for c in consts]
    assert wq.dtype == np.int8 and np.abs(wq).max() == 63


def test_matmul_with_odd_output_features_is_padded_and_sliced(host):
    """A 1000-class head: N padded to the kernel's 16 lanes with zero weights, the result sliced."""
    rng = np.random.default_rng(7)
    weight, bias = rng.standard_normal((64, 20)).astype(np.float32), rng.standard_normal(20).astype(np.float32)
    mod = _matmul_module((1, 64), weight, bias)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    compile_fn = _compile(host)
    sites = sites_of(mod)
    cal = calibrate(mod, sites, CalibrationSet([{"x": x}], "test", False), compile_fn, "minmax", "uint8", [])
    assert cal.layers["matmul_0"].int8
    from pipeline.quantize import apply_plan

    got = compile_fn(apply_plan(mod, cal))({"x": x})[0]
    assert got.shape == (1, 20)
    ref = _fake_quant(sites[0], x, cal.plan.activations["matmul_0"])
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
