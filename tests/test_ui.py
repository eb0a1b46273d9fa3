"""The browser check: `tune ui` serves the project's MLflow store on loopback, and headless
Chromium sees the run, its metrics and its roofline artifact there. The screenshots are kept in
test-artifacts/. Skips (saying why) only when no Chromium is installed (`make test` installs
Debian's chromium when it can)."""

import shutil
import subprocess
import time

import pytest

from tests.conftest import ARTIFACTS, TUNE

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture
def ui(tiny_run):
    cwd, run = tiny_run
    proc = subprocess.Popen([*TUNE, "ui", "--port", "0", "--tracking-uri",
                             f"sqlite:///{cwd / 'mlflow.db'}"], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        url = None
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline().strip()
            if line.startswith("http://127.0.0.1:"):
                url = line
        assert url, f"tune ui printed no URL: {proc.stderr.read() if proc.poll() is not None else ''}"
        yield url, run.json()
    finally:
        proc.terminate()
        proc.wait(20)


def _render(url: str, screenshot) -> str:
    """The DOM after the single-page app has rendered (virtual time lets its fetches finish)."""
    base = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--window-size=1400,1000", "--virtual-time-budget=20000", "--hide-scrollbars"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-500:]
    ARTIFACTS.mkdir(exist_ok=True)
    subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    return dom.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: `make test` installs it with "
                    "apt-get when run as root; install Debian's chromium to run the browser check")
def test_mlflow_ui_shows_the_run_metrics_and_roofline(ui):
    url, summary = ui
    run_id = summary["mlflow_run_id"]
    page = f"{url}/#/experiments/{_experiment_id(url, run_id)}/runs/{run_id}"
    overview = _render(page, ARTIFACTS / "mlflow-run.png")
    assert run_id in overview or "tiny-cnn" in overview
    assert "latency_tuned_median" in overview and "roofline_fraction" in overview
    artifacts = _render(f"{page}/artifacts/run/roofline/roofline.png", ARTIFACTS / "mlflow-roofline.png")
    assert "roofline.png" in artifacts and "roofline.csv" in artifacts
    assert (ARTIFACTS / "mlflow-run.png").stat().st_size > 10_000


def _experiment_id(url: str, run_id: str) -> str:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=10) as r:
        return json.load(r)["run"]["info"]["experiment_id"]
