import pytest

from pipeline.tuning import (SearchSettings, TuneBudget, _allot, open_database, repair_database,
                             tune)

FAST = SearchSettings(trials_per_iter=4, population_size=32, init_min_unmeasured=8, runner_number=1,
                      runner_min_repeat_ms=0)


def _records(db_dir):
    path = db_dir / "database_tuning_record.json"
    return path.read_text().count("\n") if path.exists() else 0


def test_tune_commits_records_then_resumes_without_new_trials(mlp_mod, tmp_path):
    _, mod, target = mlp_mod
    first = tune(mod, target, tmp_path / "db", tmp_path / "logs", TuneBudget(trials=4), FAST)
    assert len(first.tasks) == 2
    assert first.trials_new == 4 and first.trials_reused == 0
    assert _records(tmp_path / "db") == first.trials_new
    assert all(t.best_us is not None and t.trials_new == 2 for t in first.tasks)
    assert first.estimated_ms() is not None and first.curve
    assert list((tmp_path / "logs").glob("task_*.log")), "MetaSchedule logs go to the run folder"

    again = tune(mod, target, tmp_path / "db", tmp_path / "logs2", TuneBudget(trials=4), FAST)
    assert again.trials_new == 0 and again.trials_reused == 4
    assert again.wall_s < first.wall_s / 2
    assert _records(tmp_path / "db") == 4

    more = tune(mod, target, tmp_path / "db", tmp_path / "logs3", TuneBudget(trials=6, trials_per_task=3), FAST)
    assert more.trials_new == 2 and all(t.trials == 3 for t in more.tasks)


def test_interrupt_keeps_every_finished_record(mlp_mod, tmp_path):
    _, mod, target = mlp_mod
    seen = []

    def stop_after_first_batch(event):
        seen.append(event.trials_done)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune(mod, target, tmp_path / "db", tmp_path / "logs", TuneBudget(trials=16), FAST,
             progress=stop_after_first_batch)
    assert _records(tmp_path / "db") == seen[0] > 0
    resumed = tune(mod, target, tmp_path / "db", tmp_path / "logs", TuneBudget(trials=0), FAST)
    assert sum(t.trials_before for t in resumed.tasks) == seen[0]


def test_time_budget_and_stop_flag_stop_cleanly(mlp_mod, tmp_path):
    _, mod, target = mlp_mod
    timed = tune(mod, target, tmp_path / "a", tmp_path / "logs", TuneBudget(trials=16, time_budget_s=1e-3),
                 FAST)
    assert timed.stop_reason == "time" and 0 < timed.trials_new < 16
    assert _records(tmp_path / "a") == timed.trials_new
    stopped = tune(mod, target, tmp_path / "b", tmp_path / "logs", TuneBudget(trials=16), FAST,
                   should_stop=lambda: True)
    assert stopped.stop_reason == "interrupted" and stopped.trials_new == 0


def test_zero_trials_searches_nothing(mlp_mod, tmp_path):
    _, mod, target = mlp_mod
    report = tune(mod, target, tmp_path / "db", tmp_path / "logs", TuneBudget(trials=0), FAST)
    assert report.trials_new == 0 and report.stop_reason == "no-search"


def test_allotment():
    assert _allot(TuneBudget(trials=64), 29) == 3
    assert _allot(TuneBudget(trials=64, trials_per_task=10), 29) == 10
    assert _allot(TuneBudget(trials=0), 5) == 1


def test_truncated_last_record_is_dropped(tmp_path):
    good = '[0, ["trace", [1.0], {}, []]]\n'
    path = tmp_path / "database_tuning_record.json"
    path.write_text(good + '[0, ["tra')
    repair_database(tmp_path)
    assert path.read_text() == good


def test_open_database_creates_the_folder(tmp_path):
    db = open_database(tmp_path / "x" / "y")
    assert len(db) == 0 and (tmp_path / "x" / "y").is_dir()


