"""The library entry point: stages in order, progress through the callback, nothing printed."""

from pipeline.config import RunConfig
from pipeline.measure import MeasureSettings
from pipeline.run import run_pipeline
from pipeline.tuning import TuneBudget
from tests.conftest import mlflow_store, mlp_onnx


def test_run_pipeline_reports_progress_and_prints_nothing(tmp_path, capfd):
    events = []
    config = RunConfig(model=str(mlp_onnx(tmp_path / "mlp.onnx")), budget=TuneBudget(trials=2),
                       tuning_logs=tmp_path / "logs", out=tmp_path / "out", runs_dir=tmp_path / "runs",
                       tracking_uri=mlflow_store(tmp_path, "m.db"), skip_untuned=True,
                       measure=MeasureSettings(warmup=1, repeats=3))
    result = run_pipeline(config, progress=events.append)
    out, err = capfd.readouterr()
    assert out == "", "the library never prints"
    stages = [e.stage for e in events if e.n_tasks is None]
    assert stages == ["import", "passes", "tune", "build", "verify", "measure", "roofline", "export"]
    tune_events = [e for e in events if e.n_tasks is not None]
    assert tune_events and tune_events[-1].trials_done == 2 == tune_events[-1].trials_total
    assert result.verified and result.trials_new == 2 and set(result.latency_ms) == {"tuned", "onnxruntime", "openvino"}
    assert (tmp_path / "runs" / result.run_dir.split("/")[-1] / "summary.json").exists()
    assert sorted(result.stage_seconds) == sorted(stages)
    assert 0 < result.roofline["fraction"] <= 1.5 and result.roofline["top"]
    assert (tmp_path / "runs" / result.run_dir.split("/")[-1] / "roofline" / "roofline.png").exists()


def test_the_default_build_is_exported_when_it_ran_faster(tmp_path, monkeypatch):
    """Forced here (the real decision compares two measured medians): the default-scheduled build
    is verified on its own, exported, and its latency goes to the registry."""
    import json

    from pipeline import measure

    monkeypatch.setattr(measure, "faster_build", lambda stats, margin=0.03: "untuned")
    config = RunConfig(model=str(mlp_onnx(tmp_path / "mlp.onnx")), budget=TuneBudget(trials=0),
                       tuning_logs=tmp_path / "logs", out=tmp_path / "out", runs_dir=tmp_path / "runs",
                       tracking_uri=mlflow_store(tmp_path, "m.db"), roofline=False,
                       measure=MeasureSettings(warmup=1, repeats=3))
    result = run_pipeline(config)
    assert result.exported == "untuned" and result.verified
    manifest = json.loads((tmp_path / "out" / result.artifact.split("/")[-1] / "manifest.json").read_text())
    assert manifest["build"] == "untuned"
    assert manifest["verification"] == result.verification     # the check of the build exported
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=config.tracking_uri)
    name, version = result.registered.split("/")
    tags = client.get_model_version(name, version).tags
    assert float(tags["latency_ms"]) == result.latency_ms["untuned"]
    assert client.get_run(result.mlflow_run_id).data.tags["exported_build"] == "untuned"
