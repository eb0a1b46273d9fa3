import gzip
import shutil
from pathlib import Path

import pytest

from pipeline.build import build
from pipeline.logs import SHIPPED, merge_shipped, ship
from pipeline.tuning import SearchSettings, TuneBudget, open_database, tune

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
    from pipeline.passes import apply_passes, graph_passes
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
        mod = apply_passes(imported.mod, target, graph_passes(resolved.tuning["layout"],
                                                             resolved.tuning.get("weight_prepack", False)))
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
