"""pipeline/registry.py and pipeline/compare.py, end to end through the CLI: two runs of one model
with different budgets are compared side by side, `tune promote` points `champion` at the faster
verified version, and `models:/<name>@champion` loads through pyfunc and gives the verified output."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tune_cli


@pytest.fixture(scope="module")
def two_runs(tiny_run):
    cwd, first = tiny_run
    second = tune_cli(["run", "--model", "tiny-cnn", "--trials", "0", "--json", "--repeats", "20",
                       "--skip-untuned"], cwd)
    assert second.returncode == 0, second.stderr
    return cwd, first.json(), second.json()


def _client(cwd: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")


def test_every_verified_run_is_a_model_version(two_runs):
    cwd, first, second = two_runs
    name, _, version = second["registered"].partition("/")
    assert name == f"tiny-cnn-{second['preset']}" and first["registered"].startswith(name + "/")
    v = _client(cwd).get_model_version(name, version)
    assert v.run_id == second["mlflow_run_id"]
    assert v.tags["verified"] == "true" and v.tags["variant"] == "fp32"
    assert float(v.tags["latency_ms"]) == pytest.approx(second["latency_ms"]["tuned"], rel=1e-3)


def test_compare_shows_both_runs_side_by_side(two_runs):
    cwd, first, second = two_runs
    ids = [first["mlflow_run_id"], second["mlflow_run_id"]]
    shown = tune_cli(["compare", *ids, "--json"], cwd)
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout.strip().splitlines()[-1])
    assert [r["run_id"] for r in rows] == ids
    assert rows[0]["trials_new"] >= 6 and rows[1]["trials_new"] == 0
    assert all(r["latency_ms"] > 0 and r["speedups"]["onnxruntime"] > 0 and r["verified"]
               and r["roofline_fraction"] > 0 for r in rows)
    table = tune_cli(["compare", "--model", "tiny-cnn"], cwd)
    assert table.returncode == 0 and first["mlflow_run_id"][:12] in table.stdout \
        and second["mlflow_run_id"][:12] in table.stdout and "roofline" in table.stdout
    missing = tune_cli(["compare", "--model", "no-such-model"], cwd)
    assert missing.returncode != 0 and "no runs of no-such-model" in missing.stderr


def test_promote_picks_the_fastest_and_champion_loads_through_pyfunc(two_runs, monkeypatch):
    import mlflow

    cwd, first, second = two_runs
    promoted = tune_cli(["promote", "--model", "tiny-cnn"], cwd)
    assert promoted.returncode == 0, promoted.stderr
    client = _client(cwd)
    name = second["registered"].split("/")[0]
    versions = [v for v in client.search_model_versions(f"name = '{name}'")
                if v.tags.get("verified") == "true"]
    fastest = min(versions, key=lambda v: float(v.tags["latency_ms"]))
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == fastest.version and f"version {fastest.version}" in promoted.stdout

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{cwd / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{cwd / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    artifact = Path(champion.tags["artifact"])
    verify = np.load(artifact / "verify.npz")
    inputs = [k for k in verify.files if k.startswith("input:")]
    got = model.predict(verify[inputs[0]])
    np.testing.assert_allclose(got, verify["output:0"], rtol=1e-5, atol=1e-6)


def test_promote_without_versions_is_one_clear_line(tmp_path):
    res = tune_cli(["promote", "--model", "nothing-here"], tmp_path)
    assert res.returncode != 0 and "nothing-here" in res.stderr and len(res.stderr.strip().splitlines()) == 1
