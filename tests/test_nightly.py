"""`tune nightly`: two nights in a row on a tiny matrix (the MLP), plus a job that fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.nightly import Settings, decide, load_config
from tests.conftest import TUNE, mlflow_store, mlp_onnx, tune_cli

NIGHT = """
[nightly]
keep = 3
repeats = 20
measure_seconds = 0.5
regression = 1000.0      # the MLP's microsecond timings are noise; exit codes come from job failures

[defaults]
skip_untuned = true
repeats = 10
measure_seconds = 0.5

[[job]]
model = "mlp.onnx"
trials = 4

[[job]]
model = "no-such-model"
trials = 2
"""


def _records(cwd) -> list[str]:
    path = next(cwd.glob("tuning_logs/*/database_tuning_record.json"))
    return path.read_text().splitlines()


def test_two_nights_resume_promote_only_when_faster_and_record_a_failed_job(tmp_path):
    from mlflow.tracking import MlflowClient

    mlp_onnx(tmp_path / "mlp.onnx")
    (tmp_path / "nightly.toml").write_text(NIGHT)
    first = tune_cli(["nightly", "--config", "nightly.toml", "--json"], tmp_path)
    assert first.returncode == 1, "a failed job makes the night fail, after the others ran"
    one = first.json()
    mlp, bad = one["jobs"]
    assert bad["status"] == "failed" and "unknown model" in bad["error"]
    assert mlp["status"] == "ok" and mlp["trials_new"] == 4 and mlp["trials_before"] == 0
    assert mlp["promoted"] and mlp["decision"] == "no champion yet: promoted"
    assert len(_records(tmp_path)) <= 2 * 3, "compacted to the top 3 per workload"
    assert json.loads((tmp_path / one["folder"] / "summary.json").read_text())["exit_code"] == 1
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(one["mlflow_run_id"])
    assert parent.info.status == "FAILED"
    assert _nested(client, parent) == [("mlp", "FINISHED"), ("no-such-model", "FAILED")]

    # night 2 without the failing job (its process start costs seconds and shows nothing new)
    (tmp_path / "nightly.toml").write_text(NIGHT.split("[[job]]\nmodel = \"no-such-model\"")[0])
    second = tune_cli(["nightly", "--config", "nightly.toml", "--json"], tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    two = second.json()["jobs"][0]
    assert two["trials_before"] == 4 and two["trials_new"] == 4, "resumed: night 1's trials are not repeated"
    assert two["champion_version"] == mlp["version"] and two["version"] != mlp["version"]
    assert two["promoted"] == (two["gain"] >= 0.02 and two["p_faster"] < 0.05)
    assert [h["trials_total"] for h in two["history"]] == [4, 8]
    assert two["history"][1]["curve"][0][0] > 4, "night 2's curve continues where night 1's ended"
    folder = tmp_path / second.json()["folder"]
    md = (folder / "summary.md").read_text()
    assert "the search across nights" in md and "| 4 |" in md and "| 8 |" in md
    assert json.loads((folder / "summary.json").read_text())["exit_code"] == 0
    parent = client.get_run(second.json()["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and _nested(client, parent) == [("mlp", "FINISHED")]
    champion = client.get_model_version_by_alias(mlp["registered_model"], "champion").version
    assert str(champion) == (two["version"] if two["promoted"] else mlp["version"])


def _nested(client, parent) -> list[tuple[str, str]]:
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return sorted((r.info.run_name, r.info.status) for r in runs)


STOPPED_NIGHT = """
[nightly]
repeats = 5
measure_seconds = 0.2

[defaults]
skip_untuned = true
repeats = 5
measure_seconds = 0.2

[[job]]
model = "mlp.onnx"
trials = 4               # first batches of 2 (the smallest search): the first record comes soon

[[job]]
name = "after"
model = "mlp.onnx"
trials = 2
"""


def _in_session(sid: int) -> list[int]:
    """Live processes of a session: the job leads its own, its builder and runner workers are in it."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":   # after "pid (comm)": state, ppid, pgrp, session
            members.append(int(stat.parent.name))
    return members


def test_sigterm_to_the_night_reaches_its_job_which_keeps_its_records_and_no_job_follows(tmp_path):
    mlp_onnx(tmp_path / "mlp.onnx")
    (tmp_path / "nightly.toml").write_text(STOPPED_NIGHT)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store(tmp_path)}
    night = subprocess.Popen(TUNE + ["nightly", "--config", "nightly.toml", "--json"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while night.poll() is None and time.monotonic() < deadline and not (
                list(tmp_path.glob("tuning_logs/*/database_tuning_record.json")) and _records(tmp_path)):
            time.sleep(0.1)
        assert night.poll() is None, "the night ended before its job tuned"
        # the tuning process writes its PID into the database lock it holds: the job, not the night
        job = int(next(tmp_path.glob("tuning_logs/*/.lock")).read_text().split()[0])
        assert job != night.pid and _in_session(job)
        seen = len(_records(tmp_path))
        night.send_signal(signal.SIGTERM)
        _, stderr = night.communicate(timeout=90)
    finally:
        if night.poll() is None:
            night.kill()
            night.communicate()
    assert night.returncode == 130, stderr
    deadline = time.monotonic() + 5   # workers the job shut down may take a moment to exit
    while _in_session(job) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _in_session(job), "the job and its workers are gone, none left running on its own"
    records = _records(tmp_path)
    assert len(records) >= seen and all(json.loads(line)[0] in (0, 1) for line in records), "records kept"
    summary = json.loads(next(tmp_path.glob("nightly/*/summary.json")).read_text())
    assert summary["exit_code"] == 130
    assert [(j["job"], j["status"]) for j in summary["jobs"]] == [("mlp", "interrupted"), ("after", "skipped")]
    assert "interrupted" in summary["jobs"][0]["error"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "KILLED" and "SIGTERM" in parent.data.tags["failure_reason"]
    assert _nested(client, parent) == [("mlp", "KILLED")]
    pipeline_run = client.search_runs([client.get_experiment_by_name("mlp").experiment_id])[0]
    assert pipeline_run.info.status == "KILLED"


def test_decision_needs_a_gain_beyond_noise():
    s = Settings()
    fast, slow = [10.0 + 0.01 * i for i in range(30)], [11.0 + 0.01 * i for i in range(30)]
    assert decide(fast, slow, s)["promoted"]
    assert decide(slow, fast, s)["regression"]
    same = decide(fast, list(reversed(fast)), s)
    assert not same["promoted"] and not same["regression"] and "within noise" in same["decision"]
    # 1% faster is real here but below min_gain: kept
    assert not decide([x * 0.99 for x in slow], slow, s)["promoted"]


@pytest.mark.parametrize("text, message", [
    ("[[job]]\nmodel = 'm'\n", "give a budget"),
    ("[[job]]\nmodel = 'm'\ntrials = 2\nvariant = 'fp16'\n", "variant 'fp16'"),
    ("[[job]]\nmodel = 'm'\ntrials = 2\nbudget = 3\n", "unknown key(s) budget"),
    ("[nightly]\nkeep = 2\n", "no [[job]] tables"),
    ("[[job]]\nmodel = 'm'\ntime_budget = 'soon'\n", "bad duration"),
])
def test_bad_configs_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "n.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(path)


def test_sample_config_parses():
    from tests.conftest import ROOT

    _, jobs = load_config(ROOT / "nightly.toml")
    assert jobs and all(j.trials or j.time_budget for j in jobs)
    assert {j.variant for j in jobs} <= {"fp32", "int8", "sparse"}
