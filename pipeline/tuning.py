"""Stage 3, tune: MetaSchedule over the model's tasks, with our own task loop.

Why not `ms.tune_tasks`: its task scheduler sends every task's first batch to the builder and runner
before it joins any result, so on a 28-task model nothing reaches the database for ~30 minutes and a
kill loses it all. Our loop measures one batch at a time and commits each record to the JSON database
the moment its measurement returns; it also skips tasks the database has already tuned (resume),
allots trials per task, keeps to a time budget and reports progress through a callback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.progress import ProgressCallback, ProgressEvent, no_progress

log = logging.getLogger(__name__)
FAILED_RUN_SECS = 1e10  # what MetaSchedule's AddToDatabase stores for a failed candidate


@dataclass(frozen=True)
class TuneBudget:
    trials: int | None = 256               # new + reused trials the model may have in total
                                           # (None: trials_per_task x number of tasks)
    trials_per_task: int | None = None     # cap per task; default: trials spread evenly
    time_budget_s: float | None = None     # stop starting batches when this runs out
    new_trials: int | None = None          # nightly: this many trials on top of what the database
                                           # has (overrides trials and trials_per_task)

    def total(self, n_tasks: int) -> int:
        if self.trials is not None:
            return self.trials
        return (self.trials_per_task or 0) * n_tasks


@dataclass(frozen=True)
class SearchSettings:
    """MetaSchedule knobs; presets in targets/ set them per target class."""

    trials_per_iter: int = 16
    population_size: int = 256
    init_min_unmeasured: int = 32
    runner_number: int = 3
    runner_min_repeat_ms: int = 50
    builder_timeout_s: float = 120.0
    runner_timeout_s: float = 60.0
    seed: int = 0
    patience: int = 32              # early stop after this many trials without a 1% gain (0: off)

    @classmethod
    def from_preset(cls, tuning: dict) -> SearchSettings:
        known = {k: v for k, v in tuning.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class TaskReport:
    name: str
    weight: int
    flops: float
    trials_before: int
    trials_new: int = 0
    best_us: float | None = None     # best measured latency of one call, any run
    exhausted: bool = False          # the search space had no unmeasured candidates left
    rule: str | None = None          # the schedules/ rule whose knobs are searched, if any
    converged: bool = False          # stopped early: no 1% gain in its last `patience` trials

    @property
    def trials(self) -> int:
        return self.trials_before + self.trials_new


@dataclass
class TuneReport:
    tasks: list[TaskReport]
    trials_new: int
    trials_reused: int
    wall_s: float
    stop_reason: str                 # "done", "budget", "time", "no-search"
    database_dir: str
    # (new trials, tuning seconds, estimated model latency ms) after each batch
    curve: list[tuple[int, float, float]] = field(default_factory=list)

    def estimated_ms(self) -> float | None:
        return _estimated_ms(self.tasks)


def _estimated_ms(tasks: list[TaskReport]) -> float | None:
    """Sum of weight x best latency over tasks; None until every task has a measurement."""
    if any(t.best_us is None for t in tasks):
        return None
    return sum(t.weight * t.best_us for t in tasks) / 1e3


def fast_build(mod, target, _params):
    """MetaSchedule's default_build without `import tvm.s_tir.tensor_intrin` (~60 s per worker)."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from schedules.gpu import build_config

    config = build_config(mod) if target.kind.name == "cuda" else {}
    with tvm.transform.PassContext(config=config):
        return tvm.tirx.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


