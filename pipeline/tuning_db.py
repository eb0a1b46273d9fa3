"""Where tuning records live, and keeping them safe and small.

* `database_lock`: one `fcntl` lock file per JSON database folder. MetaSchedule's JSONDatabase keeps
  the workload table in memory and appends records that point into it by index, so two processes
  appending to one folder would interleave indices and corrupt it. A tuning process holds the lock
  exclusively while it tunes (a second one waits, then resumes from what the first committed); a
  build holds it shared. The kernel drops the lock when its holder dies, `kill -9` included.
* `compact_json` / `PostgresDatabase.compact`: keep the top-k valid records per workload and count
  the rest in `compacted.json` (or the workload row), so a resumed run still knows how many trials
  each workload had and the logs stay bounded.
* `PostgresDatabase`: MetaSchedule's `PyDatabase` hook over PostgreSQL (psycopg 3), so a farm of
  tuning hosts shares one store; identical records (same trace, target and arguments) are stored
  once. `copy_records` moves records between a JSON folder and PostgreSQL (`tune logs export/import`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"
COMPACTED_FILE = "compacted.json"   # workload key -> records removed by compaction (still trials)
WORKLOADS, RECORDS = "database_workload.json", "database_tuning_record.json"
FAILED = 1e10


def is_postgres(url: str | None) -> bool:
    return bool(url) and url.split("://", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


@contextmanager
def database_lock(directory: Path, exclusive: bool = True, timeout_s: float | None = None,
                  on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the folder's lock; waits for another holder (calling `on_wait` once) up to `timeout_s`."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s is in use by another tuning process: waiting for it", directory)
            if on_wait is not None:
                on_wait()
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() > deadline:
                        raise UserError(f"{directory} stayed locked by another tuning process for "
                                        f"{timeout_s:.0f} s") from None
                    time.sleep(0.2)
        if exclusive:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield
    finally:
        os.close(fd)   # closing the descriptor releases the lock


def compacted_trials(directory: Path) -> dict[str, int]:
    path = directory / COMPACTED_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def dropped_trials(db, directory: Path) -> dict[str, int]:
    """Trials per workload that compaction removed from `db` (they still count for resume)."""
    getter = getattr(db, "dropped_trials", None)
    return getter() if callable(getter) else compacted_trials(directory)


def _mean(secs) -> float:
    secs = [float(s) for s in secs or []]
    return sum(secs) / len(secs) if secs and secs[0] < FAILED else FAILED


@dataclass(frozen=True)
class CompactReport:
    workloads: int
    kept: int
    removed: int
    bytes_before: int
    bytes_after: int


def compact_json(directory: Path, keep: int) -> CompactReport:
    """Keep the `keep` fastest valid records per workload of a JSON database (failed ones go too).

    Pure JSON, no TVM: the record file is rewritten to a temporary file and renamed over the old one
    under the exclusive lock, so a kill at any point leaves either the old or the new file."""
    from pipeline.tuning import repair_database

    if keep < 1:
        raise UserError("--keep must be >= 1")
    path = directory / RECORDS
    if not path.is_file():
        raise UserError(f"no tuning records in {directory}")
    with database_lock(directory):
        repair_database(directory)
        keys = [f"{int(json.loads(line)[0]) & 0xFFFFFFFFFFFFFFFF:016x}"
                for line in (directory / WORKLOADS).read_text().splitlines() if line.strip()]
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        by_workload: dict[int, list[tuple[float, int]]] = {}
        for i, line in enumerate(lines):
            idx, rec = json.loads(line)
            by_workload.setdefault(idx, []).append((_mean(rec[1]), i))
        kept: set[int] = set()
        dropped = compacted_trials(directory)
        for idx, entries in by_workload.items():
            valid = sorted(e for e in entries if e[0] < FAILED)[:keep]
            kept.update(i for _, i in valid)
            if len(entries) > len(valid):
                dropped[keys[idx]] = dropped.get(keys[idx], 0) + len(entries) - len(valid)
        before = path.stat().st_size
        tmp = path.with_suffix(".compact.tmp")
        tmp.write_text("".join(lines[i] + "\n" for i in sorted(kept)))
        counts = directory / COMPACTED_FILE
        counts_tmp = counts.with_suffix(".tmp")
        counts_tmp.write_text(json.dumps(dropped, indent=1, sort_keys=True))
        # counts first: a kill between the two renames over-counts trials (a task is skipped),
        # never under-counts them (trials repeated)
        counts_tmp.replace(counts)
        tmp.replace(path)
    report = CompactReport(len(by_workload), len(kept), len(lines) - len(kept), before, path.stat().st_size)
    log.info("compacted %s: kept %d of %d records (%d workloads)", directory, report.kept, len(lines),
             report.workloads)
    return report


def record_json(record) -> list:
    """A TuningRecord as plain JSON, the way MetaSchedule's JSONDatabase writes it. Python's
    `TuningRecord.as_json` raises on traces holding an IndexMap (our rules' weight prepacking);
    C++ writes such objects as TVM's JSON-graph string, and that is what loads back."""
    import tvm
    from tvm.s_tir.meta_schedule import _ffi_api
    from tvm.tirx import FloatImm, IntImm
    from tvm_ffi.container import Array, Map

    def plain(obj):
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, (IntImm, FloatImm)):
            return obj.value
        if isinstance(obj, Array):
            return [plain(o) for o in obj]
        if isinstance(obj, Map):
            return {plain(k): plain(v) for k, v in obj.items()}
        return tvm.ir.save_json(obj)

    return plain(_ffi_api.TuningRecordAsJSON(record))


