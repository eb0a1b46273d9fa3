"""Tuning-log safety: the lock (two processes, one JSON database), kill -9 mid-tuning, compaction,
and the PostgreSQL store (two tuning processes at once, export/import, the MLflow server on it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.tuning import SearchSettings, TuneBudget, tune
from pipeline.tuning_db import COMPACTED_FILE, compact_json, database_lock
from tests.conftest import ROOT, TUNE, mlflow_store, mlp_onnx, tune_cli, tune_in_process
from tests.pg import start_cluster, stop_cluster

FAST = SearchSettings(trials_per_iter=4, population_size=32, init_min_unmeasured=8, runner_number=1,
                      runner_min_repeat_ms=0)

# One tuning process over the two-task MLP: argv = onnx path, database dir, trials, tuning-db URL or "".
WORKER = """
import json, sys
from pathlib import Path
from pipeline import tvm_compat
from pipeline.importer import import_model
from pipeline.passes import apply_passes, graph_passes
from pipeline.targets import resolve_target
from pipeline.tuning import SearchSettings, TuneBudget, tune
tvm_compat.apply()
onnx, db, trials, url = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] or None
target = resolve_target("auto").tvm_target()
mod = apply_passes(import_model(onnx).mod, target, graph_passes("NCHW"))
fast = SearchSettings(trials_per_iter=2, population_size=32, init_min_unmeasured=8, runner_number=1,
                      runner_min_repeat_ms=0)
r = tune(mod, target, db, db.parent / ("logs-" + str(__import__("os").getpid())), TuneBudget(trials=trials),
         fast, tuning_db=url)
print(json.dumps({"new": r.trials_new, "reused": r.trials_reused,
                  "before": sum(t.trials_before for t in r.tasks)}))
