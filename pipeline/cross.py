"""Targets this machine cannot run: a CPU of another architecture (aarch64 on x86) and CUDA without
a device.

`tune run` still imports, optimises, schedules (the database's records and our default schedules;
tuning needs the device, over RPC), builds and exports such a target. It cannot verify, measure or
profile the module here: those stages are skipped with `skip_reason`, which the run logs, records
(MLflow tag `verification: skipped`) and writes into the manifest. The artifact keeps ONNX Runtime's
outputs for its verification inputs, so `tune predict --check` on the device compares against them
at the run's tolerance.
"""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import UserError, VerificationError

_ARCH = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}
# Debian's cross toolchains (`apt-get install g++-<arch>-linux-gnu`), by target architecture.
CROSS_GXX = {"aarch64": "aarch64-linux-gnu-g++", "arm": "arm-linux-gnueabihf-g++",
             "riscv64": "riscv64-linux-gnu-g++", "x86_64": "x86_64-linux-gnu-g++"}


def machine_arch() -> str:
    m = platform.machine().lower()
    return _ARCH.get(m, m)


def target_arch(target: dict) -> str:
    """'cuda' for CUDA targets; otherwise the CPU architecture of the triple (this machine's when
    the target names none)."""
    if target.get("kind") == "cuda":
        return "cuda"
    triple = target.get("mtriple", "")
    return _ARCH.get(triple.split("-")[0], triple.split("-")[0]) if triple else machine_arch()


def skip_reason(target: dict, host_arch: str, cuda_arch: str | None) -> str | None:
    """Why a module for `target` cannot run on this machine, or None when it can."""
    arch = target_arch(target)
    if arch == "cuda":
        if cuda_arch is None:
            return (f"compiled for CUDA {target.get('arch', '')} without a GPU here (no CUDA device); "
                    "run `tune predict --check` on a GPU machine")
        return None
    if arch != host_arch:
        return f"cross-compiled for {arch}; run `tune predict --check` on the device"
    return None


def cross_compiler(target: dict, host_arch: str) -> str | None:
    """The C++ cross compiler that links an export for `target`, or None for this machine's own
    architecture. A missing one is a UserError naming the package (`make cross-tools` installs it)."""
    arch = target_arch(target)
    if arch in ("cuda", host_arch):
        return None
    gxx = CROSS_GXX.get(arch)
    if gxx is None:
        raise UserError(f"no cross toolchain known for {arch}; export needs a {arch} C++ linker")
    if shutil.which(gxx) is None:
        raise UserError(f"cross-compiling for {arch} needs {gxx}, which is not installed: run "
                        f"`make cross-tools` (Debian: apt-get install g++-{gxx[:-4]})")
    return gxx


@dataclass
class SkippedVerification:
    """Stands in for pipeline.verify.Verification when the module cannot run here: the inputs and
    ONNX Runtime's outputs for them, which the artifact keeps for `tune predict --check`."""

    reason: str
    tolerance: float
    samples: int
    inputs: list[dict[str, np.ndarray]]
    outputs: list[list[np.ndarray]]
    passed: bool = False
    accuracy: dict | None = field(default=None)

    def as_dict(self) -> dict:
        return {"passed": False, "skipped": self.reason, "reference": "onnxruntime",
                "tolerance": self.tolerance, "samples": self.samples}


def reference_outputs(model, session, reason: str, tolerance: float, samples: int,
                      seed: int) -> SkippedVerification:
    from pipeline.verify import seeded_inputs

    inputs = [seeded_inputs(model.inputs, seed + i) for i in range(samples)]
    outputs = [[np.asarray(o) for o in session.run(None, feeds)] for feeds in inputs]
    return SkippedVerification(reason, tolerance, samples, inputs, outputs)


def artifact_device(manifest: dict) -> str:
    """The TVM device an artifact runs on ('cpu' or 'cuda'); a UserError (one line) when this
    machine cannot run it."""
    target = manifest.get("target", {})
    arch = target_arch(target)
    if arch == "cuda":
        import tvm

        if not tvm.cuda(0).exist:
            raise UserError(f"the artifact is compiled for CUDA {target.get('arch', '')} and this "
                            "machine has no CUDA device; run it on a GPU machine")
        return "cuda"
    if arch != machine_arch():
        raise UserError(f"the artifact is compiled for {arch} and this machine is {machine_arch()}; "
                        "run it on the device")
    return "cpu"


def check_against_reference(results: list[np.ndarray], expected: list[np.ndarray],
                            verification: dict) -> str:
    """`tune predict --check`: bit-exact against the run's own outputs, or, for an artifact the run
    could not execute (its verify.npz holds ONNX Runtime's outputs), within the run's tolerance."""
    if verification.get("reference") != "onnxruntime":
        worst = max(float(np.max(np.abs(a - b))) for a, b in zip(results, expected))
        if worst > 0:
            raise VerificationError(f"artifact output differs from the verified output by {worst:.3g}")
        return "artifact reproduces the verified output exactly"
    tolerance = float(verification.get("tolerance", 1e-3))
    worst = 0.0
    for a, b in zip(results, expected):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(float(np.max(np.abs(b64))) if b64.size else 0.0, 1e-12)
        worst = max(worst, float(np.max(np.abs(a64 - b64))) / scale if b64.size else 0.0)
    if worst > tolerance:
        raise VerificationError(f"artifact output differs from ONNX Runtime's by {worst:.3g} relative "
                                f"(tolerance {tolerance:g})")
    return f"artifact matches ONNX Runtime's output: max relative error {worst:.2e} (tolerance {tolerance:g})"
