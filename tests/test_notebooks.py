"""notebooks/: each notebook runs top to bottom (nbclient) against the MLflow store of a real tiny
run made in a temp dir, and shows what it is for."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def _execute(name: str, env: dict[str, str], monkeypatch) -> str:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            texts.append(out.get("text", "") or "".join(out.get("data", {}).get("text/plain", "")))
            assert out.get("output_type") != "error", out
    return "\n".join(texts)


@pytest.mark.parametrize("by_id", [True, False])
def test_roofline_notebook(tiny_run, monkeypatch, by_id):
    cwd, run = tiny_run
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    if by_id:
        env["RUN_ID"] = run.json()["mlflow_run_id"]
    text = _execute("roofline.ipynb", env, monkeypatch)
    assert "ceilings:" in text and "of attainable" in text and "fraction" in text


def test_compare_notebook(tiny_run, monkeypatch):
    cwd, _ = tiny_run
    text = _execute("compare_runs.ipynb", {"MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
                                           "MODEL": "tiny-cnn"}, monkeypatch)
    assert "runs of tiny-cnn" in text and "latency_ms" in text
