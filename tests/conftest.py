"""Shared fixtures. The expensive one is `tiny_run`: one real `tune run` of the tiny CNN through the
CLI (subprocess), in a temp dir with its own MLflow SQLite store, reused by every end-to-end test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUNE = [sys.executable, "-m", "pipeline.cli"]
ARTIFACTS = ROOT / "test-artifacts"   # screenshots and other outputs worth keeping from a test run


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def json(self) -> dict:
        return json.loads(self.stdout.strip().splitlines()[-1])


def tune_cli(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> CliRun:
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", **(env or {})}
    start = time.perf_counter()
    proc = subprocess.run(TUNE + args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)
    return CliRun(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)


@pytest.fixture(scope="session", autouse=True)
def ceilings_cache(tmp_path_factory) -> Path:
    """One machine-ceilings measurement per test session (not the user's ~/.cache): every run in
    the session, CLI subprocesses included, reads it from here."""
    cache = tmp_path_factory.mktemp("xdg_cache")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    return cache / "tvm-autotune" / "ceilings"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, CliRun]:
    """`tune run --model tiny-cnn --trials 7 --json` in a fresh directory (one trial per task)."""
    cwd = tmp_path_factory.mktemp("tiny_run")
    run = tune_cli(["run", "--model", "tiny-cnn", "--trials", "7", "--json", "--repeats", "20"], cwd)
    assert run.returncode == 0, run.stderr
    return cwd, run


@pytest.fixture
def tiny_mod():
    """The tiny CNN after the graph passes, with its target (no tuning)."""
    from pipeline import tvm_compat
    from pipeline.importer import import_model
    from pipeline.passes import apply_passes, graph_passes
    from pipeline.targets import resolve_target

    tvm_compat.apply()
    model = import_model("tiny-cnn")
    resolved = resolve_target("auto")
    target = resolved.tvm_target()
    return model, apply_passes(model.mod, target, graph_passes(resolved.tuning["layout"])), target


def mlp_onnx(path: Path, hidden: int = 32) -> Path:
    """MatMul+Add+Relu then Softmax: two tuning tasks, the cheapest model worth tuning."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Softmax", ["r"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, hidden])], [w, b])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def mlp_mod(tmp_path):
    """A two-task module after the graph passes, with its target."""
    from pipeline import tvm_compat
    from pipeline.importer import import_model
    from pipeline.passes import apply_passes, graph_passes
    from pipeline.targets import resolve_target

    tvm_compat.apply()
    model = import_model(str(mlp_onnx(tmp_path / "mlp.onnx")))
    target = resolve_target("auto").tvm_target()
    return model, apply_passes(model.mod, target, graph_passes("NCHW")), target
