"""End to end: the real `tune` CLI in subprocesses, against a real MLflow SQLite store in a tmp dir.
Where a test is about a message and an exit code, most calls run in this process (`tune_in_process`,
the same app without a fresh interpreter importing TVM each time), and a real subprocess call shows
that the process behaves the same."""

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TUNE, mlflow_store, mlp_onnx, tune_cli, tune_in_process


def _client(cwd: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")


def _records(cwd: Path) -> int:
    files = list((cwd / "tuning_logs").glob("*/database_tuning_record.json"))
    return sum(f.read_text().count("\n") for f in files)


def test_run_reports_json_and_exports_a_verified_artifact(tiny_run):
    cwd, run = tiny_run
    summary = run.json()
    assert {"model", "preset", "tasks", "trials_new", "trials_reused", "latency_ms", "verified",
            "artifact", "mlflow_run_id"} <= set(summary)
    assert summary["model"] == "tiny-cnn" and summary["verified"] is True
    assert summary["tasks"] == 7 and summary["trials_new"] >= 6 and summary["trials_reused"] == 0
    assert set(summary["latency_ms"]) == {"tuned", "onnxruntime", "openvino", "untuned"}
    manifest = json.loads((cwd / summary["artifact"] / "manifest.json").read_text())
    assert manifest["target"]["kind"] == "llvm" and len(manifest["model_sha256"]) == 64
    # the faster of the tuned and default-scheduled builds is shipped, and the manifest says which
    assert summary["exported"] in ("tuned", "untuned") and manifest["build"] == summary["exported"]
    lat = summary["latency_ms"]
    if summary["exported"] == "untuned":
        assert lat["untuned"] < lat["tuned"]
    assert {"model.so", "params.bin", "verify.npz"} <= set(manifest["files"])
    assert manifest["latency_ms"]["tuned"]["median_ms"] > 0
    assert "tuned" in run.stdout and "onnxruntime" in run.stdout  # the human table
    assert "MetaSchedule" not in run.stdout and "Trial #" not in run.stdout
    assert _records(cwd) == summary["trials_new"]


def test_run_is_recorded_in_mlflow(tiny_run):
    cwd, run = tiny_run
    summary = run.json()
    client = _client(cwd)
    r = client.get_run(summary["mlflow_run_id"])
    assert r.info.status == "FINISHED"
    assert r.data.params["preset"] == summary["preset"] and "FuseTIR" in r.data.params["passes"]
    assert r.data.params["version.apache-tvm"].startswith("0.27")
    assert r.data.metrics["trials_new"] == summary["trials_new"]
    assert r.data.metrics["latency_tuned_median"] > 0 and "speedup_tuned_vs_onnxruntime" in r.data.metrics \
        and "speedup_tuned_vs_openvino" in r.data.metrics
    assert client.get_metric_history(r.info.run_id, "tune_best_latency_ms")
    paths = {a.path for a in client.list_artifacts(r.info.run_id, "run")}
    assert "run/summary.json" in paths and "run/metaschedule" in paths and "run/roofline" in paths
    roof = {a.path for a in client.list_artifacts(r.info.run_id, "run/roofline")}
    assert {"run/roofline/roofline.png", "run/roofline/roofline.csv"} <= roof
    assert 0 < r.data.metrics["roofline_fraction"] and r.data.metrics["ceiling_peak_gflops"] > 0
    assert client.get_experiment(r.info.experiment_id).name == "tiny-cnn"


def test_second_run_reuses_every_record_and_is_fast(tiny_run):
    cwd, first = tiny_run
    again = tune_cli(["run", "--model", "tiny-cnn", "--trials", "7", "--json", "--repeats", "20"], cwd)
    assert again.returncode == 0, again.stderr
    summary = again.json()
    assert summary["trials_new"] == 0
    assert summary["trials_reused"] == first.json()["trials_new"]
    # nothing to search: the tune stage is a database lookup (fixed costs such as the roofline
    # profile and the model registration are the same in both runs)
    assert summary["stage_seconds"]["tune"] < first.json()["stage_seconds"]["tune"] / 5
    assert again.seconds < first.seconds


def test_predict_reproduces_the_verified_output(tiny_run, tmp_path):
    cwd, run = tiny_run
    artifact = cwd / run.json()["artifact"]
    check = tune_cli(["predict", str(artifact), "--check"], cwd)
    assert check.returncode == 0 and "exactly" in check.stdout, check.stderr
    stored = np.load(artifact / "verify.npz")
    np.save(tmp_path / "x.npy", stored["input:input"])
    pred = tune_in_process(["predict", str(artifact), "--input", str(tmp_path / "x.npy"),
                            "--output", str(tmp_path / "y.npy")], cwd)
    assert pred.returncode == 0, pred.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), stored["output:0"])


