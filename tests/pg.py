"""A throwaway PostgreSQL cluster for the integration tests: Debian's postgresql binaries, a data
directory under the test's tmp dir, loopback only, a free port, trust auth, fsync off.

PostgreSQL refuses to run as root; as root the cluster runs as the `postgres` system user (which
Debian's package creates) through `runuser`. Without the binaries, `postgres_or_skip` skips with the
reason (`make postgres` installs them where apt may be used). The server is stopped by its PID."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.tracking import free_port

USER = "tune"


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class Cluster:
    url: str                 # postgresql://tune@127.0.0.1:PORT/postgres
    port: int
    pid: int
    data: Path

    def database(self, name: str) -> str:
        """A fresh database on the cluster; returns its URL."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def start_cluster(root: Path) -> Cluster:
    bindir = _bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (run `make postgres`, or apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'psycopg[binary]')")
    if os.geteuid() == 0 and (shutil.which("runuser") is None or subprocess.run(
            ["id", "postgres"], capture_output=True, check=False).returncode):
        pytest.skip("running as root without a `postgres` user to run PostgreSQL as")
    root.mkdir(parents=True, exist_ok=True)
    data, sock = root / "data", root / "sock"
    sock.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        for p in (root, sock):
            shutil.chown(p, "postgres", "postgres")
        for parent in list(root.parents)[:-1]:   # the postgres user must reach the data directory
            os.chmod(parent, os.stat(parent).st_mode | 0o011)
    subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", USER, "-A", "trust",
                                 "--no-sync", "-E", "UTF8"]), check=True, capture_output=True)
    port = free_port()
    log = root / "postgres.log"
    opts = f"-p {port} -k {sock} -h 127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(log),
                                 "-w", "-t", "60", "start"]), check=True, capture_output=True)
    pid = int((data / "postmaster.pid").read_text().splitlines()[0])
    return Cluster(f"postgresql://{USER}@127.0.0.1:{port}/postgres", port, pid, data)


def stop_cluster(cluster: Cluster, timeout_s: float = 30.0) -> None:
    """Fast shutdown (SIGINT to the postmaster, by its PID); it stops its own backends."""
    try:
        os.kill(cluster.pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(cluster.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(cluster.pid, signal.SIGKILL)