class WarmBuilder:
    """MetaSchedule's LocalBuilder with its worker processes kept between batches.

    LocalBuilder starts a fresh process pool for every batch (~2-3 s of interpreter start-up and
    `import tvm`, more than building one candidate) to dodge a slow leak in long-lived workers; we
    keep the pool and recycle it every `recycle_every` batches instead, which bounds the leak too.
    """

    def __init__(self, max_workers: int, timeout_sec: float, recycle_every: int = 25) -> None:
        self.max_workers, self.timeout_sec, self.recycle_every = max_workers, timeout_sec, recycle_every
        self._pool, self._uses = None, 0

    def build(self, inputs: list) -> list:
        from tvm.s_tir.meta_schedule.builder import BuilderResult
        from tvm.s_tir.meta_schedule.builder.local_builder import _worker_func
        from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

        if self._pool is None or self._uses >= self.recycle_every:
            self.shutdown()
            self._pool = PopenPoolExecutor(max_workers=self.max_workers, timeout=self.timeout_sec)
        self._uses += 1
        results = []
        for res in self._pool.map_with_error_catching(
                lambda x: _worker_func(*x), [(fast_build, None, i.mod, i.target, None) for i in inputs]):
            if res.status == StatusKind.COMPLETE:
                results.append(BuilderResult(res.value, None))
            elif res.status == StatusKind.TIMEOUT:
                results.append(BuilderResult(None, f"build timed out after {self.timeout_sec} s"))
            else:
                results.append(BuilderResult(None, f"build failed:\n{res.value}"))
        return results

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool, self._uses = None, 0


def workload_key(mod) -> str:
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}"


def repair_database(directory: Path) -> None:
    """Drop a half-written last line (a kill mid-append) so the JSON database loads."""
    for path in directory.glob("database_*.json"):
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            log.warning("%s: dropping a truncated last record (%d bytes)", path, len(data) - cut)
            path.write_bytes(data[:cut])


def open_database(directory: Path, url: str | None = None):
    """The preset's working database, with the shipped records merged in on first use; with `url`
    (postgresql://...) the shared PostgreSQL store instead (pipeline/tuning_db.py)."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.logs import merge_shipped

    if url:
        from pipeline.tuning_db import open_postgres

        return open_postgres(url)
    directory.mkdir(parents=True, exist_ok=True)
    repair_database(directory)
    merge_shipped(directory)
    return ms.database.JSONDatabase(work_dir=str(directory), module_equality="structural")


def extract_tasks(mod, target) -> list:
    from tvm.s_tir import meta_schedule as ms

    return list(ms.relax_integration.extract_tasks(mod, target, module_equality="structural"))


def record_stats(db) -> dict[str, tuple[int, float | None]]:
    """workload key -> (number of records, best run seconds of the valid ones)."""
    stats: dict[str, tuple[int, float | None]] = {}
    for rec in db.get_all_tuning_records():
        key = workload_key(rec.workload.mod)
        secs = [float(s) for s in rec.run_secs] if rec.run_secs else []
        ok = secs and secs[0] < FAILED_RUN_SECS
        n, best = stats.get(key, (0, None))
        mean = sum(secs) / len(secs) if ok else None
        stats[key] = (n + 1, best if mean is None else (mean if best is None else min(best, mean)))
    return stats


class _ExhaustedTasks:
    """Workloads whose search space ran dry: a resumed run does not re-open them."""

    def __init__(self, directory: Path) -> None:
        from pipeline.logs import shipped_exhausted

        self.path = directory / "exhausted.json"
        local = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.keys: dict[str, str] = {**shipped_exhausted(directory), **local}

    def add(self, key: str, name: str) -> None:
        self.keys[key] = name
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.keys, indent=1, sort_keys=True))
        tmp.replace(self.path)


@contextmanager
def _metaschedule_logs(log_dir: Path):
    """Route MetaSchedule's own loggers to files in the run directory, never to stdout."""
    log_dir.mkdir(parents=True, exist_ok=True)
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    handler = logging.FileHandler(log_dir / "metaschedule.log")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s"))
    saved = (ms_logger.level, ms_logger.propagate)
    ms_logger.addHandler(handler)
    ms_logger.setLevel(logging.INFO)
    ms_logger.propagate = False
    try:
        yield
    finally:
        ms_logger.removeHandler(handler)
        handler.close()
        ms_logger.setLevel(saved[0])
        ms_logger.propagate = saved[1]


