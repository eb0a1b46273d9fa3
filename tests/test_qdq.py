"""Pre-quantized ONNX models (QDQ form, as onnxruntime.quantization makes them) run on our integer
kernels at the model's own scales: passes/qdq.py (RecordQDQWeights + QDQToInteger)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import tune_cli

SHAPE = (1, 3, 16, 16)


def small_cnn(seed: int = 0) -> onnx.ModelProto:
    """conv 3->16 (+ReLU), conv 16->16 (+ReLU), residual add, 1x1 stride-2 conv 16->32 (+ReLU),
    global average pool, fc 32->16. All four layers are integer sites (the first conv's 3 input
    channels are padded to the dot product's depth)."""
    rng = np.random.default_rng(seed)

    def init(name, *shape, scale=None):
        fan = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        value = rng.standard_normal(shape) * (scale or np.sqrt(2 / fan))
        return numpy_helper.from_array(value.astype(np.float32), name)

    inits = [init("w0", 16, 3, 3, 3), init("b0", 16, scale=0.1), init("w1", 16, 16, 3, 3),
             init("b1", 16, scale=0.1), init("w2", 32, 16, 1, 1), init("b2", 32, scale=0.1),
             init("fc", 32, 16), init("fcb", 16, scale=0.1)]
    n = helper.make_node
    nodes = [n("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]), n("Relu", ["c0"], ["r0"]),
             n("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), n("Relu", ["c1"], ["r1"]),
             n("Add", ["r0", "r1"], ["s"]),
             n("Conv", ["s", "w2", "b2"], ["c2"], strides=[2, 2]), n("Relu", ["c2"], ["r2"]),
             n("GlobalAveragePool", ["r2"], ["p"]), n("Flatten", ["p"], ["f"]),
             n("MatMul", ["f", "fc"], ["m"]), n("Add", ["m", "fcb"], ["y"])]
    graph = helper.make_graph(nodes, "small_cnn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from pipeline.ort_quant import ort_static_int8

    root = tmp_path_factory.mktemp("qdq")
    fp32 = small_cnn()
    rng = np.random.default_rng(1)
    calibration = [{"x": rng.standard_normal(SHAPE).astype(np.float32)} for _ in range(8)]
    onnx.save(fp32, root / "fp32.onnx")
    onnx.save(ort_static_int8(fp32, calibration), root / "qdq.onnx")
    return root


def _lower(path: Path):
    """(imported model, module after the graph passes up to the int8 point, rest of the passes, target)."""
    from pipeline import tvm_compat
    from pipeline.importer import import_model
    from pipeline.passes import QUANTIZE_AT, apply_passes, graph_passes, split_passes
    from pipeline.targets import resolve_target

    tvm_compat.apply()
    model = import_model(str(path))
    resolved = resolve_target("auto")
    target = resolved.tvm_target()
    early, late = split_passes(graph_passes(resolved.tuning["layout"]), QUANTIZE_AT)
    return model, apply_passes(model.mod, target, early), late, target


def _build(mod, late, target):
    from pipeline.build import build
    from pipeline.passes import apply_passes
    from pipeline.runtime import CompiledModel

    built = build(apply_passes(mod, target, late), target)
    return built, CompiledModel(built.executable, list(built.params.values()))


def _calls(mod, op_name: str) -> list:
    import tvm
    from tvm import relax

    op, found = tvm.ir.Op.get(op_name), []
    relax.analysis.post_order_visit(
        mod["main"], lambda e: found.append(e) if isinstance(e, relax.Call) and e.op.same_as(op) else None)
    return found


@pytest.fixture(scope="module")
def lowered(models):
    return _lower(models / "qdq.onnx")


def test_qdq_sites_become_integer_kernels(lowered):
    from pipeline.passes.qdq import WEIGHTS_ATTR, qdq_summary

    _, mod, _, _ = lowered
    summary = qdq_summary(mod)
    assert summary["int8"] == ["conv2d_0", "conv2d_1", "conv2d_2", "matmul_0"]
    assert not summary["float"]
    assert WEIGHTS_ATTR not in mod.attrs
    convs = _calls(mod, "relax.nn.conv2d")
    int_convs = [c for c in convs if str(c.ty.dtype) == "int32"]
    assert len(int_convs) == len(convs) == 3
    for c in int_convs:
        assert str(c.args[0].ty.dtype) == "uint8" and c.args[1].value.numpy().dtype == np.int8
    (mm,) = _calls(mod, "relax.matmul")
    assert str(mm.ty.dtype) == "int32" and mm.args[1].value.numpy().dtype == np.int8


def test_qdq_model_matches_onnxruntime(models, lowered):
    """Against ORT running the same QDQ model: at most one step of the output's quantization
    (y_scale), since both compute the same integers and only a requantization rounding tie may be
    decided differently (in practice every element is equal here). Against the fp32 model: no worse
    than ORT's own QDQ model is."""
    import onnxruntime as ort

    _, mod, late, target = lowered
    _, compiled = _build(mod, late, target)
    qdq = onnx.load(models / "qdq.onnx")
    y_scale = float(numpy_helper.to_array(next(t for t in qdq.graph.initializer if t.name == "y_scale")))
    ort_qdq = ort.InferenceSession(str(models / "qdq.onnx"), providers=["CPUExecutionProvider"])
    ort_fp32 = ort.InferenceSession(str(models / "fp32.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    for _ in range(4):
        x = rng.standard_normal(SHAPE).astype(np.float32)
        got = compiled([x])[0]
        ref, fp32 = ort_qdq.run(None, {"x": x})[0], ort_fp32.run(None, {"x": x})[0]
        assert np.abs(got - ref).max() <= y_scale * 1.001
        assert np.mean(got == ref) >= 0.9
        assert np.abs(got - fp32).max() <= np.abs(ref - fp32).max() + y_scale * 1.001
        cosine = float(got.ravel() @ fp32.ravel() / (np.linalg.norm(got) * np.linalg.norm(fp32)))
        assert cosine > 0.999


def test_qdq_conv_uses_vnni(lowered):
    from pipeline.int8 import activation_dtype

    _, mod, late, target = lowered
    if activation_dtype(target) != "uint8" or "cascadelake" not in str(target):
        pytest.skip("needs the x86 VNNI target")
    built, _ = _build(mod, late, target)
    asm = built.executable.mod.imports[0].inspect_source("asm")
    per_function: dict[str, int] = {}
    current = ""
    for line in asm.splitlines():
        label = re.match(r"^([A-Za-z_][\w.$]*):", line)
        current = label.group(1) if label else current
        if "vpdpbusd" in line:
            per_function[current] = per_function.get(current, 0) + 1
    assert any(name.startswith("fused_conv2d") for name in per_function), per_function
    assert built.default_scheduled and "int8_dot" in built.default_scheduled.values()


# --- per-operator numerics against a numpy integer reference ----------------------------------------------

def _qdq_op(kind: str, act_dtype: str, seed: int = 0):
    """One conv2d (3x3, pad 1, 16->16) or matmul ([4, 32] x [32, 16]) between QDQ nodes, with
    per-channel int8 weights and an int32 bias, as ORT's quantizer writes them; and the integers."""
    rng = np.random.default_rng(seed)
    out_ch = 16
    s_x = np.float32(0.05)
    z_x = np.uint8(131) if act_dtype == "uint8" else np.int8(3)
    s_w = rng.uniform(0.002, 0.02, out_ch).astype(np.float32)
    if kind == "conv2d":
        x_shape, w_shape, axis = [1, 16, 8, 8], (out_ch, 16, 3, 3), 0
    else:
        x_shape, w_shape, axis = [4, 32], (32, out_ch), 1
    wq = rng.integers(-127, 128, w_shape).astype(np.int8)
    bq = rng.integers(-2000, 2000, out_ch).astype(np.int32)
    b_scale = (s_x * s_w).astype(np.float32)
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "s_x": np.array(s_x), "z_x": np.array(z_x), "wq": wq, "s_w": s_w,
        "z_w": np.zeros(out_ch, np.int8), "bq": bq, "s_b": b_scale, "z_b": np.zeros(out_ch, np.int32)}.items()]
    n = helper.make_node
    nodes = [n("QuantizeLinear", ["x", "s_x", "z_x"], ["xq"]), n("DequantizeLinear", ["xq", "s_x", "z_x"], ["xd"]),
             n("DequantizeLinear", ["wq", "s_w", "z_w"], ["w"], axis=axis),
             n("DequantizeLinear", ["bq", "s_b", "z_b"], ["b"], axis=0)]
    if kind == "conv2d":
        nodes.append(n("Conv", ["xd", "w", "b"], ["y"], pads=[1, 1, 1, 1]))
        y_shape = [1, out_ch, 8, 8]
    else:
        nodes += [n("MatMul", ["xd", "w"], ["m"]), n("Add", ["m", "b"], ["y"])]
        y_shape = [4, out_ch]
    graph = helper.make_graph(nodes, f"qdq_{kind}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model, (s_x, int(z_x), wq, s_w, bq), x_shape


def _integer_reference(kind, x, s_x, z_x, wq, bq, act_dtype):
    info = np.iinfo(act_dtype)
    xq = np.clip(np.rint(x / s_x), info.min - z_x, info.max - z_x).astype(np.int64)   # xq - z_x
    w = wq.astype(np.int64)
    if kind == "matmul":
        return xq @ w + bq
    xp = np.pad(xq, [(0, 0), (0, 0), (1, 1), (1, 1)])     # a padded zero is z_x in the integer domain
    acc = np.zeros((1, w.shape[0], 8, 8), np.int64)
    for i in range(3):
        for j in range(3):
            acc += np.einsum("nchw,oc->nohw", xp[:, :, i:i + 8, j:j + 8], w[:, :, i, j])
    return acc + bq[None, :, None, None]


@pytest.mark.parametrize("kind", ["conv2d", "matmul"])
def test_lowered_op_is_exact_integer_arithmetic(tmp_path, kind):
    from pipeline.passes.qdq import qdq_summary

    model, (s_x, z_x, wq, s_w, bq), x_shape = _qdq_op(kind, "uint8")
    onnx.save(model, tmp_path / "op.onnx")
    _, mod, late, target = _lower(tmp_path / "op.onnx")
    assert qdq_summary(mod)["int8"] == [f"{kind}_0"]
    _, compiled = _build(mod, late, target)
    x = np.random.default_rng(3).uniform(-8, 8, x_shape).astype(np.float32)   # some saturate
    got = compiled([x])[0].astype(np.float64)
    acc = _integer_reference(kind, x, s_x, z_x, wq, bq, "uint8")
    combined = (np.float64(s_x) * s_w.astype(np.float64))
    combined = combined.reshape(-1, 1, 1) if kind == "conv2d" else combined
    # The output is float32(acc) * float32(s_x * s_w): dividing the scale out gives the integers back.
    np.testing.assert_array_equal(np.rint(got / combined.astype(np.float32)), acc)


def test_int8_activations_keep_the_float_path_on_vnni(tmp_path):
    from pipeline.int8 import activation_dtype
    from pipeline.passes.qdq import qdq_summary

    model, _, _ = _qdq_op("conv2d", "int8")
    onnx.save(model, tmp_path / "op.onnx")
    _, mod, _, target = _lower(tmp_path / "op.onnx")
    if activation_dtype(target) != "uint8":
        pytest.skip("the target's kernel takes int8 activations")
    summary = qdq_summary(mod)
    assert summary["int8"] == [] and "activations are int8" in summary["float"]["conv2d_0"]
    assert all(str(c.ty.dtype) == "float32" for c in _calls(mod, "relax.nn.conv2d"))


def test_float_model_is_untouched(tmp_path):
    from pipeline.passes.qdq import qdq_summary

    onnx.save(small_cnn(), tmp_path / "fp32.onnx")
    _, mod, _, _ = _lower(tmp_path / "fp32.onnx")
    assert qdq_summary(mod) is None
    assert all(str(c.ty.dtype) == "float32" for c in _calls(mod, "relax.nn.conv2d"))


# --- end to end through the CLI ---------------------------------------------------------------------------

def test_tune_run_on_a_qdq_model(models):
    from mlflow.tracking import MlflowClient

    r = tune_cli(["run", "--model", str(models / "qdq.onnx"), "--trials", "0", "--no-roofline",
                  "--no-register", "--skip-untuned", "--repeats", "5", "--measure-seconds", "1",
                  "--json"], models)
    assert r.returncode == 0, r.stderr[-2000:]
    s = r.json()
    # Judged like an int8 build against ORT's run of the same QDQ model (a one-step rounding tie
    # exceeds the fp32 tolerance): every top-1 agrees, and the outputs stay within a few steps.
    assert s["verified"]
    acc = s["verification"]["accuracy"]
    assert acc["kind"] == "top1_agreement" and acc["drop_points"] == 0.0
    y_scale = float(numpy_helper.to_array(next(t for t in onnx.load(models / "qdq.onnx").graph.initializer
                                               if t.name == "y_scale")))
    assert s["verification"]["max_abs_err"] <= 2 * y_scale * 1.001
    q = s["quantization"]
    assert q["source"] == "qdq" and q["int8"] == ["conv2d_0", "conv2d_1", "conv2d_2", "matmul_0"]
    run = MlflowClient(f"sqlite:///{models / 'mlflow.db'}").get_run(s["mlflow_run_id"])
    assert "RecordQDQWeights" in run.data.params["passes"] and "QDQToInteger" in run.data.params["passes"]
    assert run.data.metrics["int8_layers"] == 4 and run.data.metrics["fp32_layers"] == 0
    assert run.data.tags["variant"] == "qdq"

    again = tune_cli(["run", "--model", str(models / "qdq.onnx"), "--quantize", "int8", "--json"], models)
    assert again.returncode == 2
    assert "already quantized (QDQ)" in again.stderr.strip().splitlines()[-1]
