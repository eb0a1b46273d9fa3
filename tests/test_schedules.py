"""schedules/: each default rule matches the kernels it is for, and the scheduled (and weight-
prepacked) module computes what ONNX Runtime computes. Small shapes only; no timing."""

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline import tvm_compat
from pipeline.build import build
from pipeline.importer import import_model
from pipeline.passes import apply_passes, graph_passes, post_tuning_passes
from pipeline.runtime import CompiledModel
from pipeline.targets import detect_host, load_presets, resolve_target
from pipeline.verify import onnxruntime_session, seeded_inputs


def _save(tmp_path, nodes, inputs, inits, out_shape, name="m"):
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                                            for n, s in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return str(path)


def conv_model(tmp_path, cin, cout, hw, k, stride=1, group=1, batch=1):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((cout, cin // group, k, k)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[k // 2] * 4, strides=[stride] * 2,
                              group=group),
             helper.make_node("Relu", ["c"], ["y"])]
    out = (hw + 2 * (k // 2) - k) // stride + 1
    return _save(tmp_path, nodes, [("x", [batch, cin, hw, hw])], [w, b], [batch, cout, out, out], "conv")


def _targets():
    host = detect_host()
    presets = load_presets()
    names = [resolve_target("auto").preset]
    if "avx2" in host.features and "x86-avx2" not in names:
        names.append("x86-avx2")          # narrower vectors (8 lanes, 16 registers) on the same host
    return [n for n in names if n in presets]


def build_and_check(path, preset, expect_rules, winograd=False):
    tvm_compat.apply()
    model = import_model(path)
    resolved = resolve_target(preset)
    target = resolved.tvm_target()
    mod = apply_passes(model.mod, target, graph_passes(resolved.tuning["layout"], True, winograd))
    built = build(mod, target, None, post_tuning_passes(True))
    assert set(expect_rules) <= set(built.default_scheduled.values()), built.default_scheduled
    feeds = seeded_inputs(model.inputs, 0)
    got = CompiledModel(built.executable, list(built.params.values()))([feeds[s.name] for s in model.inputs])
    ref = onnxruntime_session(model, 1).run(None, feeds)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(r).max())))
    return built


@pytest.mark.parametrize("preset", _targets())
@pytest.mark.parametrize("cin,cout,hw,k,stride,group", [
    (32, 64, 8, 1, 1, 1),        # 1x1: the padding stage is a pure copy and gets inlined
    (16, 32, 9, 3, 1, 1),        # odd width: the register tile must divide 9
    (16, 32, 10, 3, 2, 1),       # strided
    (3, 16, 12, 7, 2, 1),        # stem-like: 3 input channels
    (24, 24, 8, 3, 1, 24),       # depthwise
    (8, 12, 6, 3, 1, 1),         # 12 output channels: 4-lane vectors
])
def test_conv2d_rule_matches_and_is_exact(tmp_path, preset, cin, cout, hw, k, stride, group):
    build_and_check(conv_model(tmp_path, cin, cout, hw, k, stride, group), preset, {"conv2d_nhwc"})


@pytest.mark.parametrize("preset", _targets())
@pytest.mark.parametrize("cin,cout,hw,residual,batch", [
    (16, 32, 12, False, 1),      # F(2x2, 3x3): 36 tiles of 2x2
    (16, 16, 24, True, 1),       # F(4x4, 3x3), with a residual add fused into the output transform
    (16, 16, 24, False, 8),      # 8 images
])
def test_winograd_rules_match_and_are_exact(tmp_path, preset, cin, cout, hw, residual, batch):
    path = conv_model(tmp_path, cin, cout, hw, 3, batch=batch)
    if residual:
        model = onnx.load(path)
        relu = model.graph.node[1]
        relu.input[0] = "s"
        model.graph.node.insert(1, helper.make_node("Add", ["c", "x"], ["s"]))
        onnx.save(model, path)
    built = build_and_check(path, preset, {"winograd_input", "winograd_output", "matmul"},
                            winograd=True)
    assert not any(rule == "conv2d_nhwc" for rule in built.default_scheduled.values())


