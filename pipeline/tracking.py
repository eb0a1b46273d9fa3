"""Stage 7, record: every run in MLflow (local SQLite store unless told otherwise).

The library talks to MLflow through this one class, with an explicit client and run id (no fluent
global state), so a failure anywhere can still mark the run FAILED or KILLED with its reason.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(explicit: str | None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def quiet_mlflow() -> None:
    import mlflow  # noqa: F401  (its import configures its loggers; quieten them afterwards)

    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)


class RunRecorder:
    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> None:
        quiet_mlflow()
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        self._ended = False

    def params(self, params: dict[str, object]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log_metrics([Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None])

    def series(self, name: str, points: list[tuple[int, float]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log_metrics([Metric(name, float(v), now, int(step)) for step, v in points])

    def _log_metrics(self, items: list) -> None:
        for i in range(0, len(items), 500):  # MLflow's per-request limit for metrics
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v)[:5000])

    def artifact(self, path: Path, subdir: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), subdir)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), subdir)

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """status: FINISHED, FAILED or KILLED; idempotent so error paths can call it freely."""
        if self._ended:
            return
        if reason:
            self.tags({"failure_reason": reason})
        self.client.set_terminated(self.run_id, status=status)
        self._ended = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_ui(uri: str, port: int = 5000, timeout_s: float = 60.0) -> Iterator[str]:
    """The MLflow UI on 127.0.0.1 over `uri`, up and answering; yields its URL, stops it on exit."""
    from pipeline.errors import UserError

    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    # The server's log goes to a file, not a pipe: nobody reads a pipe while the UI runs, and a
    # full one would block the server once it had logged 64 kB of requests.
    with tempfile.TemporaryFile() as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    log_file.seek(0)
                    tail = log_file.read().decode(errors="replace").strip()[-300:]
                    raise UserError(f"the MLflow UI exited: {tail}")
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise UserError(f"the MLflow UI did not answer on {url} within {timeout_s:.0f} s")
                time.sleep(0.5)
            yield url
        finally:
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the server and everything it started (uvicorn, the job runner, its huey consumers):
    they share its process group, and stopping the server alone leaves them running."""
    import os
    import signal

    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
