from mlflow.tracking import MlflowClient

from pipeline.tracking import DEFAULT_TRACKING_URI, RunRecorder, tracking_uri


def test_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None) == DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(None) == "http://127.0.0.1:5000"
    assert tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_recorder_logs_everything_and_marks_failure(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    rec = RunRecorder(uri, "exp", "run-1", {"model": "m"})
    rec.params({"preset": "x86", "long": "y" * 7000})
    rec.metrics({"latency_tuned_median": 1.5, "skipped": None})
    rec.series("tune_best_latency_ms", [(4, 3.0), (8, 2.0)])
    (tmp_path / "f.txt").write_text("hi")
    rec.artifact(tmp_path / "f.txt", "run")
    rec.finish("FAILED", "verification failed")
    rec.finish("FINISHED")  # idempotent: the first status stands

    run = MlflowClient(uri).get_run(rec.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "verification failed"
    assert run.data.params["preset"] == "x86" and len(run.data.params["long"]) == 6000
    assert run.data.metrics["latency_tuned_median"] == 1.5
    history = MlflowClient(uri).get_metric_history(rec.run_id, "tune_best_latency_ms")
    assert [(m.step, m.value) for m in history] == [(4, 3.0), (8, 2.0)]
    assert [a.path for a in MlflowClient(uri).list_artifacts(rec.run_id, "run")] == ["run/f.txt"]