_GUARDED_INPUT_TRANSFORM = """
import ctypes, mmap, sys
import numpy as np, tvm
from tvm import te
from pipeline import tvm_compat
from pipeline.targets import resolve_target
from schedules.cpu.winograd import WINOGRAD, WinogradInputTransform, input_transform

tvm_compat.apply()
m = int(sys.argv[1])
shape = (1, 24, 24, 16)                     # 36 kB: nine whole pages
page, nbytes = mmap.PAGESIZE, 24 * 24 * 16 * 4
region = mmap.mmap(-1, page + nbytes + page)
base = ctypes.addressof(ctypes.c_char.from_buffer(region))
libc = ctypes.CDLL(None)
for start in (base, base + page + nbytes):  # unreadable pages right before and after the tensor
    assert libc.mprotect(ctypes.c_void_p(start), page, 0) == 0
x = np.frombuffer(region, np.float32, 24 * 24 * 16, page).reshape(shape)
x[...] = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
target = resolve_target(sys.argv[2]).tvm_target()
data = te.placeholder(shape, "float32", "x")
func = te.create_prim_func([data, input_transform(data, m)])
with target:
    sch = WinogradInputTransform().apply(func, target, False)
lib = tvm.tirx.build(sch.mod, target=target)
alpha = m + 2
out = tvm.runtime.empty((alpha * alpha, (24 // m) ** 2, 16), "float32", tvm.cpu())
lib["main"](tvm.runtime.from_dlpack(x), out)
bt = WINOGRAD[m].BT
xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1 + alpha), (1, 1 + alpha), (0, 0)))
tiles = [xp[0, i:i + alpha, j:j + alpha] for i in range(0, 24, m) for j in range(0, 24, m)]
want = np.stack([bt @ t.transpose(2, 0, 1) @ bt.T for t in tiles])      # [P, C, a, b]
want = want.transpose(2, 3, 0, 1).reshape(alpha * alpha, -1, 16)
np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-4)
print("ok")
"""


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_input_transform_reads_only_its_input(tmp_path, m):
    """The padding rows and columns must come from a select, never from a load outside the
    tensor (TVM's simplifier once dropped our index clamp inside the select's true branch, and
    batch 8 segfaulted). Guard pages around the input make any stray load crash the subprocess."""
    import subprocess
    import sys

    script = tmp_path / "guarded.py"
    script.write_text(_GUARDED_INPUT_TRANSFORM)
    res = subprocess.run([sys.executable, str(script), str(m), resolve_target("auto").preset],
                         capture_output=True, text=True, timeout=300,
                         cwd=str(Path(__file__).resolve().parent.parent))
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


@pytest.mark.parametrize("preset", _targets())
def test_matmul_rule_dense_and_batched(tmp_path, preset):
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((48, 64)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
             helper.make_node("Transpose", ["a"], ["t"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["a", "t"], ["y"])]          # batched, both operands computed
    path = _save(tmp_path, nodes, [("x", [2, 12, 48])], [w, b], [2, 12, 12], "mm")
    build_and_check(path, preset, {"matmul"})


@pytest.mark.parametrize("preset", _targets())
def test_pooling_rules(tmp_path, preset):
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4),
             helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4),
             helper.make_node("GlobalAveragePool", ["p"], ["y"])]
    path = _save(tmp_path, nodes, [("x", [1, 16, 16, 16])], [w], [1, 32, 1, 1], "pool")
    build_and_check(path, preset, {"conv2d_nhwc", "channels_last_reduction"})


def test_rules_leave_unknown_kernels_alone(mlp_mod):
    """Softmax goes to DLight's CPU Reduction rule; nothing is scheduled twice."""
    _, mod, target = mlp_mod
    built = build(mod, target, None)
    assert built.default_scheduled.get("softmax", "Reduction") in ("Reduction",)
    assert built.scheduled_tasks == 0


def test_register_tile_fits_the_register_file_and_the_stack():
    from schedules.common import max_accumulators
    from schedules.cpu.conv2d import register_tile

    assert max_accumulators(64) == 15, "16 zmm accumulators are 1024 bytes: a heap buffer"
    assert max_accumulators(32) == 16 and max_accumulators(16) == 16
    assert max_accumulators(32, 8) == 8             # AVX2: half of 16 ymm registers
    assert register_tile(56, 4, 15) == (7, 2)       # 14 accumulators, fewest loads
    assert register_tile(7, 4, 15) == (7, 2)
    assert register_tile(7, 4, 8) == (7, 1)
    w_i, f_r = register_tile(13, 3, 8)
    assert 13 % w_i == 0 and 3 % f_r == 0 and w_i * f_r <= 8


def test_register_tiles_are_stack_buffers_not_heap_workspaces():
    """A tile buffer in `local` scope, or one of 1024 bytes or more, is lowered to a
    TVMBackendAllocWorkspace call per tile (plus a memset and a store of every accumulator):
    half the time of a small-K int8 conv. Our kernels must have none."""
    import tvm
    from tvm import te

    from pipeline.targets import resolve_target
    from schedules.apply import default_rules, first_match

    target = resolve_target("x86-avx512-vnni").tvm_target()
    a = te.placeholder((1, 14, 14, 64), "uint8", "A")
    w = te.placeholder((64, 1, 1, 64), "int8", "W")
    af = te.placeholder((1, 14, 14, 64), "float32", "AF")
    wf = te.placeholder((64, 1, 1, 64), "float32", "WF")

    def conv(x, k, dtype):
        rc, ry, rx = te.reduce_axis((0, 64), "rc"), te.reduce_axis((0, 1), "ry"), te.reduce_axis((0, 1), "rx")
        return te.compute((1, 14, 14, 64), lambda n, y, xx, f: te.sum(
            x[n, y + ry, xx + rx, rc].astype(dtype) * k[f, ry, rx, rc].astype(dtype), axis=[ry, rx, rc]),
            name="conv2d_nhwc")

    for x, k, dtype in ((a, w, "int32"), (af, wf, "float32")):
        out = conv(x, k, dtype)
        with target:
            rule, sch = first_match(te.create_prim_func([x, k, out]), target, default_rules(target))
        asm = tvm.tirx.build(sch.mod, target=target).inspect_source("asm")
        # The one workspace left is the int8 weight's prepacked copy (64 x 64 bytes), which a
        # model build folds into the constant; its size goes to the call's third argument.
        sizes = [int(n) for n in re.findall(
            r"TVMBackendAllocWorkspace@GOTPCREL\(%rip\), %\w+\n(?:.*\n){0,3}?\s*movl\s+\$(\d+), %edx", asm)]
        assert asm.count("TVMBackendAllocWorkspace@GOTPCREL") == len(sizes), "every call's size found"
        assert all(n == 64 * 64 for n in sizes) and (dtype == "float32") == (not sizes), (dtype, sizes)