def test_small_budget_reaches_every_task_first(mlp_mod, tmp_path):
    _, mod, target = mlp_mod
    report = tune(mod, target, tmp_path / "db", tmp_path / "logs", TuneBudget(trials=3, trials_per_task=3),
                  FAST)
    assert report.trials_new == 3
    assert sorted(t.trials_new for t in report.tasks) == [1, 2]


def test_cost_model_is_saved_and_warm_starts(mlp_mod, tmp_path, caplog):
    import logging

    _, mod, target = mlp_mod
    tune(mod, target, tmp_path / "db", tmp_path / "logs", TuneBudget(trials=2), FAST)
    assert (tmp_path / "db" / "cost_model.tar").is_file()
    with caplog.at_level(logging.INFO, logger="pipeline.tuning"):
        tune(mod, target, tmp_path / "db", tmp_path / "logs", TuneBudget(trials=4), FAST)
    assert "cost model warm-started" in caplog.text


def test_early_stop_after_patience_without_gain():
    from pipeline.tuning import TaskReport, _Task

    task = _Task(TaskReport("t", 1, 1.0, trials_before=0), mod=None, key="k", cap=100)
    task.report.trials_new, task.report.best_us = 16, 100.0
    task.note_best(None, patience=32)                  # first batch: the reference point
    for trials, best in ((32, 99.5), (48, 99.4)):      # < 1% better: not progress
        task.report.trials_new, task.report.best_us = trials, best
        task.note_best(100.0, patience=32)
    assert task.report.converged and task.wants == 0
    other = _Task(TaskReport("u", 1, 1.0, trials_before=0), mod=None, key="k2", cap=100)
    other.report.trials_new, other.report.best_us = 16, 100.0
    other.note_best(None, patience=32)
    other.report.trials_new, other.report.best_us = 48, 90.0   # a real gain resets the clock
    other.note_best(100.0, patience=32)
    assert not other.report.converged and other.wants == 52


def test_int8_tasks_are_tuned_in_the_tensorized_space(tmp_path):
    """MetaSchedule searches the int8 rule's knobs like any other: the candidates are tensorized on
    the dot instruction, build, measure, and the tuned module computes the exact integer result."""
    import numpy as np
    from tvm import relax

    from pipeline import tvm_compat
    from pipeline.build import build
    from pipeline.passes import post_tuning_passes
    from pipeline.passes.pipeline import fuse_for_build
    from pipeline.runtime import CompiledModel
    from pipeline.targets import resolve_target
    from schedules.cpu.int8 import dot_instruction

    tvm_compat.apply()
    target = resolve_target("auto").tvm_target()
    ins = dot_instruction(target)
    if ins is None:
        pytest.skip("this CPU has no 8-bit dot-product instruction")
    rng = np.random.default_rng(0)
    w = rng.integers(-20, 20, (32, 3, 3, 16)).astype(ins.b_dtype)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 8, 16), ins.a_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=[1, 1], data_layout="NHWC",
                                           kernel_layout="OHWI", out_dtype="int32"))
            out = bb.emit_output(relax.op.astype(y, "float32"))
        bb.emit_func_output(out)
    mod = fuse_for_build(bb.get())
    report = tune(mod, target, tmp_path / "db", tmp_path / "logs", TuneBudget(trials=4), FAST)
    int8_tasks = [t for t in report.tasks if t.rule == "int8_dot"]
    assert int8_tasks and all(t.best_us is not None and t.trials_new >= 2 for t in int8_tasks)
    built = build(mod, target, tmp_path / "db", post_tuning_passes(True))
    assert built.scheduled_tasks >= 1
    xs = rng.integers(0, 100, (1, 8, 8, 16)).astype(ins.a_dtype)
    (got,) = CompiledModel(built.executable, list(built.params.values()))([xs])
    padded = np.pad(xs.astype(np.int64), [(0, 0), (1, 1), (1, 1), (0, 0)])
    ref = np.zeros((1, 8, 8, 32), np.int64)
    for dy in range(3):
        for dx in range(3):
            ref += padded[:, dy:dy + 8, dx:dx + 8, :] @ w[:, dy, dx, :].T.astype(np.int64)
    np.testing.assert_array_equal(got, ref.astype(np.float32))
