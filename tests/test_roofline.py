"""pipeline/roofline.py: ceilings (measured, cached), per-kernel costs from TIR, the roofline table
and plot, and finding a run's roofline again."""

import json

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.profile import KernelProfile, KernelTime
from pipeline.roofline import (
    Ceilings,
    KernelCost,
    find_roofline,
    kernel_costs,
    machine_ceilings,
    read_roofline,
    roofline_points,
    weighted_fraction,
    write_roofline,
)

CEIL = Ceilings("x86-test", 2, peak_gflops=200.0, bandwidth_gbs=10.0, cpu="test cpu",
                measured_at="2026-11-22T00:00:00+00:00")


def test_roof_is_min_of_compute_and_bandwidth():
    assert CEIL.ridge == 20.0
    assert CEIL.attainable(1.0) == 10.0          # memory-bound: 1 flop/B x 10 GB/s
    assert CEIL.attainable(100.0) == 200.0       # compute-bound: the peak


def test_points_classify_and_weight_kernels():
    profile = KernelProfile([KernelTime("gemm", 1, 2.0), KernelTime("copy", 2, 1.0),
                             KernelTime("vm.builtin.alloc_tensor", 5, 0.5)], runs=1)
    costs = {"gemm": KernelCost(flops=2e8, bytes=2_000_000),      # 100 flop/B: compute-bound
             "copy": KernelCost(flops=1e6, bytes=4_000_000)}      # 0.25 flop/B: memory-bound
    points = {p.kernel: p for p in roofline_points(profile, costs, CEIL)}
    assert set(points) == {"gemm", "copy"}                          # builtins are not kernels
    gemm, copy = points["gemm"], points["copy"]
    assert gemm.bound == "compute" and gemm.achieved_gflops == pytest.approx(100.0)
    assert gemm.fraction == pytest.approx(0.5) and gemm.share == pytest.approx(2 / 3, abs=1e-3)
    assert copy.bound == "memory" and copy.calls == 2
    assert copy.attainable_gflops == pytest.approx(2.5)            # 0.25 flop/B x 10 GB/s
    assert copy.achieved_gflops == pytest.approx(2.0)               # 2e6 flop in 1 ms
    assert weighted_fraction(list(points.values())) == pytest.approx(0.5 * 2 / 3 + 0.8 / 3, abs=1e-3)


def test_int8_kernels_are_judged_against_the_int8_roof():
    ceil = Ceilings("x86-test", 2, peak_gflops=200.0, bandwidth_gbs=10.0, cpu="test cpu",
                    measured_at="2026-11-22T00:00:00+00:00", peak_int8_gops=800.0)
    profile = KernelProfile([KernelTime("conv_i8", 1, 1.0), KernelTime("conv_f32", 1, 1.0)], runs=1)
    costs = {"conv_i8": KernelCost(4e8, 1_000_000, "int8"),       # 400 op/B: compute-bound
             "conv_f32": KernelCost(2e8, 1_000_000)}
    points = {p.kernel: p for p in roofline_points(profile, costs, ceil)}
    assert points["conv_i8"].attainable_gflops == 800.0 and points["conv_i8"].fraction == 0.5
    assert points["conv_f32"].attainable_gflops == 200.0 and points["conv_f32"].fraction == 1.0
    assert points["conv_i8"].precision == "int8"
    # 50 op/B is past the fp32 ridge (20) but short of the int8 one (80): memory-bound in int8.
    costs = {"conv_i8": KernelCost(5e7, 1_000_000, "int8")}
    (point,) = roofline_points(KernelProfile([KernelTime("conv_i8", 1, 1.0)], runs=1), costs, ceil)
    assert point.bound == "memory" and point.attainable_gflops == 500.0


def test_kernel_costs_tell_integer_kernels_from_float_ones():
    import tvm
    from tvm import te

    a = te.placeholder((16, 32), "uint8", "A")
    b = te.placeholder((32, 16), "int8", "B")
    k = te.reduce_axis((0, 32), "k")
    c = te.compute((16, 16), lambda i, j: te.sum(a[i, k].astype("int32") * b[k, j].astype("int32"),
                                                 axis=k), name="C")
    x = te.placeholder((16, 32), "float32", "X")
    q = te.compute((16, 32), lambda i, j: x[i, j].astype("uint8"), name="Q")   # a quantize
    costs = kernel_costs(tvm.IRModule({"mm": te.create_prim_func([a, b, c]),
                                       "quantize": te.create_prim_func([x, q])}))
    assert costs["mm"].precision == "int8" and costs["quantize"].precision == "fp32"