def test_tunable_space_starts_at_the_default(tiny_mod):
    """With tunable=True the rule emits sample_perfect_tile decisions equal to the untuned tiles,
    so the design space's default point is the untuned schedule."""
    from pipeline.tuning import extract_tasks
    from schedules.space import matching_rule, rule_space

    _, mod, target = tiny_mod
    tasks = [t for t in extract_tasks(mod, target) if "conv2d" in t.task_name]
    assert tasks
    task_mod = tasks[0].dispatched[0]
    rule = matching_rule(task_mod, target)
    assert rule is not None and rule.name == "conv2d_nhwc"
    sch = rule.apply(task_mod["main"], target, tunable=True)
    samples = [inst for inst in sch.trace.insts if inst.kind.name == "SamplePerfectTile"]
    assert samples, "the design space has no knobs"
    untuned = rule.apply(task_mod["main"], target, tunable=False)
    assert not [i for i in untuned.trace.insts if i.kind.name == "SamplePerfectTile"]
    name, space = rule_space(task_mod, target)
    assert name == "conv2d_nhwc" and space is not None


def _int8_matmul(a_dtype: str, m=16, n=64, k=64):
    from tvm import te

    a = te.placeholder((m, k), a_dtype, name="A")
    w = te.placeholder((k, n), "int8", name="W")
    r = te.reduce_axis((0, k), name="k")
    c = te.compute((m, n), lambda i, j: te.sum(a[i, r].astype("int32") * w[r, j].astype("int32"), axis=r),
                   name="C")
    return te.create_prim_func([a, w, c]).with_attr("layout_free_buffers", [1])


@pytest.mark.parametrize("preset,a_dtype,instruction", [
    ("x86-avx512-vnni", "uint8", "vpdpbusd"),      # u8 x s8
    ("x86-avx512", "uint8", "vpmaddubsw"),         # no VNNI: pmaddubsw + pmaddwd, 512-bit
    ("x86-avx2", "uint8", "vpmaddubsw"),           # the same in 256 bits
    ("aarch64-dotprod", "int8", "sdot"),            # s8 x s8, cross-compiled
])
def test_int8_rule_emits_the_dot_product_instruction(preset, a_dtype, instruction):
    import tvm

    from schedules.apply import default_rules, schedule_func

    target = resolve_target(preset).tvm_target()
    rule, sch = schedule_func(_int8_matmul(a_dtype), target, default_rules(target))
    assert rule == "int8_dot"
    asm = tvm.tirx.build(sch.mod, target=target).inspect_source("asm")
    assert asm.count(instruction) >= 4
    if instruction == "vpmaddubsw":
        assert asm.count("vpmaddwd") >= 4 and "vpdpbusd" not in asm


@pytest.mark.parametrize("preset", ["x86-avx512-vnni", "x86-avx512", "x86-avx2"])
def test_int8_rule_is_exact_with_its_prepacked_weight(preset):
    """The rule's layout-rewrite block packs the weight inside the kernel here (no graph pass
    folds it), so running the PrimFunc checks packing and tensorized arithmetic together. Each
    x86 path runs where the host has its instructions; the weights use the full range the
    instruction is exact for (pmaddubsw: [-63, 63])."""
    import tvm

    from pipeline.targets import detect_host
    from schedules.apply import default_rules, schedule_func
    from schedules.cpu.int8 import dot_instruction

    target = resolve_target(preset).tvm_target()
    ins = dot_instruction(target)
    host = detect_host()
    if host.arch != "x86_64" or ins.feature not in host.features:
        pytest.skip(f"this host has no {ins.feature} to run the kernel")
    _, sch = schedule_func(_int8_matmul("uint8", 32, 64, 128), target, default_rules(target))
    lib = tvm.tirx.build(sch.mod, target=target)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 128)).astype(np.uint8)
    w = rng.integers(-ins.weight_max - 1 if ins.weight_max == 127 else -ins.weight_max,
                     ins.weight_max + 1, (128, 64)).astype(np.int8)
    dev = tvm.cpu()
    c = tvm.runtime.tensor(np.zeros((32, 64), np.int32), dev)
    lib(tvm.runtime.tensor(a, dev), tvm.runtime.tensor(w, dev), c)
    np.testing.assert_array_equal(c.numpy(), a.astype(np.int64) @ w.astype(np.int64))