@contextmanager
def _native_stderr_to(path: Path):
    """TVM's C++ warnings (e.g. "Unknown schedule rule ...") write straight to fd 2; while design
    spaces are generated they go to the run's log file instead of the user's terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _task_logger(log_dir: Path, index: int, name: str) -> logging.Logger:
    logger = logging.getLogger(f"pipeline.tuning.task{index}")
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    handler = logging.FileHandler(log_dir / f"task_{index:03d}_{name}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


@dataclass
class _Task:
    report: TaskReport
    mod: object
    key: str
    cap: int
    ctx: object = None
    batch: int = 0                   # the batch size `ctx` was prepared for
    logger: logging.Logger | None = None
    default_space: object = None     # our rule's design space, until its default point is measured
    improved_at: int = 0             # trials count when best_us last improved by >= 1%

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.post_tuning()
            self.ctx = None

    @property
    def wants(self) -> int:
        if self.report.exhausted or self.report.converged:
            return 0
        return max(0, self.cap - self.report.trials)

    def note_best(self, before_us: float | None, patience: int) -> None:
        """Early stop: a task whose best latency has not improved by 1% in `patience` trials
        (of this run) gives its remaining trials up; the next run may reopen it."""
        best = self.report.best_us
        if before_us is None or (best is not None and best < 0.99 * before_us):
            self.improved_at = self.report.trials
        elif patience and self.report.trials - self.improved_at >= patience:
            self.report.converged = True

    def priority(self) -> tuple[bool, float]:
        """Tasks never measured first (heaviest first), then by their share of model latency."""
        r = self.report
        if r.best_us is None:
            return True, r.weight * r.flops
        return False, r.weight * r.best_us


def _batch_limit(task: _Task, open_tasks: list[_Task], remaining: int) -> int:
    """A task's first batch is at most its fair share of what is left, so that a small budget
    still gives every task a schedule before any task gets a second batch."""
    unmeasured = [t for t in open_tasks if t.report.trials == 0]
    if task.report.trials == 0:
        return max(1, remaining // len(unmeasured))
    return remaining


def _raise_caps(tasks: list[_Task], left: int) -> list[_Task]:
    """Nightly budgets: tasks that ran out of search space mid-run leave trials over; share them
    among the tasks that can still be searched, so a night spends what it was given."""
    searchable = [t for t in tasks if not (t.report.exhausted or t.report.converged)]
    if not searchable or left <= 0:
        return []
    share = math.ceil(left / len(searchable))
    for t in searchable:
        t.cap = max(t.cap, t.report.trials) + share
    return [t for t in tasks if t.wants > 0]


def _allot(budget: TuneBudget, n_tasks: int) -> int:
    if budget.trials_per_task is not None:
        return budget.trials_per_task
    return max(1, math.ceil(budget.total(n_tasks) / max(n_tasks, 1)))


def tune(mod, target, database_dir: Path, log_dir: Path, budget: TuneBudget,
         settings: SearchSettings = SearchSettings(), progress: ProgressCallback = no_progress,
         should_stop: Callable[[], bool] = lambda: False, runner=None,
         tuning_db: str | None = None) -> TuneReport:
    """Tune every task of `mod` (a fused, legalized Relax module) into the database at `database_dir`
    (or the PostgreSQL store `tuning_db`), measuring with `runner` (default: a LocalRunner; see
    pipeline/rpc.py for a tracker's servers).

    Every finished measurement is in the database when this returns or raises (KeyboardInterrupt
    included); a second call with the same budget measures nothing new. A JSON database is locked
    for the whole call: a second process on the same folder waits, then resumes from its records.
    """
    from pipeline.tuning_db import database_lock

    if tuning_db:   # PostgreSQL serialises writers itself; hosts share it while they tune
        return _tune(mod, target, database_dir, log_dir, budget, settings, progress, should_stop,
                     runner, tuning_db)
    with database_lock(database_dir, on_wait=lambda: progress(ProgressEvent(
            "tune", f"waiting for {database_dir}: another process is tuning into it"))):
        return _tune(mod, target, database_dir, log_dir, budget, settings, progress, should_stop,
                     runner, None)


def _tune(mod, target, database_dir: Path, log_dir: Path, budget: TuneBudget, settings: SearchSettings,
          progress: ProgressCallback, should_stop: Callable[[], bool], runner,
          tuning_db: str | None) -> TuneReport:
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    from pipeline.logs import local_trials, workload_trials
    from pipeline.tuning_db import dropped_trials

    start = time.perf_counter()
    extracted = extract_tasks(mod, target)
    db = open_database(database_dir, tuning_db)
    stats = record_stats(db)
    # records + those compaction removed, then the shipped search each workload resumed from on top
    local = local_trials({k: n for k, (n, _) in stats.items()}, dropped_trials(db, database_dir))
    counted = workload_trials(database_dir, local, merged=tuning_db is None)
    exhausted = _ExhaustedTasks(database_dir)
    cap = _allot(budget, len(extracted))
    tasks: list[_Task] = []
    for t in extracted:
        mod_t = t.dispatched[0]
        key = workload_key(mod_t)
        _, best = stats.get(key, (0, None))
        n = counted.get(key, 0)
        report = TaskReport(name=t.task_name, weight=int(t.weight),
                            flops=float(estimate_tir_flops(mod_t)), trials_before=n,
                            best_us=None if best is None else best * 1e6,
                            exhausted=key in exhausted.keys)
        tasks.append(_Task(report, mod_t, key, cap, improved_at=n))
    nightly = budget.new_trials is not None
    if nightly:
        # a nightly budget: fill the tasks that can still be searched up evenly towards (what they
        # have + new_trials); exhausted tasks would otherwise hold a share nobody spends
        searchable = [t for t in tasks if not t.report.exhausted] or tasks
        cap = _allot(TuneBudget(trials=sum(t.report.trials_before for t in searchable) + budget.new_trials),
                     len(searchable))
        for t in tasks:
            t.cap = cap
        budget = TuneBudget(trials=budget.new_trials + sum(min(t.report.trials_before, cap) for t in tasks),
                            time_budget_s=budget.time_budget_s)
    reused = sum(min(t.report.trials_before, cap) for t in tasks)
    total = budget.total(len(tasks))
    allowed = max(0, total - reused) if total > 0 else 0
    allowed = min(allowed, sum(t.wants for t in tasks))
    log.info("%d tasks, %d trials per task, %d reused records, %d new trials allowed",
             len(tasks), cap, reused, allowed)
    report = TuneReport([t.report for t in tasks], 0, reused, 0.0, "no-search", str(database_dir))
    if allowed == 0:
        report.stop_reason = "done" if total > 0 else "no-search"
        report.wall_s = time.perf_counter() - start
        return report

    cost_model = _load_cost_model(database_dir, _cores(target))
    builder = WarmBuilder(max_workers=_cores(target), timeout_sec=settings.builder_timeout_s)
    runner = runner or ms.runner.LocalRunner(
        timeout_sec=settings.runner_timeout_s,
        evaluator_config=ms.runner.EvaluatorConfig(number=settings.runner_number, repeat=1,
                                                   min_repeat_ms=settings.runner_min_repeat_ms,
                                                   enable_cpu_cache_flush=False))
    done, batch_s = 0, []
    with _metaschedule_logs(log_dir):
        try:
            while done < allowed:
                if should_stop():
                    report.stop_reason = "interrupted"
                    break
                elapsed = time.perf_counter() - start
                if budget.time_budget_s is not None and batch_s and \
                        elapsed + sum(batch_s) / len(batch_s) > budget.time_budget_s:
                    report.stop_reason = "time"
                    break
                open_tasks = [t for t in tasks if t.wants > 0]
                if not open_tasks and nightly:
                    open_tasks = _raise_caps(tasks, allowed - done)
                if not open_tasks:
                    break
                task = max(open_tasks, key=_Task.priority)
                index = tasks.index(task)
                t0 = time.perf_counter()
                best_before = task.report.best_us
                n = _tune_batch(task, index, target, db, cost_model, builder, runner, settings,
                                log_dir, limit=_batch_limit(task, open_tasks, allowed - done),
                                should_stop=should_stop)
                if n == 0 and should_stop():
                    report.stop_reason = "interrupted"
                    break
                if n == 0:
                    task.report.exhausted = True
                    exhausted.add(task.key, task.report.name)
                    log.info("task %s: search space exhausted at %d trials", task.report.name,
                             task.report.trials)
                    continue
                batch_s.append(time.perf_counter() - t0)
                done += n
                task.note_best(best_before, settings.patience)
                if task.report.converged:
                    log.info("task %s: converged (best %.1f us, no 1%% gain in %d trials)",
                             task.report.name, task.report.best_us or 0, settings.patience)
                report.trials_new = done
                est = _estimated_ms(report.tasks)
                elapsed = time.perf_counter() - start
                if est is not None:
                    report.curve.append((done, round(elapsed, 2), est))
                per_trial = elapsed / done
                progress(ProgressEvent("tune", f"{task.report.name}: {n} trials", index, len(tasks),
                                       done, allowed, est, elapsed, per_trial * (allowed - done)))
            else:
                report.stop_reason = "budget"
        finally:
            if done:
                _save_cost_model(cost_model, database_dir)
            builder.shutdown()
            for t in tasks:
                t.close()
                for h in list(t.logger.handlers) if t.logger else []:
                    t.logger.removeHandler(h)
                    h.close()
    report.trials_new = done
    report.wall_s = time.perf_counter() - start
    if report.stop_reason == "no-search":
        report.stop_reason = "done"
    log.info("tuning stopped (%s): %d new trials in %.1fs", report.stop_reason, done, report.wall_s)
    return report


COST_MODEL_FILE = "cost_model.tar"


def _load_cost_model(database_dir: Path, cores: int):
    """The preset's XGBoost model with every feature vector it has seen, so a new run (of any model
    on this preset) starts from a trained model instead of 100 random samples."""
    from tvm.s_tir import meta_schedule as ms

    model = ms.cost_model.CostModel.create("xgb", num_tuning_cores=cores)
    path = database_dir / COST_MODEL_FILE
    if path.exists():
        try:
            model.load(str(path))
            log.info("cost model warm-started from %s", path)
        except Exception as exc:  # a corrupt or incompatible file costs a cold start, nothing more
            log.warning("ignoring cost model %s: %s", path, exc)
    return model


def _save_cost_model(model, database_dir: Path) -> None:
    tmp = database_dir / f"{COST_MODEL_FILE}.{os.getpid()}.tmp"   # hosts sharing a folder never collide
    try:
        # a PostgreSQL store has no JSON files here, so nothing else made the preset's folder
        database_dir.mkdir(parents=True, exist_ok=True)
        model.save(str(tmp))
        tmp.replace(database_dir / COST_MODEL_FILE)
    except Exception as exc:
        log.warning("could not save the cost model: %s", exc)


def _cores(target) -> int:
    return int(target.attrs.get("num-cores", 1)) if target.kind.name == "llvm" else 1


def _device_type(target) -> str:
    return "cpu" if target.kind.name == "llvm" else target.kind.name


def _context(task: _Task, index: int, target, db, cost_model, settings: SearchSettings, log_dir: Path,
             batch: int):
    """A TuneContext whose evolutionary search is sized to the batch: sampling and evolving a
    population of 256 costs ~6 s, wasted when the batch measures one or two candidates."""
    from tvm.s_tir import meta_schedule as ms

    task.logger = task.logger or _task_logger(log_dir, index, task.report.name)
    population = min(settings.population_size, max(32, 16 * batch))
    strategy = ms.search_strategy.EvolutionarySearch(
        population_size=population, init_min_unmeasured=min(settings.init_min_unmeasured, population // 2))
    from schedules.gpu import tuning_space
    from schedules.space import rule_space

    found = rule_space(task.mod, target)
    space = found[1] if found else tuning_space(target)
    if found and task.report.rule is None:
        task.report.rule = found[0]
        task.logger.info("design space: schedules/ rule %s", found[0])
    with _native_stderr_to(log_dir / "native.log"):
        ctx = ms.TuneContext(mod=task.mod, target=target, space_generator=space,
                             search_strategy=strategy, task_name=task.report.name,
                             num_threads=_cores(target), rand_state=settings.seed + index,
                             logger=task.logger)
        spaces = ctx.generate_design_space()
    if found and task.report.trials == 0 and task.default_space is None:
        task.default_space = spaces[0]
    ctx.pre_tuning(max_trials=task.wants, num_trials_per_iter=batch,
                   design_spaces=spaces, database=db, cost_model=cost_model)
    return ctx


def _tune_batch(task: _Task, index: int, target, db, cost_model, builder, runner,
                settings: SearchSettings, log_dir: Path, limit: int,
                should_stop: Callable[[], bool] = lambda: False) -> int:
    """Build and measure one batch of `task`; each record is committed as its measurement returns.

    A stop request ends the batch after the current measurement; the records so far are kept."""
    from tvm.s_tir import meta_schedule as ms

    t0 = time.perf_counter()
    batch = min(settings.trials_per_iter, limit, task.wants)
    if task.ctx is None or task.batch != batch:
        task.close()
        task.ctx, task.batch = _context(task, index, target, db, cost_model, settings, log_dir, batch), batch
    candidates = list(task.ctx.generate_measure_candidates() or [])
    if task.default_space is not None:
        from schedules.space import default_candidate

        first = default_candidate(task.ctx, task.default_space)
        task.default_space = None
        candidates = ([first] if first is not None else []) + candidates
    if not candidates:
        return 0
    candidates = candidates[:batch]
    t1 = time.perf_counter()
    built = builder.build([ms.builder.BuilderInput(c.sch.mod, target) for c in candidates])
    t2 = time.perf_counter()
    runnable = [i for i, b in enumerate(built) if b.error_msg is None]
    futures = dict(zip(runnable, runner.run([
        ms.runner.RunnerInput(built[i].artifact_path, _device_type(target), candidates[i].args_info)
        for i in runnable])))
    workload = db.commit_workload(task.mod)
    results = []
    try:
        for i, cand in enumerate(candidates):
            if should_stop():
                break
            if i in futures:
                result = futures[i].result()
            else:
                result = ms.runner.RunnerResult(run_secs=None, error_msg=built[i].error_msg)
            results.append(result)
            secs = [float(s) for s in result.run_secs] if result.run_secs else [FAILED_RUN_SECS]
            db.commit_tuning_record(ms.database.TuningRecord(
                cand.sch.trace, workload, secs, target, cand.args_info))
            task.report.trials_new += 1
            if result.error_msg is None and secs[0] < FAILED_RUN_SECS:
                us = sum(secs) / len(secs) * 1e6
                task.report.best_us = us if task.report.best_us is None else min(task.report.best_us, us)
            else:
                task.logger.info("candidate %d failed: %s", i, result.error_msg)
    finally:
        for b in built:
            if b.artifact_path:
                shutil.rmtree(Path(b.artifact_path).parent, ignore_errors=True)
    t3 = time.perf_counter()
    measured = candidates[:len(results)]
    if measured:
        task.ctx.notify_runner_results(measured, results)
        cost_model.update(task.ctx, measured, results)
    log.info("task %s: %d candidates (%d built): search %.1fs, build %.1fs, run %.1fs, model %.1fs",
             task.report.name, len(candidates), len(runnable), t1 - t0, t2 - t1, t3 - t2,
             time.perf_counter() - t3)
    return len(measured)