def test_kernel_costs_count_flops_and_argument_bytes():
    import tvm
    from tvm import te

    a = te.placeholder((16, 32), "float32", "A")
    b = te.placeholder((32, 8), "float32", "B")
    k = te.reduce_axis((0, 32), "k")
    c = te.compute((16, 8), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    costs = kernel_costs(tvm.IRModule({"mm": te.create_prim_func([a, b, c])}))
    assert costs["mm"].flops == 2 * 16 * 8 * 32
    assert costs["mm"].bytes == 4 * (16 * 32 + 32 * 8 + 16 * 8)


def test_table_plot_and_round_trip(tmp_path):
    profile = KernelProfile([KernelTime("gemm", 1, 2.0), KernelTime("copy", 1, 1.0)], runs=1)
    costs = {"gemm": KernelCost(2e8, 2_000_000), "copy": KernelCost(1e6, 4_000_000)}
    points = roofline_points(profile, costs, CEIL)
    paths = write_roofline(points, CEIL, tmp_path / "roofline", "test")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gemm" in paths["html"].read_text() and "ridge 20.0" in paths["html"].read_text()
    again, ceilings = read_roofline(tmp_path / "roofline")
    assert again == points and ceilings == CEIL
    assert find_roofline(str(tmp_path), "sqlite:///unused.db") == tmp_path / "roofline"


def test_find_roofline_rejects_what_holds_none(tmp_path):
    with pytest.raises(UserError, match="holds no roofline"):
        find_roofline(str(tmp_path), f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(UserError, match="no roofline for run"):
        find_roofline("0123456789abcdef", f"sqlite:///{tmp_path / 'm.db'}")


def test_ceilings_are_measured_once_then_cached(tmp_path, monkeypatch):
    from pipeline import roofline, tvm_compat
    from pipeline.targets import resolve_target

    tvm_compat.apply()
    resolved = resolve_target("auto")
    first = machine_ceilings(resolved.preset, resolved.tvm_target(), 2, tmp_path, size="small")
    assert first.peak_gflops > 1 and first.bandwidth_gbs > 0.1
    assert first.ridge == pytest.approx(first.peak_gflops / first.bandwidth_gbs)
    (cached,) = tmp_path.glob("*.json")
    assert json.loads(cached.read_text())["peak_gflops"] == first.peak_gflops

    def no_measuring(*args, **kwargs):
        raise AssertionError("should have come from the cache")
    monkeypatch.setattr(roofline, "measure_ceilings", no_measuring)
    assert machine_ceilings(resolved.preset, resolved.tvm_target(), 2, tmp_path) == first
    assert np.isfinite(first.peak_gflops)
    from schedules.cpu.int8 import dot_instruction

    if dot_instruction(resolved.tvm_target()) is not None:     # VNNI here; sdot on ARM
        assert first.peak_int8_gops > first.peak_gflops and "int8 rule" in first.gemm_int8
    else:
        assert first.peak_int8_gops == 0 and "no 8-bit" in first.gemm_int8


def test_tensorized_int8_kernels_keep_their_op_count():
    """The dot instructions of a tensorized kernel are opaque to the FLOP estimate: the count comes
    from the kernel as it was before scheduling."""
    from tvm import relax

    from pipeline import tvm_compat
    from pipeline.build import build
    from pipeline.passes import post_tuning_passes
    from pipeline.passes.pipeline import fuse_for_build
    from pipeline.targets import resolve_target
    from schedules.cpu.int8 import dot_instruction

    tvm_compat.apply()
    target = resolve_target("auto").tvm_target()
    ins = dot_instruction(target)
    if ins is None:
        pytest.skip("this CPU has no 8-bit dot-product instruction")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 8, 16), ins.a_dtype))
    w = np.random.default_rng(0).integers(-9, 9, (32, 1, 1, 16)).astype(ins.b_dtype)
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), data_layout="NHWC", kernel_layout="OHWI",
                                           out_dtype="int32"))
            out = bb.emit_output(relax.op.astype(y, "float32"))
        bb.emit_func_output(out)
    mod = fuse_for_build(bb.get())
    built = build(mod, target, None, [p for p in post_tuning_passes(True)])
    assert "int8_dot" in built.default_scheduled.values()
    (cost,) = [c for c in built.costs.values() if c.precision == "int8"]
    assert cost.flops >= 2 * 8 * 8 * 32 * 16
