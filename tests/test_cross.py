"""Cross-compiled ARM targets on this x86 machine: `tune run --target aarch64-*` exports an aarch64
shared object (Debian's g++-aarch64-linux-gnu links it; `make cross-tools` installs it), skips the
stages that need to run it with a recorded reason, and the int8 kernels of presets with dotprod use
`sdot`. Nothing here runs aarch64 code (the TVM wheel has no aarch64 runtime to load under qemu)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.cross import (
    SkippedVerification,
    artifact_device,
    check_against_reference,
    cross_compiler,
    skip_reason,
    target_arch,
)
from pipeline.errors import UserError, VerificationError
from tests.conftest import tune_cli

GXX, OBJDUMP, NM = "aarch64-linux-gnu-g++", "aarch64-linux-gnu-objdump", "aarch64-linux-gnu-nm"
needs_toolchain = pytest.mark.skipif(
    shutil.which(GXX) is None or shutil.which(OBJDUMP) is None,
    reason=f"{GXX} / {OBJDUMP} not installed (`make cross-tools`, Debian: g++-aarch64-linux-gnu)")
EM_AARCH64 = 183


def elf_machine(path: Path) -> tuple[int, int]:
    """(EI_CLASS, e_machine) of an ELF file: (2, 183) is 64-bit AArch64."""
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return head[4], int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def test_skip_reason_and_arch():
    arm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    assert target_arch(arm) == "aarch64" and target_arch({"kind": "cuda", "arch": "sm_80"}) == "cuda"
    assert target_arch({"kind": "llvm"}) in ("x86_64", "aarch64")
    assert "cross-compiled for aarch64" in skip_reason(arm, "x86_64", None)
    assert skip_reason(arm, "aarch64", None) is None
    assert "no CUDA device" in skip_reason({"kind": "cuda", "arch": "sm_80"}, "x86_64", None)
    assert skip_reason({"kind": "cuda", "arch": "sm_80"}, "x86_64", "sm_80") is None


def test_missing_cross_toolchain_is_one_line(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda _: None)
    with pytest.raises(UserError, match="needs aarch64-linux-gnu-g\\+\\+.*g\\+\\+-aarch64-linux-gnu"):
        cross_compiler({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}, "x86_64")
    assert cross_compiler({"kind": "llvm", "mtriple": "x86_64-linux-gnu"}, "x86_64") is None


def test_artifact_device_refuses_foreign_arch():
    with pytest.raises(UserError, match="compiled for aarch64"):
        artifact_device({"target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}})
    assert artifact_device({"target": {"kind": "llvm", "mcpu": "haswell"}}) == "cpu"


def test_predict_check_against_onnxruntime_reference_uses_tolerance():
    ref = [np.array([1.0, 2.0], np.float32)]
    skipped = SkippedVerification("x", 1e-3, 1, [], []).as_dict()
    assert "max relative error" in check_against_reference([ref[0] + 1e-4], ref, skipped)
    with pytest.raises(VerificationError, match="ONNX Runtime"):
        check_against_reference([ref[0] + 0.1], ref, skipped)
    with pytest.raises(VerificationError, match="verified output"):   # a run that verified: exact
        check_against_reference([ref[0] + 1e-4], ref, {"passed": True, "tolerance": 1e-3})


def _int8_matmul_library(preset: str, out: Path) -> str:
    """Disassembly of an int8 matmul (s8 x s8 -> s32, constant weight) built for `preset` with the
    default schedules and exported with the cross compiler."""
    import tvm
    from tvm import relax

    from pipeline import tvm_compat
    from pipeline.build import build
    from pipeline.passes import apply_passes, preset_passes
    from pipeline.targets import resolve_target

    tvm_compat.apply()
    w = np.random.default_rng(0).integers(-127, 127, (64, 32)).astype("int8")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8, 64), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            gv = bb.emit_output(bb.emit(relax.op.matmul(x, relax.const(w), out_dtype="int32")))
        bb.emit_func_output(gv)
    resolved = resolve_target(preset)
    target = resolved.tvm_target()
    passes, post = preset_passes(resolved.tuning, False)
    built = build(apply_passes(bb.get(), target, passes), target, None, post)
    assert "int8_dot" in built.default_scheduled.values() or preset == "aarch64-neon"
    built.executable.export_library(str(out), fcompile=tvm.support.cc.cross_compiler(GXX))
    assert elf_machine(out) == (2, EM_AARCH64)
    return subprocess.run([OBJDUMP, "-d", str(out)], capture_output=True, text=True, check=True).stdout


@needs_toolchain
@pytest.mark.parametrize("preset,sdot", [("aarch64-dotprod", True), ("aarch64-i8mm", True),
                                         ("aarch64-neon", False)])
def test_int8_kernel_uses_sdot_where_the_preset_has_dotprod(preset, sdot, tmp_path):
    asm = _int8_matmul_library(preset, tmp_path / f"{preset}.so")
    assert ("sdot\t" in asm) == sdot, f"{preset}: sdot {'missing' if sdot else 'unexpected'}"
    # No i8mm (smmla) kernel exists yet: the i8mm preset's int8 kernels use sdot.
    assert "smmla" not in asm


@pytest.fixture(scope="module")
def arm_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("arm_run")
    run = tune_cli(["run", "--model", "tiny-cnn", "--target", "aarch64-dotprod", "--json"], cwd)
    return cwd, run


@needs_toolchain
def test_tune_run_cross_compiles_and_exports_for_aarch64(arm_run):
    cwd, run = arm_run
    assert run.returncode == 0, run.stderr
    summary = run.json()
    # no board: no search, said so; the stages that run the module are skipped, with the reason
    assert summary["trials_new"] == 0 and "no tuning" in run.stderr and "--rpc" in run.stderr
    assert "cross-compiled for aarch64" in summary["verification"]["skipped"]
    assert summary["verified"] is False and summary["latency_ms"] == {} and not summary["registered"]
    assert "skipped: cross-compiled for aarch64" in run.stderr
    folder = Path(summary["artifact"])
    if not folder.is_absolute():
        folder = cwd / folder
    lib = folder / "model.so"
    assert elf_machine(lib) == (2, EM_AARCH64)
    symbols = subprocess.run([NM, "-D", "--defined-only", str(lib)], capture_output=True, text=True,
                             check=True).stdout
    # the VM bytecode and constants blob, the runtime's hooks, one entry point per kernel
    names = {line.split()[-1] for line in symbols.splitlines() if line.strip()}
    assert {"__tvm_ffi__library_bin", "__TVMBackendParallelLaunch"} <= names
    assert any(n.startswith("__tvm_ffi_fused_conv2d") for n in names)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["target"]["mtriple"] == "aarch64-linux-gnu"
    assert manifest["verification"]["reference"] == "onnxruntime"
    with np.load(folder / "verify.npz") as z:         # ONNX Runtime's outputs, for --check on the board
        assert any(k.startswith("output:") for k in z.files)
    log = next((cwd / "runs").glob("*/pipeline.log")).read_text()
    assert "stage verify skipped: cross-compiled for aarch64" in log


@needs_toolchain
def test_run_record_tags_the_skipped_verification(arm_run):
    from mlflow.tracking import MlflowClient

    cwd, run = arm_run
    assert run.returncode == 0, run.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    tags = client.get_run(run.json()["mlflow_run_id"]).data.tags
    assert tags["verification"] == "skipped" and "aarch64" in tags["cannot_run_here"]


@needs_toolchain
def test_predict_refuses_the_aarch64_artifact_in_one_line(arm_run):
    cwd, run = arm_run
    assert run.returncode == 0, run.stderr
    pred = tune_cli(["predict", run.json()["artifact"], "--check"], cwd)
    assert pred.returncode == 2
    assert pred.stderr.strip().count("\n") == 0 and "compiled for aarch64" in pred.stderr


@needs_toolchain
def test_int8_on_a_cross_target_is_refused(tmp_path):
    from pipeline.config import RunConfig
    from pipeline.run import prepare

    with pytest.raises(UserError, match="cannot run here"):
        prepare(RunConfig(model="tiny-cnn", target="aarch64-dotprod", quantize="int8", out=tmp_path,
                          tuning_logs=tmp_path))
