"""Shipped tuning logs: the best record per workload, compressed, committed under
`tuning_logs/<preset>/shipped/`, and merged into the working database of a fresh checkout.

The working database (`tuning_logs/<preset>/database_*.json`) is MetaSchedule's JSON database and
stays out of git: every run appends to it. MetaSchedule stores each workload as base64 of indented
JSON (~70 KB per ResNet kernel), so the shipped copy is gzipped (~20x smaller). Regenerate with
`tune logs ship --preset NAME` after tuning.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
SHIPPED = "shipped"
FILES = ("database_workload.json", "database_tuning_record.json")
MERGED_MARK = "shipped.merged"   # sha256 of the shipped files last merged into the working database
TRIALS_FILE = "trials.json"       # workload key -> trials the search spent on it before shipping
# workload key -> trials of the working database (records + compacted) that the shipped counts already
# stand for: the merged shipped records, or everything when this database was the one shipped
COVERED_FILE = "shipped.covered.json"
EXHAUSTED_FILE = "exhausted.json"  # workloads whose search space ran dry: nothing left to search


@dataclass(frozen=True)
class ShipReport:
    workloads: int
    records: int
    bytes_written: int
    folder: Path


def ship(database_dir: Path) -> ShipReport:
    """Prune the working database to its best record per workload and write the shipped copy."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.tuning import repair_database

    # not open_database: that would merge the previous shipped copy back into the source
    repair_database(database_dir)
    source = ms.database.JSONDatabase(work_dir=str(database_dir), module_equality="structural")
    out = database_dir / SHIPPED
    local = _database_trials(database_dir, source)
    # what this database searched, on top of any shipped search it resumed from
    spent = workload_trials(database_dir, local)
    with tempfile.TemporaryDirectory() as tmp:
        pruned = ms.database.JSONDatabase(work_dir=tmp, module_equality="structural")
        source.dump_pruned(pruned)
        _canonical_order(Path(tmp))
        out.mkdir(parents=True, exist_ok=True)
        size = 0
        for name in FILES:
            data = (Path(tmp) / name).read_bytes()
            target = out / (name + ".gz")
            # mtime=0: the same records give the same bytes, so git sees no change
            with open(target, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
                gz.write(data)
            size += target.stat().st_size
        (out / TRIALS_FILE).write_text(json.dumps(spent, indent=0, sort_keys=True) + "\n")
        exhausted = database_dir / EXHAUSTED_FILE
        if exhausted.is_file():
            shutil.copyfile(exhausted, out / EXHAUSTED_FILE)
        n_records = (Path(tmp) / FILES[1]).read_text().count("\n")
        n_workloads = (Path(tmp) / FILES[0]).read_text().count("\n")
    # the source already holds every shipped record, and the shipped counts stand for all its trials
    _write_json(database_dir / COVERED_FILE, local)
    (database_dir / MERGED_MARK).write_text(_digest(out) + "\n")
    log.info("shipped %d workloads, %d records (%d bytes) to %s", n_workloads, n_records, size, out)
    return ShipReport(n_workloads, n_records, size, out)


def _canonical_order(folder: Path) -> None:
    """dump_pruned writes in hash-map order; sort workloads by hash and records by workload, so
    the same records always give the same bytes (and git sees no change)."""
    workloads = [json.loads(line) for line in (folder / FILES[0]).read_text().splitlines()]
    records = [json.loads(line) for line in (folder / FILES[1]).read_text().splitlines()]
    order = sorted(range(len(workloads)), key=lambda i: workloads[i][0])
    new_index = {old: new for new, old in enumerate(order)}
    for rec in records:
        rec[0] = new_index[rec[0]]
    records.sort(key=lambda r: r[0])
    (folder / FILES[0]).write_text("".join(json.dumps(workloads[i]) + "\n" for i in order))
    (folder / FILES[1]).write_text("".join(json.dumps(r) + "\n" for r in records))


def shipped_trials(database_dir: Path) -> dict[str, int]:
    """Trials spent on each shipped workload: a shipped record stands for the whole search behind
    it, so a budget no larger than that search has nothing left to do."""
    path = database_dir / SHIPPED / TRIALS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def local_trials(records: dict[str, int], compacted: dict[str, int]) -> dict[str, int]:
    """Trials per workload a database holds: its records plus those compaction removed (they were
    trials all the same)."""
    out = dict(records)
    for key, n in compacted.items():
        out[key] = out.get(key, 0) + n
    return out


def workload_trials(database_dir: Path, local: dict[str, int], merged: bool = True) -> dict[str, int]:
    """Trials behind each workload: the shipped search's (`trials.json`) plus the trials of the
    working database beyond those the shipped count already stands for (the merged shipped records,
    or all of them where this database is the one that was shipped). `local`: `local_trials`.

    Not max(local, shipped): a night that adds fewer records than the shipped search had would not
    move the count, and the next night's budget and tuning curve would start where the last did.
    `merged=False`, a PostgreSQL store: the shipped copy is never merged into it, yet records exported
    from a JSON database may include it, so the older max(), which never counts twice."""
    spent = shipped_trials(database_dir)
    keys = set(local) | set(spent)
    if not merged:
        return {k: max(local.get(k, 0), spent.get(k, 0)) for k in keys}
    covered = _covered(database_dir, local, spent)
    return {k: spent.get(k, 0) + max(0, local.get(k, 0) - covered.get(k, 0)) for k in keys}


def _covered(database_dir: Path, local: dict[str, int], spent: dict[str, int]) -> dict[str, int]:
    """Trials of the working database that the shipped counts already include (COVERED_FILE)."""
    path = database_dir / COVERED_FILE
    if path.is_file():
        return json.loads(path.read_text())
    if not (database_dir / MERGED_MARK).is_file():
        return {}   # nothing shipped went into (or came from) this database
    # merged or shipped before these counts were kept, so which records came from the shipped copy is
    # unknown: start from the old count, max(local, shipped), and count every trial from here on
    covered = {k: min(local.get(k, 0), n) for k, n in spent.items()}
    _write_json(path, covered)
    return covered


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=0, sort_keys=True) + "\n")
    tmp.replace(path)