def _digest(rec_json: list) -> str:
    """Identity of a measured candidate: its trace, target and arguments (not its timing)."""
    trace, _secs, target, args = (rec_json + [None, None, None, None])[:4]
    return hashlib.sha256(json.dumps([trace, target, args], sort_keys=True).encode()).hexdigest()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS ms_workload (
    id BIGSERIAL PRIMARY KEY,
    shash TEXT NOT NULL UNIQUE,
    workload TEXT NOT NULL,
    dropped INTEGER NOT NULL DEFAULT 0,
    created TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS ms_record (
    id BIGSERIAL PRIMARY KEY,
    workload_id BIGINT NOT NULL REFERENCES ms_workload(id) ON DELETE CASCADE,
    run_secs DOUBLE PRECISION NOT NULL,
    record TEXT NOT NULL,
    digest TEXT NOT NULL,
    host TEXT,
    created TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (workload_id, digest)
);
CREATE INDEX IF NOT EXISTS ms_record_best ON ms_record (workload_id, run_secs);
"""


def _connect(url: str):
    try:
        import psycopg
    except ImportError:
        raise UserError("--tuning-db postgresql://... needs psycopg: pip install 'psycopg[binary]'") from None
    url = url.replace("postgresql+psycopg://", "postgresql://", 1)
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise UserError(f"cannot reach the tuning database: {str(exc).strip().splitlines()[0]}") from None
    with conn.cursor() as cur:
        # several hosts may create the schema at once: serialise that on an advisory lock
        cur.execute("SELECT pg_advisory_lock(72707)")
        try:
            cur.execute(_SCHEMA)
        finally:
            cur.execute("SELECT pg_advisory_unlock(72707)")
    return conn


def _database_classes():
    """Defined lazily: importing MetaSchedule costs seconds, and the CLI's other commands need none."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class PostgresDatabase(ms.database.PyDatabase):
        """MetaSchedule records in PostgreSQL; workloads keyed by structural hash, as in JSON."""

        def __init__(self, url: str) -> None:
            super().__init__()
            self.url = url
            self.conn = _connect(url)
            self.host = socket.gethostname()
            self._workloads: dict[int, object] = {}     # row id -> Workload
            self._ids: dict[str, int] = {}              # shash -> row id

        # -- helpers ---------------------------------------------------------------------------
        def _key(self, mod) -> str:
            from pipeline.tuning import workload_key

            return workload_key(mod)

        def _workload(self, row_id: int, text: str | None = None):
            if row_id not in self._workloads:
                if text is None:
                    with self.conn.cursor() as cur:
                        cur.execute("SELECT workload FROM ms_workload WHERE id = %s", (row_id,))
                        text = cur.fetchone()[0]
                self._workloads[row_id] = ms.database.Workload.from_json(json.loads(text))
            return self._workloads[row_id]

        def _lookup(self, mod) -> int | None:
            key = self._key(mod)
            if key in self._ids:
                return self._ids[key]
            with self.conn.cursor() as cur:
                cur.execute("SELECT id, workload FROM ms_workload WHERE shash = %s", (key,))
                row = cur.fetchone()
            if row is None:
                return None
            self._ids[key] = row[0]
            self._workload(row[0], row[1])
            return row[0]

        def _record(self, row_id: int, text: str):
            return ms.database.TuningRecord.from_json(json.loads(text), self._workload(row_id))

        # -- the PyDatabase interface ----------------------------------------------------------
        def has_workload(self, mod) -> bool:
            return self._lookup(mod) is not None

        def commit_workload(self, mod):
            row_id = self._lookup(mod)
            if row_id is None:
                workload = ms.database.Workload(mod)
                with self.conn.cursor() as cur:
                    # ON CONFLICT: another host may commit the same workload at the same moment
                    cur.execute("INSERT INTO ms_workload (shash, workload) VALUES (%s, %s) "
                                "ON CONFLICT (shash) DO NOTHING",
                                (self._key(mod), json.dumps(workload.as_json())))
                row_id = self._lookup(mod)
            return self._workloads[row_id]

        def commit_tuning_record(self, record) -> None:
            row_id = self._lookup(record.workload.mod)
            if row_id is None:
                self.commit_workload(record.workload.mod)
                row_id = self._lookup(record.workload.mod)
            rec = record_json(record)
            with self.conn.cursor() as cur:
                cur.execute("INSERT INTO ms_record (workload_id, run_secs, record, digest, host) "
                            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (workload_id, digest) DO NOTHING",
                            (row_id, _mean(rec[1]), json.dumps(rec), _digest(rec), self.host))

        def get_top_k(self, workload, top_k: int) -> list:
            row_id = self._lookup(workload.mod)
            if row_id is None or top_k <= 0:
                return []
            with self.conn.cursor() as cur:
                cur.execute("SELECT record FROM ms_record WHERE workload_id = %s AND run_secs < %s "
                            "ORDER BY run_secs, id LIMIT %s", (row_id, FAILED, top_k))
                return [self._record(row_id, r[0]) for r in cur.fetchall()]

        def get_all_tuning_records(self) -> list:
            with self.conn.cursor() as cur:
                cur.execute("SELECT id, workload FROM ms_workload")
                for row_id, text in cur.fetchall():
                    self._workload(row_id, text)
                cur.execute("SELECT workload_id, record FROM ms_record ORDER BY id")
                return [self._record(w, r) for w, r in cur.fetchall()]

        def __len__(self) -> int:
            with self.conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM ms_record")
                return int(cur.fetchone()[0])

        # -- ours ------------------------------------------------------------------------------
        def dropped_trials(self) -> dict[str, int]:
            with self.conn.cursor() as cur:
                cur.execute("SELECT shash, dropped FROM ms_workload WHERE dropped > 0")
                return dict(cur.fetchall())

        def merge_dropped(self, counts: dict[str, int]) -> None:
            """Compaction counts from another store; GREATEST so that importing twice is harmless."""
            with self.conn.cursor() as cur:
                for key, n in counts.items():
                    cur.execute("UPDATE ms_workload SET dropped = GREATEST(dropped, %s) WHERE shash = %s",
                                (n, key))

        def compact(self, keep: int) -> CompactReport:
            if keep < 1:
                raise UserError("--keep must be >= 1")
            with self.conn.transaction(), self.conn.cursor() as cur:
                cur.execute("SELECT count(*), count(DISTINCT workload_id), "
                            "coalesce(sum(length(record)), 0) FROM ms_record")
                total, workloads, before = cur.fetchone()
                cur.execute("""
                    WITH ranked AS (
                        SELECT id, run_secs, row_number() OVER (
                            PARTITION BY workload_id ORDER BY run_secs, id) AS rn FROM ms_record),
                    gone AS (
                        DELETE FROM ms_record r USING ranked x
                        WHERE r.id = x.id AND (x.rn > %s OR x.run_secs >= %s)
                        RETURNING r.workload_id)
                    UPDATE ms_workload w SET dropped = w.dropped + c.n
                    FROM (SELECT workload_id, count(*) AS n FROM gone GROUP BY workload_id) c
                    WHERE w.id = c.workload_id""", (keep, FAILED))
                cur.execute("SELECT count(*), coalesce(sum(length(record)), 0) FROM ms_record")
                kept, after = cur.fetchone()
            return CompactReport(int(workloads), int(kept), int(total - kept), int(before), int(after))

        def close(self) -> None:
            self.conn.close()

    return PostgresDatabase


_CLASSES: dict[str, type] = {}


def open_postgres(url: str):
    """A MetaSchedule Database over the PostgreSQL at `url` (tables created on first use)."""
    if not is_postgres(url):
        raise UserError(f"--tuning-db {url!r}: use a postgresql://user@host:port/dbname URL")
    if "pg" not in _CLASSES:
        _CLASSES["pg"] = _database_classes()
    return _CLASSES["pg"](url)


@dataclass(frozen=True)
class CopyReport:
    workloads: int
    records: int        # records offered
    added: int          # records the destination did not have yet


def copy_records(src, dst, src_dir: Path | None = None, dst_dir: Path | None = None) -> CopyReport:
    """Every record of `src` into `dst`, skipping those `dst` has (same workload, trace, target
    and arguments); compaction counts travel too, so resume semantics survive the move."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.tuning import workload_key

    have: set[tuple[str, str]] = set()
    for rec in dst.get_all_tuning_records():
        have.add((workload_key(rec.workload.mod), _digest(record_json(rec))))
    records = src.get_all_tuning_records()
    added, keys = 0, set()
    for rec in records:
        key = workload_key(rec.workload.mod)
        keys.add(key)
        ident = (key, _digest(record_json(rec)))
        if ident in have:
            continue
        workload = dst.commit_workload(rec.workload.mod)
        dst.commit_tuning_record(ms.database.TuningRecord(rec.trace, workload, rec.run_secs, rec.target,
                                                          rec.args_info))
        have.add(ident)
        added += 1
    dropped = dropped_trials(src, src_dir or Path("/nonexistent"))
    if dropped:
        if hasattr(dst, "merge_dropped"):
            dst.merge_dropped(dropped)
        elif dst_dir is not None:
            merged = compacted_trials(dst_dir)
            for key, n in dropped.items():
                merged[key] = max(merged.get(key, 0), n)
            (dst_dir / COMPACTED_FILE).write_text(json.dumps(merged, indent=1, sort_keys=True))
    return CopyReport(len(keys), len(records), added)
