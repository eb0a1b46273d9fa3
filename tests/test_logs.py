import gzip
import shutil

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
    assert ship(tuned).bytes_written == shipped.bytes_written  # deterministic bytes for git

    fresh = tmp_path / "clone" / "x86-test"
    shutil.copytree(tuned / SHIPPED, fresh / SHIPPED)           # what a fresh clone has
    built = build(mod, target, fresh)
    assert built.scheduled_tasks == built.total_tasks == 2
    assert len(open_database(fresh).get_all_tuning_records()) == 2
    assert merge_shipped(fresh) == 0, "merged once per version of the shipped files"
    again = tune(mod, target, fresh, tmp_path / "logs2", TuneBudget(trials=4), FAST)
    assert again.trials_new == 0 and again.trials_reused == 4, "a shipped record stands for its search"
