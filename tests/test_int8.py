"""pipeline/int8.py end to end through the CLI: the digits CNN (trained here on real images)
quantized with real calibration data keeps its held-out accuracy, proved by the run itself and
logged to MLflow; and the accuracy gate fails a run on purpose (exit code, FAILED run, no artifact)."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import tune_cli


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    pytest.importorskip("torch")
    from pipeline.digits import load_digits_split, train_digits_cnn

    root = tmp_path_factory.mktemp("digits")
    data = load_digits_split(seed=0)
    onnx.save(train_digits_cnn(data, seed=0), root / "digits.onnx")
    np.save(root / "calib.npy", data.train_x[:64])
    np.savez(root / "heldout.npz", input=data.test_x, labels=data.test_y)
    return root, data


def _run(root: Path, *extra: str):
    return tune_cli(["run", "--model", str(root / "digits.onnx"), "--quantize", "int8", "--trials", "0",
                     "--no-roofline", "--no-register", "--skip-untuned", "--repeats", "5",
                     "--measure-seconds", "1", "--json", *extra], root)


def test_digits_int8_keeps_heldout_accuracy(digits):
    root, data = digits
    r = _run(root, "--calibration", str(root / "calib.npy"), "--accuracy-data", str(root / "heldout.npz"))
    assert r.returncode == 0, r.stderr[-2000:]
    s = r.json()
    acc = s["verification"]["accuracy"]
    assert acc["kind"] == "labelled" and acc["samples"] == len(data.test_y)
    assert acc["reference_accuracy"] >= 0.95
    assert acc["drop_points"] <= 1.0
    q = s["quantization"]
    assert not q["synthetic"] and q["int8_layers"] >= 3        # the 1-channel first conv too
    run = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(s["mlflow_run_id"])
    assert run.data.tags["variant"] == "int8" and run.data.tags["calibration"] == "data"
    assert run.data.metrics["accuracy_drop_points"] == pytest.approx(acc["drop_points"])
    assert run.data.metrics["int8_layers"] == q["int8_layers"]
    assert (root / s["artifact"] / "manifest.json").exists()
    print(f"digits held-out: fp32 {acc['reference_accuracy']:.4f}, int8 {acc['quantized_accuracy']:.4f}")


def test_accuracy_gate_fails_the_run(digits):
    root, data = digits
    # Calibrated on images scaled to 1/1000: every real activation saturates.
    np.save(root / "dim.npy", data.train_x[:16] * 1e-3)
    r = _run(root, "--calibration", str(root / "dim.npy"), "--accuracy-data", str(root / "heldout.npz"),
             "--fallback-rounds", "0", "--max-accuracy-drop", "0.5", "--experiment", "gate")
    assert r.returncode == 5, r.stderr[-2000:]
    assert "exceeds --max-accuracy-drop 0.5" in r.stderr
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("gate").experiment_id])
    assert run.info.status == "FAILED"
    assert "artifact" not in run.data.tags


def test_bad_quantize_flags_are_one_line_errors(digits):
    root, _ = digits
    for args, message in [(["--calibration", str(root / "missing.npy")], "not found"),
                          (["--calibration-method", "magic"], "--calibration-method"),
                          (["--keep-fp32", "conv2d_99"], "no layer named conv2d_99")]:
        r = _run(root, *args)
        assert r.returncode == 2, (args, r.stderr[-1000:])
        assert message in r.stderr.strip().splitlines()[-1]
