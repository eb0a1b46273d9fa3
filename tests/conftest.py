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


_MLFLOW_TEMPLATE: list[Path] = []   # [folder] of the session's empty store; mlflow.db made on first use


def mlflow_store(folder: Path, name: str = "mlflow.db") -> str:
    """An empty MLflow SQLite store at folder/name (unless one is there), and its tracking URI.

    Creating a store runs MLflow's schema migrations, seconds per store; so the session makes one
    (in a subprocess, with MLflow's own code) and each test copies it. It is the store a fresh
    process would make in `folder`: the Default experiment's artifact location is set to match."""
    db = folder / name
    if not db.exists():
        import shutil
        import sqlite3

        template = _MLFLOW_TEMPLATE[0] / "mlflow.db"
        if not template.exists():
            make = ("import sys; from mlflow.tracking import MlflowClient; "
                    "MlflowClient(sys.argv[1]).search_experiments()")
            subprocess.run([sys.executable, "-c", make, f"sqlite:///{template}"], cwd=template.parent,
                           check=True, capture_output=True, timeout=300)
        shutil.copyfile(template, db)
        with sqlite3.connect(db) as con:
            con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                        (str(folder.resolve() / "mlruns" / "0"),))
        con.close()
    return f"sqlite:///{db}"


def tune_cli(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None,
             fresh_store: bool = False) -> CliRun:
    """`tune ARGS` in a subprocess in `cwd`, recording to cwd/mlflow.db: a copy of the session's
    empty store (see `mlflow_store`) unless `fresh_store`, when the process makes its own."""
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", **(env or {})}
    if not fresh_store and full_env["MLFLOW_TRACKING_URI"] == f"sqlite:///{cwd / 'mlflow.db'}":
        mlflow_store(cwd)
    start = time.perf_counter()
    proc = subprocess.run(TUNE + args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)
    return CliRun(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)


def tune_in_process(args: list[str], cwd: Path, env: dict | None = None) -> CliRun:
    """`tune ARGS` in this process through typer's CliRunner: the same app, the same exit code and
    the same stdout/stderr text as `tune_cli`, without a fresh interpreter importing TVM for each
    call. For the checks of messages and exit codes; `tune_cli` still proves the real process.
    What a command changes process-wide (cwd, signal handlers, root log handlers) is put back."""
    import logging
    import signal

    from typer.testing import CliRunner

    from pipeline.cli import app

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    old_cwd = Path.cwd()
    start = time.perf_counter()
    try:
        os.chdir(cwd)
        env = {"MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", **(env or {})}
        if env["MLFLOW_TRACKING_URI"] == f"sqlite:///{cwd / 'mlflow.db'}":
            mlflow_store(cwd)
        result = CliRunner().invoke(app, args, prog_name="tune", env=env)
    finally:
        os.chdir(old_cwd)
        root.handlers[:] = handlers
        root.setLevel(level)
        for s, handler in signals.items():
            signal.signal(s, handler)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # what the real process would print: the traceback goes to stderr
        import traceback

        trace = "".join(traceback.format_exception(result.exception))
        return CliRun(1, result.stdout, result.stderr + trace, time.perf_counter() - start)
    return CliRun(result.exit_code, result.stdout, result.stderr, time.perf_counter() - start)


@pytest.fixture(scope="session", autouse=True)
def mlflow_template(tmp_path_factory) -> Path:
    """Where `mlflow_store` keeps the session's empty store."""
    _MLFLOW_TEMPLATE[:] = [tmp_path_factory.mktemp("mlflow_template")]
    return _MLFLOW_TEMPLATE[0]


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
    # the one end-to-end run that makes its MLflow store itself, as in a fresh clone
    run = tune_cli(["run", "--model", "tiny-cnn", "--trials", "7", "--json", "--repeats", "20"], cwd,
                   fresh_store=True)
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
