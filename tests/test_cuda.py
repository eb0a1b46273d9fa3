"""CUDA presets and mixed precision. Without a GPU (this machine) everything is compile-only: a CUDA
build keeps the kernels' CUDA C source (TVM compiles it when the module is loaded on a GPU), the
artifact is exported, the stages that need the device are skipped with the reason, and nvcc (when
installed) checks that the generated source compiles for the preset's architecture. With a GPU the
same `tune run` verifies and measures instead."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.errors import UserError
from tests.conftest import tune_cli


def _has_gpu() -> bool:
    import tvm

    return bool(tvm.cuda(0).exist)


HAS_GPU = _has_gpu()


def _cuda_source(executable) -> str:
    def walk(m):
        yield m
        for child in m.imports:
            yield from walk(child)
    cuda = [m for m in walk(executable.mod) if m.kind == "cuda"]
    assert cuda, "no CUDA module in the build"
    return cuda[0].inspect_source("")


def _build(preset: str, precision: str):
    from pipeline import tvm_compat
    from pipeline.build import build
    from pipeline.importer import import_model
    from pipeline.passes import apply_passes, preset_passes
    from pipeline.precision import op_dtypes
    from pipeline.targets import resolve_target

    tvm_compat.apply()
    resolved = resolve_target(preset)
    target = resolved.tvm_target()
    passes, post = preset_passes(resolved.tuning, None, precision)
    legalize = [p.name for p in passes].index("LegalizeOps")
    mod = apply_passes(import_model("tiny-cnn").mod, target, passes[:legalize])
    dtypes = op_dtypes(mod)
    built = build(apply_passes(mod, target, passes[legalize:]), target, None, post)
    return built, dtypes


@pytest.mark.parametrize("precision,dtype,ctype", [("fp32", "float32", "float"),
                                                   ("fp16", "float16", "half"),
                                                   ("bf16", "bfloat16", "nv_bfloat16")])
def test_cuda_build_uses_dlight_and_the_precision(precision, dtype, ctype, tmp_path):
    built, dtypes = _build("cuda-sm80", precision)
    assert dtypes["relax.nn.conv2d"] == {dtype}                   # conv operands in the precision
    rules = set(built.default_scheduled.values())
    assert rules and rules <= {"Matmul", "GEMV", "Reduction", "GeneralReduction", "Fallback"}, rules
    source = _cuda_source(built.executable)
    assert "__global__" in source and ctype in source
    built.executable.export_library(str(tmp_path / "model.so"))   # links on the host; keeps the source
    assert (tmp_path / "model.so").stat().st_size > 0
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed: the generated CUDA source was not compiled (the GPU machine "
                    "compiles it when the module loads)")
    (tmp_path / "k.cu").write_text(source)
    done = subprocess.run([nvcc, "-arch=sm_80", "--fatbin", "-w", "-o", str(tmp_path / "k.fatbin"),
                           str(tmp_path / "k.cu")], check=False, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_bad_precision_is_a_user_error(tmp_path):
    from pipeline.config import RunConfig
    from pipeline.run import prepare

    with pytest.raises(UserError, match="unknown --precision 'fp8'"):
        prepare(RunConfig(model="tiny-cnn", precision="fp8", out=tmp_path, tuning_logs=tmp_path))
    with pytest.raises(UserError, match="do not combine"):
        prepare(RunConfig(model="tiny-cnn", precision="fp16", quantize="int8", out=tmp_path,
                          tuning_logs=tmp_path))


def test_auto_says_cuda_was_picked():
    from pipeline.targets import HostInfo, load_presets, pick_auto

    host = HostInfo("x86_64", "cpu", frozenset({"avx2", "fma"}), 4, 8, cuda_arch="sm_80",
                    cuda_name="NVIDIA A100")
    preset, why = pick_auto(host, load_presets())
    assert preset.name == "cuda-sm80" and "picked CUDA" in why and "NVIDIA A100" in why


def test_presets_have_published_ceilings():
    from pipeline.targets import load_presets

    presets = load_presets()
    for name in ("cuda-sm75", "cuda-sm80", "cuda-sm86", "cuda-sm89", "cuda-sm90"):
        c = presets[name].ceilings
        assert c["source"] == "published" and c["fp32_tflops"] > 0 and c["bandwidth_gbs"] > 0
        assert "DLight" in presets[name].schedules
    for name in ("x86-avx2", "x86-avx512", "x86-avx512-vnni", "x86-amx", "aarch64-neon",
                 "aarch64-dotprod", "aarch64-i8mm"):
        assert presets[name].ceilings["fp32_flop_per_cycle_per_core"] > 0
    assert "+sve" in presets["aarch64-i8mm"].target["mattr"]


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cuda_run")
    return cwd, tune_cli(["run", "--model", "tiny-cnn", "--target", "cuda-sm80", "--trials", "0",
                          "--precision", "fp16", "--json"], cwd)


def test_tune_run_exports_a_cuda_artifact(cuda_run):
    cwd, run = cuda_run
    assert run.returncode == 0, run.stderr
    summary = run.json()
    folder = Path(summary["artifact"])
    folder = folder if folder.is_absolute() else cwd / folder
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["device"] == "cuda" and manifest["precision"] == "fp16"
    assert manifest["target"]["arch"] == "sm_80"
    if HAS_GPU:
        assert summary["verified"] and summary["verification"]["accuracy"]
        return
    assert "no CUDA device" in summary["verification"]["skipped"] and summary["latency_ms"] == {}
    pred = tune_cli(["predict", str(folder), "--check"], cwd)
    assert pred.returncode == 2 and pred.stderr.strip().count("\n") == 0
    assert "no CUDA device" in pred.stderr


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present: the artifact loads")
def test_load_cuda_artifact_without_gpu_is_a_user_error():
    from pipeline.cross import artifact_device

    with pytest.raises(UserError, match="no CUDA device"):
        artifact_device({"target": {"kind": "cuda", "arch": "sm_80"}})


def test_fp16_on_the_cpu_passes_the_accuracy_gate(tmp_path):
    """Where the build can run (here: the CPU), a mixed-precision build is checked against fp32
    ONNX Runtime by the int8 accuracy gate (agreement / cosine), and recorded as its own variant."""
    from mlflow.tracking import MlflowClient

    run = tune_cli(["run", "--model", "tiny-cnn", "--trials", "0", "--precision", "fp16", "--json",
                    "--skip-untuned", "--no-roofline", "--repeats", "5", "--accuracy-samples", "8",
                    "--no-register"], tmp_path)
    assert run.returncode == 0, run.stderr
    summary = run.json()
    assert summary["verified"] and summary["verification"]["accuracy"]["drop_points"] <= 1.0
    assert "fp32 (fp16 build)" in run.stdout
    tags = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(
        summary["mlflow_run_id"]).data.tags
    assert tags["variant"] == "fp16"


def test_cuda_tuning_space_puts_fp16_matmuls_on_tensor_cores(tmp_path):
    """The search space of a CUDA task offers wmma tiles (sm_70+), and a tensorized candidate
    builds the way the tuning builder and `build` compile it (0.27 fails it with StorageRewrite on)
    into CUDA source with `wmma::mma_sync` that nvcc accepts."""
    import tvm
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms
    from tvm.script import tirx as T

    from pipeline import tvm_compat
    from pipeline.targets import resolve_target
    from pipeline.tuning import fast_build
    from schedules.gpu import has_tensor_cores, tuning_space, uses_tensor_cores

    tvm_compat.apply()
    import tvm.s_tir.tensor_intrin  # registers the wmma intrinsics, as MetaSchedule does

    @T.prim_func(s_tir=True)
    def matmul(A: T.Buffer((128, 256), "float16"), B: T.Buffer((256, 128), "float16"),
               C: T.Buffer((128, 128), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for i, j, k in T.grid(128, 128, 256):
            with T.sblock("C"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    C[vi, vj] = T.float32(0)
                C[vi, vj] = C[vi, vj] + T.cast(A[vi, vk], "float32") * T.cast(B[vk, vj], "float32")

    assert not has_tensor_cores(resolve_target("x86-avx512").tvm_target())
    target = resolve_target("cuda-sm80").tvm_target()
    mod = tvm.IRModule({"main": matmul})
    ctx = ms.TuneContext(mod=mod, target=target, space_generator=tuning_space(target), task_name="mm",
                         rand_state=1)
    spaces = [s for s in ctx.generate_design_space() if "wmma_sync_16x16x16_f16f16f32" in str(s.trace)]
    assert spaces, "no tensor-core design space for an fp16 matmul on sm_80"
    candidates = []
    for space in spaces:
        sch = s_tir.Schedule(mod)
        space.trace.apply_to_schedule(sch, remove_postproc=True)
        sch.enter_postproc()
        if all(p.apply(sch) for p in ctx.space_generator.postprocs):
            candidates.append(sch.mod)
    assert candidates and uses_tensor_cores(candidates[0]) and not uses_tensor_cores(mod)
    built = fast_build(candidates[0], target, None)
    source = next(m for m in built.imports if m.kind == "cuda").inspect_source("")
    assert "wmma::mma_sync" in source
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed: the wmma source was generated but not compiled")
    (tmp_path / "k.cu").write_text(source)
    done = subprocess.run([nvcc, "-arch=sm_80", "--fatbin", "-w", "-o", str(tmp_path / "k.fatbin"),
                           str(tmp_path / "k.cu")], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