_NO_TUNING_CODE = """
import sys
from pathlib import Path
from pipeline.export import load_artifact
load_artifact(Path(sys.argv[1]))
heavy = ("mlflow", "xgboost", "onnxruntime")
ours = ("pipeline.tuning", "pipeline.run", "pipeline.passes")
print(sorted(m for m in sys.modules if m.split(".")[0] in heavy or m in ours))
"""


def test_predict_loads_no_tuning_code(tiny_run):
    cwd, run = tiny_run
    out = subprocess.run([TUNE[0], "-c", _NO_TUNING_CODE, str(cwd / run.json()["artifact"])],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr  # (tvm.relax itself imports MetaSchedule's FFI)


def _det_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Det", ["x"], ["y"], name="det0")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _error_cases(tmp: Path):
    (tmp / "corrupt.onnx").write_bytes(b"\x00garbage")
    (tmp / "a_file").write_text("")
    det = _det_model(tmp / "det.onnx")
    return [
        (["run", "--model", str(tmp / "missing.onnx")], 2, "model file not found"),
        (["run", "--model", str(tmp / "corrupt.onnx")], 2, "not a valid ONNX model"),
        (["run", "--model", "resnet9000"], 2, "unknown model 'resnet9000'"),
        (["run", "--model", str(det), "--trials", "0"], 3, "Det (node det0)"),
        (["run", "--model", "tiny-cnn", "--target", "pdp11"], 2, "unknown target 'pdp11'"),
        (["run", "--model", "tiny-cnn", "--target", '{"kind": "bogus"}'], 2, "TVM rejects"),
        (["run", "--model", "tiny-cnn", "--trials", "-1"], 2, "--trials must be >= 0"),
        (["run", "--model", "tiny-cnn", "--time-budget", "soon"], 2, "bad duration"),
        (["run", "--model", "tiny-cnn", "--model-option", "depth=3"], 2, "has no option"),
        (["run", "--model", "tiny-cnn", "--out", str(tmp / "a_file" / "x")], 2, "not writable"),
        (["predict", str(tmp)], 2, "pass --input FILE"),
        (["predict", str(tmp), "--check"], 2, "manifest.json is missing"),
    ]


def _one_error_line(res, args, code, message) -> str:
    assert res.returncode == code, (args, res.returncode, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], (args, res.stderr)
    assert "Traceback" not in res.stderr, args
    return lines[0]


# Also run as real processes: `tune run` failing in its import stage after the MLflow run has
# started (exit code 3), and `tune predict` refusing its flags (exit code 2).
_REAL_PROCESS = ("Det (node det0)", "pass --input FILE")


def test_bad_input_gets_one_line_and_nonzero_exit(tmp_path):
    cases = _error_cases(tmp_path)
    for args, code, message in cases:
        _one_error_line(tune_in_process(args, tmp_path), args, code, message)
    real = [case for case in cases if case[2] in _REAL_PROCESS]
    assert len(real) == len(_REAL_PROCESS)
    for args, code, message in real:
        line = _one_error_line(tune_cli(args, tmp_path), args, code, message)
        assert line == _one_error_line(tune_in_process(args, tmp_path), args, code, message)


def test_bad_flag_type_is_rejected_by_the_parser(tmp_path):
    res = tune_cli(["run", "--model", "tiny-cnn", "--trials", "many"], tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_debug_shows_the_traceback(tmp_path):
    res = tune_cli(["--debug", "run", "--model", "resnet9000"], tmp_path)
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_verification_failure_marks_the_run_failed_and_exports_nothing(tmp_path):
    mlp = mlp_onnx(tmp_path / "mlp.onnx")
    res = tune_cli(["run", "--model", str(mlp), "--trials", "0", "--tolerance", "1e-30",
                    "--skip-untuned"], tmp_path)
    assert res.returncode == 4 and "output mismatch" in res.stderr, res.stderr
    assert not list((tmp_path / "artifacts").glob("*"))
    runs = _client(tmp_path).search_runs([_client(tmp_path).get_experiment_by_name("mlp").experiment_id])
    assert runs[0].info.status == "FAILED"
    assert "output mismatch" in runs[0].data.tags["failure_reason"]


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, "KILLED"), (signal.SIGKILL, "RUNNING")])
def test_stopping_mid_tuning_keeps_every_record_and_resumes(sig, status, tmp_path):
    """SIGTERM (like Ctrl-C) stops cleanly and marks the run KILLED; SIGKILL gives no chance to
    mark anything, yet every record measured before it is on disk and the next run reuses them."""
    import os

    mlp = mlp_onnx(tmp_path / "mlp.onnx")
    args = ["run", "--model", str(mlp), "--trials", "40", "--json", "--skip-untuned"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store(tmp_path)}
    proc = subprocess.Popen(TUNE + args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while _records(tmp_path) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == (130 if sig == signal.SIGTERM else -signal.SIGKILL), stderr
    kept = _records(tmp_path)
    assert kept >= 2
    client = _client(tmp_path)
    run = client.search_runs([client.get_experiment_by_name("mlp").experiment_id])[0]
    assert run.info.status == status
    if sig == signal.SIGTERM:
        assert "interrupted" in run.data.tags["failure_reason"]

    # (no roofline profile and fewer timed calls: this run is here to show the records are reused)
    resumed = tune_cli(["run", "--model", str(mlp), "--trials", "0", "--json", "--skip-untuned",
                        "--no-roofline", "--repeats", "5"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.json()["verified"] is True
    assert _records(tmp_path) == kept


def test_models_and_targets_commands(tmp_path):
    models = tune_cli(["models"], tmp_path)
    assert models.returncode == 0 and "resnet50" in models.stdout and "bert-mini" in models.stdout
    targets = tune_cli(["targets"], tmp_path)
    assert targets.returncode == 0 and "auto ->" in targets.stdout and "x86-avx2" in targets.stdout


def test_show_passes_prints_the_list(tmp_path):
    res = tune_in_process(["run", "--model", "resnet9000", "--show-passes"], tmp_path)
    assert "FoldBatchnormToConv2D" in res.stdout and "FuseTIR" in res.stdout


def test_winograd_flag_overrides_the_preset(tmp_path):
    preset = tune_in_process(["run", "--model", "resnet9000", "--target", "x86-avx2", "--show-passes"],
                             tmp_path)
    assert "WinogradConv2D(on)" in preset.stdout                 # the x86 presets turn it on
    off = tune_in_process(["run", "--model", "resnet9000", "--target", "x86-avx2", "--no-winograd",
                           "--show-passes"], tmp_path)
    assert "WinogradConv2D(off)" in off.stdout


def test_roofline_command_shows_a_run_by_id_folder_or_artifact(tiny_run):
    cwd, run = tiny_run
    summary = run.json()
    # by run id in a real process; the folder, the artifact and the error in this one
    for call, ref in ((tune_cli, summary["mlflow_run_id"]), (tune_in_process, summary["run_dir"]),
                      (tune_in_process, summary["artifact"])):
        shown = call(["roofline", ref], cwd)
        assert shown.returncode == 0, shown.stderr
        assert "GFLOP/s" in shown.stdout and "of attainable" in shown.stdout \
            and "roofline.png" in shown.stdout
    missing = tune_in_process(["roofline", "no-such-run"], cwd)
    assert missing.returncode != 0 and "no roofline" in missing.stderr


def test_roofline_calibrate_measures_and_caches(tmp_path):
    res = tune_cli(["roofline", "--calibrate", "--ceilings-dir", str(tmp_path / "c")], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "GFLOP/s" in res.stdout and "GB/s" in res.stdout and list((tmp_path / "c").glob("*.json"))
