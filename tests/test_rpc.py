"""Distributed measurement on loopback: a tracker and two servers (free ports), MetaSchedule measuring
through them, one server killed mid-run. Every process is stopped by its PID in the fixture."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from pipeline.errors import UserError
from pipeline.rpc import (
    parse_address,
    rpc_runner,
    start_server,
    start_tracker,
    stop,
    tracker_status,
    wait_for_servers,
    wait_for_tracker,
)
from pipeline.tracking import free_port
from pipeline.tuning import SearchSettings, TuneBudget, tune
from tests.conftest import tune_cli

FAST = SearchSettings(trials_per_iter=4, population_size=32, init_min_unmeasured=8, runner_number=1,
                      runner_min_repeat_ms=0)
KEY = "test-cpu"


@pytest.fixture
def farm(tmp_path):
    """(tracker address, [server procs], log dir): a tracker and two servers on 127.0.0.1."""
    logs = tmp_path / "farm"
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs = [start_tracker(port, logs)]
    try:
        wait_for_tracker(address)
        servers = [start_server(f"server{i}", address, KEY, free_port(), logs) for i in range(2)]
        procs += servers
        wait_for_servers(address, KEY, 2)
        yield address, servers, logs
    finally:
        for proc in reversed(procs):
            stop(proc)
        assert all(p.popen.poll() is not None for p in procs)


def _loads(server) -> int:
    return server.log_text().count("load_module")


def _records(db_dir) -> list[list]:
    path = db_dir / "database_tuning_record.json"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_tuning_measures_on_both_servers_then_survives_losing_one(farm, mlp_mod, tmp_path):
    address, servers, _ = farm
    _, mod, target = mlp_mod
    status = tracker_status(address)
    assert [(q.key, q.total) for q in status.queue] == [(KEY, 2)]

    runner = rpc_runner(address, KEY, FAST)
    report = tune(mod, target, tmp_path / "db", tmp_path / "logs", TuneBudget(trials=8), FAST,
                  runner=runner)
    assert report.trials_new == 8
    records = _records(tmp_path / "db")
    assert len(records) == 8
    assert sum(r[1][1][0] < 1e9 for r in records) >= 6, "most candidates measured over RPC"
    assert _loads(servers[0]) > 0 and _loads(servers[1]) > 0, "both servers measured candidates"

    # Second run: kill server 0 (and its session workers) once it has taken a candidate.
    before = [_loads(s) for s in servers]
    killed = threading.Event()

    def killer():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _loads(servers[0]) == before[0]:
            time.sleep(0.05)
        stop(servers[0], signal.SIGKILL)
        killed.set()

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    runner = rpc_runner(address, KEY, FAST)
    more = tune(mod, target, tmp_path / "db", tmp_path / "logs2", TuneBudget(trials=16), FAST,
                runner=runner)
    thread.join(5)
    assert killed.is_set()
    assert more.trials_new == 8 and more.trials_reused == 8
    after = _records(tmp_path / "db")
    assert len(after) == 16 and after[:8] == records, "no record lost or rewritten"
    assert _loads(servers[1]) > before[1], "the surviving server took over"
    assert [(q.key, q.total) for q in tracker_status(address).queue] == [(KEY, 1)]


def test_rpc_status_cli_and_bad_addresses(farm, tmp_path):
    address, _, _ = farm
    run = tune_cli(["rpc", "status", "--tracker", address, "--json"], tmp_path)
    assert run.returncode == 0, run.stderr
    status = run.json()
    assert status["queue"] == [{"key": KEY, "free": 2, "pending": 0, "total": 2}]
    assert len(status["servers"]) == 2
    with pytest.raises(UserError):
        parse_address("localhost")
    with pytest.raises(UserError, match="no RPC server registered under key 'nope'"):
        rpc_runner(address, "nope", FAST)
    bad = tune_cli(["rpc", "status", "--tracker", f"127.0.0.1:{free_port()}"], tmp_path)
    assert bad.returncode == 2 and "cannot reach the RPC tracker" in bad.stderr
