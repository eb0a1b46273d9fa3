import gzip
import json
import shutil
from pathlib import Path

import pytest

from pipeline.build import build
from pipeline.logs import COVERED_FILE, SHIPPED, TRIALS_FILE, merge_shipped, ship
from pipeline.tuning import SearchSettings, TuneBudget, open_database, tune
from pipeline.tuning_db import compact_json

FAST = SearchSettings(trials_per_iter=2, population_size=16, init_min_unmeasured=4, runner_number=1,
                      runner_min_repeat_ms=0)


def test_ship_keeps_best_record_per_workload_and_a_fresh_checkout_uses_it(mlp_mod, tmp_path):
    _, mod, target = mlp_mod
    tuned = tmp_path / "tuned" / "x86-test"
    report = tune(mod, target, tuned, tmp_path / "logs", TuneBudget(trials=4), FAST)
    assert report.trials_new == 4
    shipped = ship(tuned)
    assert shipped.workloads == 2 and shipped.records == 2
    assert shipped.bytes_written < sum(p.stat().st_size for p in tuned.glob("database_*.json"))
    assert gzip.open(tuned / SHIPPED / "database_tuning_record.json.gz").read().count(b"\n") == 2
    before = (tuned / SHIPPED / "database_workload.json.gz").read_bytes()
    ship(tuned)
    assert (tuned / SHIPPED / "database_workload.json.gz").read_bytes() == before  # stable for git

    fresh = tmp_path / "clone" / "x86-test"
    shutil.copytree(tuned / SHIPPED, fresh / SHIPPED)           # what a fresh clone has
    built = build(mod, target, fresh)
    assert built.scheduled_tasks == built.total_tasks == 2
    assert len(open_database(fresh).get_all_tuning_records()) == 2
    assert merge_shipped(fresh) == 0, "merged once per version of the shipped files"
    again = tune(mod, target, fresh, tmp_path / "logs2", TuneBudget(trials=4), FAST)
    assert again.trials_new == 0 and again.trials_reused == 4, "a shipped record stands for its search"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet50"])
def test_committed_shipped_logs_cover_every_task_of_the_model(model):
    """The shipped records are keyed by the exact kernels our passes produce: a pass change that
    silently orphans them fails here (compile-only, so any host can check any preset)."""
    from pipeline import tvm_compat
    from pipeline.importer import import_model
    from pipeline.logs import shipped_trials
    from pipeline.passes import apply_passes, preset_passes
    from pipeline.targets import load_presets, resolve_target
    from pipeline.tuning import extract_tasks, workload_key

    root = Path(__file__).resolve().parent.parent / "tuning_logs"
    presets = [p.name for p in load_presets().values() if (root / p.name / SHIPPED).is_dir()]
    assert presets, "no shipped tuning logs in the repository"
    tvm_compat.apply()
    imported = import_model(model)
    for preset in presets:
        resolved = resolve_target(preset)
        target = resolved.tvm_target()
        mod = apply_passes(imported.mod, target, preset_passes(resolved.tuning)[0])   # as `tune run`
        keys = {workload_key(t.dispatched[0]) for t in extract_tasks(mod, target)}
        shipped = shipped_trials(root / preset)
        assert keys <= set(shipped), f"{preset}: {len(keys - set(shipped))} tasks have no shipped record"


def test_shipping_twice_does_not_merge_the_shipped_copy_back(mlp_mod, tmp_path):
    _, mod, target = mlp_mod
    db = tmp_path / "x86-test"
    tune(mod, target, db, tmp_path / "logs", TuneBudget(trials=2), FAST)
    before = (db / "database_tuning_record.json").read_text()
    first = ship(db)
    open_database(db)
    assert (db / "database_tuning_record.json").read_text() == before
    assert ship(db).bytes_written == first.bytes_written


def _before(mod, target, db, logs) -> list[int]:
    """trials_before per task, tuning nothing."""
    return sorted(t.trials_before for t in tune(mod, target, db, logs, TuneBudget(trials=0), FAST).tasks)


def test_nights_on_a_large_shipped_search_grow_the_count_by_their_new_trials(mlp_mod, tmp_path):
    """trials_before = the shipped search + the trials run here since, the merged shipped record
    not counted twice. The old max(local records, shipped) kept a 64-trial shipped workload at 64
    for as long as the nights had added fewer than 64 records, so the curve never moved."""
    _, mod, target = mlp_mod
    tuned = tmp_path / "tuned" / "x86-test"
    tune(mod, target, tuned, tmp_path / "logs0", TuneBudget(trials=2), FAST)
    ship(tuned)
    assert _before(mod, target, tuned, tmp_path / "l0") == [1, 1], "the shipped database itself: no double count"
    (tuned / COVERED_FILE).unlink()   # a database shipped before the covered counts were kept
    assert _before(mod, target, tuned, tmp_path / "l0b") == [1, 1]
    trials = tuned / SHIPPED / TRIALS_FILE
    trials.write_text(json.dumps({k: 64 for k in json.loads(trials.read_text())}))  # a longer search

    fresh = tmp_path / "clone" / "x86-test"
    shutil.copytree(tuned / SHIPPED, fresh / SHIPPED)
    night = TuneBudget(trials=None, new_trials=2)
    one = tune(mod, target, fresh, tmp_path / "l1", night, FAST)
    assert sorted(t.trials_before for t in one.tasks) == [64, 64] and one.trials_new == 2
    two = tune(mod, target, fresh, tmp_path / "l2", night, FAST)
    assert sum(t.trials_before for t in two.tasks) == 128 + 2 and two.trials_new == 2
    compact_json(fresh, keep=1)
    assert sum(_before(mod, target, fresh, tmp_path / "l3")) == 128 + 4, "compacted records still count"
    ship(fresh)   # re-shipped from the clone: its trials are the whole search, and are not added again
    assert sum(json.loads((fresh / SHIPPED / TRIALS_FILE).read_text()).values()) == 128 + 4
    assert sum(_before(mod, target, fresh, tmp_path / "l4")) == 128 + 4
