"""Distributed measurement over TVM RPC: builds stay on this host (cross-compiled for the preset by
our WarmBuilder), MetaSchedule's RPCRunner uploads each candidate to whichever server the tracker
hands out for the device key, and times it there.

A farm is one tracker (`python -m tvm.exec.rpc_tracker`) and N servers per device key
(`python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`); docs/nightly.md shows the setup.
A server that dies mid-run costs only the candidates it held: `RetryingRunner` sends them again, to
the servers still registered, before a failure is recorded.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError

log = logging.getLogger(__name__)
# what a lost server or connection looks like in a RunnerResult.error_msg (not a kernel's fault)
_TRANSIENT = re.compile(r"RPC|[Cc]onnection|[Ss]ocket|[Ss]ession|[Tt]racker|Timeout|timed out|"
                        r"Broken pipe|EOF|terminated", re.ASCII)


def parse_address(text: str, flag: str = "--rpc") -> tuple[str, int]:
    """'HOST:PORT' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"bad {flag} {text!r}: use HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


@dataclass(frozen=True)
class QueueStatus:
    key: str
    free: int
    pending: int
    total: int


@dataclass(frozen=True)
class TrackerStatus:
    servers: list[dict]          # {"key": ..., "address": "host:port"}
    queue: list[QueueStatus]


def tracker_status(address: str) -> TrackerStatus:
    """The tracker's servers and its queue per device key."""
    from tvm import rpc

    host, port = parse_address(address, "--tracker")
    try:
        import socket

        # connect_tracker retries for a minute on a refused port; fail fast when nothing listens
        socket.create_connection((host, port), timeout=5).close()
        summary = rpc.connect_tracker(host, port).summary()
    except Exception as exc:  # noqa: BLE001  (any failure to talk to it is one line for the user)
        raise UserError(f"cannot reach the RPC tracker at {address}: {exc}") from None
    servers = [{"key": s["key"], "address": f"{s['addr'][0]}:{s['addr'][1]}"}
               for s in summary.get("server_info", [])]
    queue = [QueueStatus(key, int(v.get("free", 0)), int(v.get("pending", 0)),
                         int(v.get("free", 0)) + _busy(servers, key, v))
             for key, v in sorted(summary.get("queue_info", {}).items())]
    return TrackerStatus(servers, queue)


def _busy(servers: list[dict], key: str, info: dict) -> int:
    registered = sum(1 for s in servers if s["key"].split(":")[-1] == key or s["key"] == key)
    return max(0, registered - int(info.get("free", 0)))


def check_key(address: str, key: str) -> int:
    """Servers registered under `key`; a UserError when there are none (nothing would be measured)."""
    status = tracker_status(address)
    entry = next((q for q in status.queue if q.key == key), None)
    if entry is None or entry.total == 0:
        keys = ", ".join(q.key for q in status.queue) or "none"
        raise UserError(f"no RPC server registered under key {key!r} at {address} (keys: {keys})")
    return entry.total


class _RetryFuture:
    """A runner future that re-submits its candidate when the server or connection was lost."""

    def __init__(self, runner: RetryingRunner, runner_input, future) -> None:
        self.runner, self.input, self.future = runner, runner_input, future

    def done(self) -> bool:
        return self.future.done()

    def result(self):
        result = self.future.result()
        for attempt in range(self.runner.retries):
            if result.error_msg is None or not _TRANSIENT.search(result.error_msg):
                break
            log.warning("RPC measurement failed (%s); retrying on another server (%d/%d)",
                        result.error_msg.strip().splitlines()[-1][:160], attempt + 1, self.runner.retries)
            self.runner.retried += 1
            result = self.runner.inner.run([self.input])[0].result()
        return result


class RetryingRunner:
    """MetaSchedule's RPCRunner plus retries of transient failures (our tune loop only ever calls
    `run` and `.result()`, so this needs no C++ side)."""

    def __init__(self, inner, retries: int = 2) -> None:
        self.inner, self.retries, self.retried = inner, retries, 0

    def run(self, runner_inputs: list) -> list:
        return [_RetryFuture(self, i, f) for i, f in zip(runner_inputs, self.inner.run(runner_inputs))]


def rpc_runner(address: str, key: str, settings, max_workers: int | None = None,
               session_timeout_s: float | None = None) -> RetryingRunner:
    """A runner measuring on the tracker's servers for `key`: one connection per server at a time
    (max_workers defaults to the number registered now), the same evaluator settings as locally."""
    from tvm.s_tir import meta_schedule as ms

    host, port = parse_address(address)
    servers = check_key(address, key)
    inner = ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                       session_priority=1,
                                       session_timeout_sec=int(session_timeout_s or settings.runner_timeout_s)),
        evaluator_config=ms.runner.EvaluatorConfig(number=settings.runner_number, repeat=1,
                                                   min_repeat_ms=settings.runner_min_repeat_ms,
                                                   enable_cpu_cache_flush=False),
        max_workers=max_workers or servers)
    log.info("measuring on %d RPC server(s) under key %s at %s", servers, key, address)
    return RetryingRunner(inner)


# -- local farms (tests, and a one-host setup): every process is started and stopped by its PID ----

@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_tracker(port: int, log_dir: Path, host: str = "127.0.0.1") -> Proc:
    return _spawn("tracker", [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host,
                              "--port", str(port), "--port-end", str(port + 1), "--silent"],
                  log_dir / "tracker.log")


def start_server(name: str, tracker: str, key: str, port: int, log_dir: Path,
                 host: str = "127.0.0.1") -> Proc:
    """An RPC server registered with `tracker` under `key`; its log records every module it loads."""
    return _spawn(name, [sys.executable, "-m", "tvm.exec.rpc_server", "--host", host,
                         "--port", str(port), "--port-end", str(port + 1), "--tracker", tracker,
                         "--key", key], log_dir / f"{name}.log")


def _spawn(name: str, cmd: list[str], log_path: Path) -> Proc:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as sink:   # the child keeps its own copy of the descriptor
        popen = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return Proc(name, popen, log_path)


def stop(proc: Proc, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
    """Stop `proc` and the worker processes it started (a server forks one per session, and TVM's
    popen workers outlive a SIGTERM to their parent), each by its PID."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in [psutil.Process(proc.pid)] if proc.popen.poll() is None else []:
        p.send_signal(sig)
    for child in children:
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    try:
        proc.popen.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.popen.kill()
        proc.popen.wait()
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except psutil.TimeoutExpired:
            os.kill(child.pid, signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def wait_for_tracker(address: str, timeout_s: float = 60.0) -> None:
    """Until the tracker accepts connections (servers started earlier retry only every 5 s)."""
    import socket

    host, port = parse_address(address, "--tracker")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise UserError(f"the RPC tracker at {address} did not start within {timeout_s:.0f} s") \
                    from None
            time.sleep(0.2)


def wait_for_servers(address: str, key: str, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status = tracker_status(address)
            if sum(q.total for q in status.queue if q.key == key) >= count:
                return
        except UserError:
            pass
        if time.monotonic() > deadline:
            raise UserError(f"{count} RPC server(s) for key {key!r} did not register at {address} "
                            f"within {timeout_s:.0f} s")
        time.sleep(0.3)