def shipped_exhausted(database_dir: Path) -> dict[str, str]:
    path = database_dir / SHIPPED / EXHAUSTED_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in FILES:
        h.update((folder / (name + ".gz")).read_bytes())
    return h.hexdigest()


def _database_trials(database_dir: Path, db) -> dict[str, int]:
    from pipeline.tuning import record_stats
    from pipeline.tuning_db import compacted_trials

    return local_trials({k: n for k, (n, _) in record_stats(db).items()}, compacted_trials(database_dir))


def merge_shipped(database_dir: Path) -> int:
    """Merge the shipped records into the working database once (per version of the shipped files).
    Returns how many records were added; each is counted as covered by the shipped trial counts."""
    shipped = database_dir / SHIPPED
    if not all((shipped / (n + ".gz")).is_file() for n in FILES):
        return 0
    digest = _digest(shipped)
    mark = database_dir / MERGED_MARK
    if mark.is_file() and mark.read_text().strip() == digest:
        return 0
    from tvm.s_tir import meta_schedule as ms

    from pipeline.tuning import workload_key

    with tempfile.TemporaryDirectory() as tmp:
        for name in FILES:
            with gzip.open(shipped / (name + ".gz"), "rb") as src, open(Path(tmp) / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        records = ms.database.JSONDatabase(work_dir=tmp, module_equality="structural")
        working = ms.database.JSONDatabase(work_dir=str(database_dir), module_equality="structural")
        # an older version merged before covered counts were kept is settled first (against this
        # version's trials.json: the older one is gone)
        legacy = mark.is_file() and not (database_dir / COVERED_FILE).is_file()
        covered = _covered(database_dir, _database_trials(database_dir, working) if legacy else {},
                           shipped_trials(database_dir))
        added = 0
        for rec in records.get_all_tuning_records():
            workload = working.commit_workload(rec.workload.mod)
            working.commit_tuning_record(ms.database.TuningRecord(
                rec.trace, workload, rec.run_secs, rec.target, rec.args_info))
            key = workload_key(rec.workload.mod)
            covered[key] = covered.get(key, 0) + 1   # a copy of the shipped search, not a trial of ours
            added += 1
    # counts before the mark: a kill in between merges and counts again; the count errs high, never low
    _write_json(database_dir / COVERED_FILE, covered)
    mark.write_text(digest + "\n")
    log.info("merged %d shipped records into %s", added, database_dir)
    return added