"""


def _worker(onnx: Path, db: Path, trials: int, url: str = "") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(onnx), str(db), str(trials), url], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def _record_lines(db: Path) -> list[str]:
    path = db / "database_tuning_record.json"
    return path.read_text().splitlines() if path.exists() else []


def test_two_processes_on_one_json_database_wait_and_share(tmp_path):
    onnx, db = mlp_onnx(tmp_path / "mlp.onnx"), tmp_path / "db"
    procs = [_worker(onnx, db, 6) for _ in range(2)]
    results = sorted((_finish(p) for p in procs), key=lambda r: r["new"], reverse=True)
    # one tuned while the other waited on the lock, then found the work done: nothing twice
    assert results[0]["new"] == 6 and results[1] == {"new": 0, "reused": 6, "before": 6}
    lines = _record_lines(db)
    assert len(lines) == 6 and all(json.loads(line)[0] in (0, 1) for line in lines)
    assert len((db / "database_workload.json").read_text().splitlines()) == 2


def _wait_for_text(paths: list[Path], text: str, procs: list[subprocess.Popen], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.is_file() and text in p.read_text() for p in paths):
        for proc, path in zip(procs, paths):
            assert proc.poll() is None, f"exited {proc.returncode} before waiting: {path.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {text!r} from every process"
        time.sleep(0.1)


def test_two_tune_runs_on_one_tuning_log_folder_take_turns_through_the_cli(tmp_path):
    """The lock as users meet it: two `tune run` processes at once on one `--tuning-logs` folder.
    The test holds the lock until both report waiting (so the race is the same on any machine);
    then one tunes, the other waits for it and resumes from its records, and both succeed."""
    from pipeline.targets import resolve_target

    onnx, logs = mlp_onnx(tmp_path / "mlp.onnx"), tmp_path / "tuning_logs"
    db = logs / resolve_target("auto").preset
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    errs = [tmp_path / f"stderr{i}.txt" for i in range(2)]
    procs = []
    with database_lock(db):
        for i, err in enumerate(errs):
            # own MLflow store, run folder and artifacts: only the tuning logs are shared
            args = ["run", "--model", str(onnx), "--trials", "4", "--json", "--skip-untuned", "--no-roofline",
                    "--no-register", "--repeats", "5", "--measure-seconds", "0.2", "--tuning-logs", str(logs),
                    "--runs-dir", f"runs{i}", "--out", f"artifacts{i}",
                    "--tracking-uri", mlflow_store(tmp_path, f"mlflow{i}.db")]
            with open(err, "w") as sink:
                procs.append(subprocess.Popen(TUNE + args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                              stderr=sink, text=True))
        try:
            _wait_for_text(errs, "waiting for", procs)
        except BaseException:
            for proc in procs:
                proc.kill()
                proc.communicate()
            raise
    summaries = []
    for proc, err in zip(procs, errs):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.read_text()[-2000:]
        summaries.append(json.loads(out.strip().splitlines()[-1]))
    tuned, waited = sorted(summaries, key=lambda r: r["trials_new"], reverse=True)
    assert (tuned["trials_new"], tuned["trials_reused"]) == (4, 0)
    assert (waited["trials_new"], waited["trials_reused"]) == (0, 4), "it waited, then found the work done"
    assert tuned["verified"] and waited["verified"]
    lines = _record_lines(db)
    assert len(lines) == len(set(lines)) == 4, "each candidate once: nothing tuned twice, no line doubled"
    assert all(json.loads(line)[0] in (0, 1) for line in lines), "every record points at a workload"
    assert len((db / "database_workload.json").read_text().splitlines()) == 2


def test_kill_9_mid_tuning_loses_at_most_the_batch_in_flight(tmp_path, mlp_mod):
    onnx, db = mlp_onnx(tmp_path / "mlp.onnx"), tmp_path / "db"
    proc = _worker(onnx, db, 40)
    try:
        deadline = time.monotonic() + 240
        while len(_record_lines(db)) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    committed = len(_record_lines(db))
    assert 3 <= committed < 40
    _, mod, target = mlp_mod
    resumed = tune(mod, target, db, tmp_path / "logs", TuneBudget(trials=0), FAST)
    # every committed record is seen (a half-written last line, if any, is dropped)
    assert sum(t.trials_before for t in resumed.tasks) in (committed, committed - 1)
    with database_lock(db, timeout_s=5):   # the dead holder's lock is gone with it
        pass


def test_compaction_keeps_top_k_and_the_trial_counts(tmp_path, mlp_mod):
    _, mod, target = mlp_mod
    db = tmp_path / "db"
    first = tune(mod, target, db, tmp_path / "logs", TuneBudget(trials=8), FAST)
    best = {t.name: t.best_us for t in first.tasks}
    report = compact_json(db, keep=1)
    assert report.kept == 2 and report.removed == 6 and report.bytes_after < report.bytes_before
    assert sum(json.loads((db / COMPACTED_FILE).read_text()).values()) == 6
    again = tune(mod, target, db, tmp_path / "logs2", TuneBudget(trials=8), FAST)
    assert again.trials_new == 0, "compacted trials still count: nothing is searched twice"
    assert {t.name: t.best_us for t in again.tasks} == best
    cli = tune_in_process(["logs", "compact", "--keep", "1", "--tuning-logs", str(tmp_path), "--preset",
                           "x86-avx512-vnni"], tmp_path)
    assert cli.returncode == 2 and "no tuning records" in cli.stderr


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("postgres"))
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


def test_postgres_store_two_processes_at_once_then_export_import(postgres, tmp_path, mlp_mod):
    import psycopg

    url = postgres.database("tuning_two")
    onnx = mlp_onnx(tmp_path / "mlp.onnx")
    procs = [_worker(onnx, tmp_path / f"host{i}", 4, url) for i in range(2)]
    results = [_finish(p) for p in procs]
    assert all(r["new"] + r["reused"] == 4 for r in results)
    with psycopg.connect(url) as conn:
        workloads = conn.execute("SELECT count(*) FROM ms_workload").fetchone()[0]
        records = conn.execute("SELECT count(*) FROM ms_record").fetchone()[0]
        hosts = conn.execute("SELECT count(DISTINCT workload_id) FROM ms_record").fetchone()[0]
    assert workloads == 2 and hosts == 2, "one row per workload, whichever host committed it first"
    assert 4 <= records <= sum(r["new"] for r in results)   # identical candidates are stored once
    for i, r in enumerate(results):   # the preset folder holds only the cost model with this store
        assert (tmp_path / f"host{i}" / "cost_model.tar").is_file() == (r["new"] > 0)

    _, mod, target = mlp_mod
    third = tune(mod, target, tmp_path / "host2", tmp_path / "logs", TuneBudget(trials=4), FAST, tuning_db=url)
    assert third.trials_new == 0 and third.trials_reused == 4, "a third host resumes from the shared store"

    # PostgreSQL -> JSON -> a fresh PostgreSQL database: same records, same counts after compaction.
    # The `tune logs` commands run in this process (the CLI's code and messages, without four
    # interpreters importing TVM); the two tuning hosts above are real processes.
    logs = tmp_path / "tuning_logs"
    imp = tune_in_process(["logs", "import", "--tuning-db", url, "--tuning-logs", str(logs), "--preset", "auto"],
                          tmp_path)
    assert imp.returncode == 0, imp.stderr
    assert f"{records} of {records} records added" in imp.stdout
    again = tune_in_process(["logs", "import", "--tuning-db", url, "--tuning-logs", str(logs)], tmp_path)
    assert f"0 of {records} records added" in again.stdout
    url2 = postgres.database("tuning_copy")
    exp = tune_in_process(["logs", "export", "--tuning-db", url2, "--tuning-logs", str(logs)], tmp_path)
    assert exp.returncode == 0 and f"{records} of {records} records added" in exp.stdout, exp.stderr
    comp = tune_in_process(["logs", "compact", "--keep", "1", "--tuning-db", url2], tmp_path)
    assert comp.returncode == 0 and "kept 2 records" in comp.stdout, comp.stderr
    after = tune(mod, target, tmp_path / "host3", tmp_path / "logs3", TuneBudget(trials=4), FAST, tuning_db=url2)
    assert after.trials_new == 0 and sum(t.trials_before for t in after.tasks) == records


def test_mlflow_server_on_postgres_records_a_nightly_and_the_pipeline(postgres, tmp_path):
    """The tracking server backed by PostgreSQL, tuning records in PostgreSQL too: one night."""
    from pipeline.tracking import free_port

    store = postgres.database("mlflow")
    port = free_port()
    with open(tmp_path / "mlflow.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
             store.replace("postgresql://", "postgresql+psycopg://"), "--artifacts-destination",
             str(tmp_path / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=log, cwd=tmp_path, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", server, tmp_path / "mlflow.log")
        mlp_onnx(tmp_path / "mlp.onnx")
        (tmp_path / "nightly.toml").write_text(NIGHT)
        run = tune_cli(["nightly", "--config", "nightly.toml", "--tuning-db", postgres.database("records"),
                        "--json"], tmp_path, env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
        assert run.returncode == 0, run.stderr + run.stdout
        job = run.json()["jobs"][0]
        assert job["status"] == "ok" and job["promoted"] and job["trials_new"] == 2
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        assert client.get_model_version_by_alias(job["registered_model"], "champion").version == job["version"]
        parent = client.get_run(run.json()["mlflow_run_id"])
        children = client.search_runs([parent.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert [c.info.run_name for c in children] == ["mlp"]
    finally:
        # the server and the uvicorn process it starts, by the group it leads; a throwaway store
        # needs no graceful shutdown (that took ~6 s)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


NIGHT = """
[defaults]
skip_untuned = true
repeats = 10
measure_seconds = 0.5

[nightly]
repeats = 20
measure_seconds = 0.5

[[job]]
model = "mlp.onnx"
trials = 2
"""


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {log.read_text()[-1000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer: {log.read_text()[-1000:]}")
