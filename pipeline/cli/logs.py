"""`tune logs`: curate the tuning logs (ship, compact, and copy records to and from PostgreSQL)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import PostgresStore, PresetOrAuto, TuningLogsRoot, app, guard, out

logs_app = typer.Typer(no_args_is_help=True, help="Curate the tuning logs (one MetaSchedule database per preset).")
app.add_typer(logs_app, name="logs")


@logs_app.command("ship")
def logs_ship(
    preset: PresetOrAuto = "auto",
    tuning_logs: TuningLogsRoot = Path("tuning_logs"),
) -> None:
    """Keep the best record per workload of a preset's database, gzipped under <preset>/shipped/
    (what a fresh clone starts from; commit it)."""
    guard(_logs_ship, preset, tuning_logs)


def _logs_ship(preset: str, tuning_logs: Path) -> None:
    from pipeline.errors import UserError
    from pipeline.logs import ship
    from pipeline.targets import resolve_target

    name = resolve_target(preset).preset
    folder = tuning_logs / name
    if not (folder / "database_tuning_record.json").is_file():
        raise UserError(f"no tuning records for preset {name} in {folder}")
    report = ship(folder)
    out.print(f"{name}: {report.workloads} workloads, {report.records} records, "
              f"{report.bytes_written / 1e3:.0f} kB in {report.folder}")


@logs_app.command("compact")
def logs_compact(
    preset: PresetOrAuto = "auto",
    keep: Annotated[int, typer.Option(help="Records kept per workload (the fastest valid ones).")] = 32,
    tuning_logs: TuningLogsRoot = Path("tuning_logs"),
    tuning_db: Annotated[str | None, typer.Option(help="Compact this PostgreSQL store instead.")] = None,
) -> None:
    """Keep the top-k records per workload; the trials behind the rest still count when a run resumes."""
    guard(_logs_compact, preset, keep, tuning_logs, tuning_db)


def _logs_compact(preset: str, keep: int, tuning_logs: Path, tuning_db: str | None) -> None:
    from pipeline.targets import resolve_target
    from pipeline.tuning_db import compact_json, open_postgres

    if tuning_db:
        r = open_postgres(tuning_db).compact(keep)
        where = "the PostgreSQL store"
    else:
        folder = tuning_logs / resolve_target(preset).preset
        r = compact_json(folder, keep)
        where = str(folder)
    out.print(f"{where}: kept {r.kept} records, removed {r.removed} ({r.workloads} workloads); "
              f"{r.bytes_before / 1e6:.1f} MB -> {r.bytes_after / 1e6:.1f} MB of records")


@logs_app.command("export")
def logs_export(
    tuning_db: PostgresStore,
    preset: PresetOrAuto = "auto",
    tuning_logs: TuningLogsRoot = Path("tuning_logs"),
) -> None:
    """Copy a preset's JSON records into PostgreSQL (records it has already are skipped)."""
    guard(_logs_move, "export", preset, tuning_logs, tuning_db)


@logs_app.command("import")
def logs_import(
    tuning_db: PostgresStore,
    preset: PresetOrAuto = "auto",
    tuning_logs: TuningLogsRoot = Path("tuning_logs"),
) -> None:
    """Copy the PostgreSQL records into a preset's JSON database (records it has already are skipped)."""
    guard(_logs_move, "import", preset, tuning_logs, tuning_db)


def _logs_move(direction: str, preset: str, tuning_logs: Path, tuning_db: str) -> None:
    from pipeline.targets import resolve_target
    from pipeline.tuning import open_database
    from pipeline.tuning_db import copy_records, database_lock, open_postgres

    folder = tuning_logs / resolve_target(preset).preset
    pg = open_postgres(tuning_db)
    with database_lock(folder, exclusive=direction == "import"):
        js = open_database(folder)
        if direction == "export":
            r = copy_records(js, pg, src_dir=folder)
        else:
            r = copy_records(pg, js, dst_dir=folder)
    arrow = f"{folder} -> PostgreSQL" if direction == "export" else f"PostgreSQL -> {folder}"
    out.print(f"{arrow}: {r.added} of {r.records} records added ({r.workloads} workloads)")
