"""`tune nightly`: a list of tuning jobs, each resumed from the tuning logs and judged against the
registry's `champion`.

Every job runs in its own child process (`python -m pipeline.nightly job SPEC RESULT`), so a crash,
even a segfault inside TVM, is recorded and the other jobs still run. A job:

1. runs the whole `tune run` pipeline with a *nightly* budget: `trials` (or `time_budget`) new trials
   on top of what the database holds, so every night continues the search of the last;
2. re-measures the current champion and the new artifact interleaved in one process;
3. moves `champion` to the new version only when it verified and is faster by `min_gain` with a
   one-sided Mann-Whitney p < 0.05 (faster beyond noise); slower by `regression` the same way is a
   regression and the night exits non-zero;
4. compacts the database to the `keep` best records per workload (the counts stay, for resume).

The parent writes `summary.json` and `summary.md` under `<out>/<utc>/`, with each job's tuning curve
continued across the nights found in `<out>`, and an MLflow parent run with one nested run per job.

SIGTERM or SIGINT to the night (systemd stopping the unit, Ctrl-C) is passed on to the running job,
which stops after its current measurement and keeps its records, as `tune run` does; the night then
runs no further job, writes its summary with that job `interrupted` and exits 130.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from pipeline.errors import UserError
from pipeline.progress import ProgressCallback, ProgressEvent, no_progress

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

log = logging.getLogger(__name__)
VARIANTS = ("fp32", "int8", "sparse")
UNLIMITED = 10**6        # a time-only nightly budget: trials never run out before the clock does
INTERRUPTED = 130        # exit code of a night or job stopped by SIGTERM/SIGINT (as `tune run`)


@dataclass
class Settings:
    experiment: str = "nightly"
    keep: int = 32                  # records per workload after compaction (0: no compaction)
    min_gain: float = 0.02          # promotion: at least this much faster ...
    regression: float = 0.05        # ... regression: at least this much slower ...
    p_value: float = 0.05           # ... and the Mann-Whitney test agrees at this level
    repeats: int = 50               # timed calls per build when champion and new are compared
    measure_seconds: float = 5.0
    tuning_db: str | None = None
    rpc: str | None = None
    rpc_key: str | None = None


@dataclass
class Job:
    model: str
    target: str = "auto"
    variant: str = "fp32"
    trials: int | None = None             # new trials per night
    time_budget: str | None = None        # tuning time per night
    name: str = ""
    model_options: dict = field(default_factory=dict)
    input_shapes: dict = field(default_factory=dict)
    roofline: bool = False
    skip_untuned: bool = False
    repeats: int = 50                     # the pipeline's own measure stage
    measure_seconds: float = 5.0
    tolerance: float = 1e-3


def load_config(path: Path) -> tuple[Settings, list[Job]]:
    """Parse nightly.toml: `[nightly]` settings, `[defaults]` for every job, one `[[job]]` each."""
    if not path.is_file():
        raise UserError(f"nightly config not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: {exc}") from None
    unknown = set(data) - {"nightly", "defaults", "job"}
    if unknown:
        raise UserError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}")
    settings = Settings(**_known(Settings, data.get("nightly", {}), f"{path} [nightly]"))
    jobs = []
    for i, table in enumerate(data.get("job", [])):
        merged = {**data.get("defaults", {}), **table}
        job = Job(**_known(Job, merged, f"{path} job {i + 1}"))
        if job.variant not in VARIANTS:
            raise UserError(f"{path} job {i + 1}: variant {job.variant!r}: use one of {', '.join(VARIANTS)}")
        if job.trials is None and job.time_budget is None:
            raise UserError(f"{path} job {i + 1} ({job.model}): give a budget, trials or time_budget")
        if job.trials is not None and job.trials < 0:
            raise UserError(f"{path} job {i + 1}: trials must be >= 0")
        if job.time_budget is not None:
            from pipeline.config import parse_duration

            parse_duration(job.time_budget)
        stem = Path(job.model).stem if job.model.endswith(".onnx") else job.model
        job.name = job.name or (stem if job.variant == "fp32" else f"{stem}-{job.variant}")
        jobs.append(job)
    if not jobs:
        raise UserError(f"{path}: no [[job]] tables")
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: job names repeat ({', '.join(names)}); give each a `name`")
    return settings, jobs


def _known(cls, table: dict, where: str) -> dict:
    allowed = {f.name for f in fields(cls)}
    extra = set(table) - allowed
    if extra:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(extra))} "
                        f"(known: {', '.join(sorted(allowed))})")
    return dict(table)


# -- one job (in the child process) --------------------------------------------------------------

def run_job(spec: dict, should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Tune, build, verify, compare with the champion, promote or not, compact. Raises on failure;
    KeyboardInterrupt once `should_stop` says so (tuning stops after the current measurement)."""
    from pipeline.config import RunConfig, parse_duration
    from pipeline.measure import MeasureSettings
    from pipeline.run import run_pipeline
    from pipeline.tuning import TuneBudget

    job, settings = Job(**spec["job"]), Settings(**spec["settings"])
    budget = TuneBudget(trials=None, new_trials=job.trials if job.trials is not None else UNLIMITED,
                        time_budget_s=parse_duration(job.time_budget) if job.time_budget else None)
    config = RunConfig(
        model=job.model, model_options=job.model_options,
        input_shapes={k: list(v) for k, v in job.input_shapes.items()}, target=job.target,
        budget=budget, tuning_logs=Path(spec["tuning_logs"]), out=Path(spec["artifacts"]),
        runs_dir=Path(spec["runs_dir"]), tracking_uri=spec["tracking_uri"],
        skip_untuned=job.skip_untuned, tolerance=job.tolerance,
        measure=MeasureSettings(repeats=job.repeats, max_seconds=job.measure_seconds),
        roofline=job.roofline, register=True,
        quantize="int8" if job.variant == "int8" else "none",
        sparse="auto" if job.variant == "sparse" else "off",
        tuning_db=settings.tuning_db, rpc=settings.rpc, rpc_key=settings.rpc_key)
    result = run_pipeline(config, should_stop=should_stop)
    if should_stop():   # asked while the last stages ran: no champion comparison, no compaction
        raise KeyboardInterrupt
    before = sum(t["trials_before"] for t in result.task_table)
    out = {"preset": result.preset, "mlflow_run_id": result.mlflow_run_id, "artifact": result.artifact,
           "verified": result.verified, "registered": result.registered,
           "trials_new": result.trials_new, "trials_reused": result.trials_reused,
           "trials_before": before, "trials_total": before + result.trials_new,
           "stop_reason": result.tune_stop_reason, "stage_seconds": result.stage_seconds,
           # the curve of this night, in cumulative trials: it starts where the last night ended
           "curve": [[before + p["trials"], p["estimated_ms"]] for p in result.tune_curve],
           "estimated_ms": _estimated_ms(result.task_table),
           "pipeline_latency_ms": result.latency_ms.get(result.exported)}
    out.update(_judge(result, settings, spec["tracking_uri"]))
    out["compaction"] = _compact(Path(spec["tuning_logs"]) / result.preset, settings)
    return out


def _estimated_ms(task_table: list[dict]) -> float | None:
    """Sum of weight x best kernel latency over the tasks (None until every task has one)."""
    if not task_table or any(t.get("best_us") is None for t in task_table):
        return None
    return round(sum(t["weight"] * t["best_us"] for t in task_table) / 1e3, 4)


def _judge(result, settings: Settings, tracking_uri: str) -> dict:
    """The champion and the new artifact, interleaved in this process; promote only beyond noise."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.export import load_artifact
    from pipeline.importer import TensorSpec
    from pipeline.measure import MeasureSettings, measure_interleaved
    from pipeline.registry import CHAMPION
    from pipeline.verify import seeded_inputs

    name, version = result.registered.split("/")
    client = MlflowClient(tracking_uri=tracking_uri)
    new = load_artifact(Path(result.artifact))
    out = {"registered_model": name, "version": version, "champion_version": None,
           "promoted": False, "regression": False, "decision": ""}
    champion = None
    try:
        held = client.get_model_version_by_alias(name, CHAMPION)
        out["champion_version"] = str(held.version)
        champion = load_artifact(Path(held.tags["artifact"]))
    except MlflowException:
        out["decision"] = "no champion yet"
    except (UserError, KeyError, OSError) as exc:   # its files are gone: judge the new one alone
        out["decision"] = f"champion version {out['champion_version']} unavailable ({exc})"
    specs = [TensorSpec(s["name"], tuple(s["shape"]), s["dtype"]) for s in new.manifest["inputs"]]
    feeds = seeded_inputs(specs, 0)
    arrays = [feeds[s.name] for s in specs]
    runners = {"new": new.model.timed_call(arrays)}
    if champion is not None:
        runners["champion"] = champion.model.timed_call(arrays)
    stats = measure_interleaved(runners, MeasureSettings(repeats=settings.repeats,
                                                         max_seconds=settings.measure_seconds))
    out["latency_ms"] = {k: round(v.median, 4) for k, v in stats.items()}
    if not result.verified:
        out["decision"] = "not verified: not promoted"
        return out
    if champion is None:
        out["promoted"] = True
        out["decision"] = out["decision"] + ": promoted"
    else:
        out.update(decide(stats["new"].samples_ms, stats["champion"].samples_ms, settings,
                          f"version {out['champion_version']}"))
    if out["promoted"]:
        client.set_registered_model_alias(name, CHAMPION, version)
        client.set_model_version_tag(name, version, "promoted_by", "nightly")
    return out


def decide(new_ms: list[float], champion_ms: list[float], settings: Settings, champion: str = "the champion"
           ) -> dict:
    """Promote when the new build is `min_gain` faster by the medians *and* a one-sided Mann-Whitney
    test says faster at `p_value`; a regression is the mirror image with `regression`."""
    import numpy as np
    from scipy.stats import mannwhitneyu

    gain = 1 - float(np.median(new_ms)) / float(np.median(champion_ms))
    p_faster = float(mannwhitneyu(new_ms, champion_ms, alternative="less").pvalue)
    p_slower = float(mannwhitneyu(new_ms, champion_ms, alternative="greater").pvalue)
    out = {"gain": round(gain, 4), "p_faster": p_faster, "p_slower": p_slower, "promoted": False,
           "regression": False}
    if gain >= settings.min_gain and p_faster < settings.p_value:
        out["promoted"] = True
        out["decision"] = f"{gain:.1%} faster than {champion} (p={p_faster:.2g}): promoted"
    elif -gain >= settings.regression and p_slower < settings.p_value:
        out["regression"] = True
        out["decision"] = f"REGRESSION: {-gain:.1%} slower than {champion} (p={p_slower:.2g}); champion kept"
    else:
        out["decision"] = (f"{gain:+.1%} against {champion} is within noise (needs {settings.min_gain:.0%} "
                           f"and p<{settings.p_value:g}); champion kept")
    return out


def _compact(db_dir: Path, settings: Settings) -> dict | None:
    from pipeline.tuning_db import compact_json, open_postgres

    if settings.keep <= 0:
        return None
    if settings.tuning_db:
        db = open_postgres(settings.tuning_db)
        try:
            return asdict(db.compact(settings.keep))
        finally:
            db.close()
    if not (db_dir / "database_tuning_record.json").is_file():
        return None
    return asdict(compact_json(db_dir, settings.keep))


# -- the night (parent process) -----------------------------------------------------------------

@dataclass
class NightReport:
    stamp: str
    folder: str
    jobs: list[dict]
    mlflow_run_id: str
    exit_code: int


def run_nightly(config_path: Path, tuning_logs: Path = Path("tuning_logs"), out: Path = Path("nightly"),
                tracking_uri: str | None = None, artifacts: Path = Path("artifacts"),
                runs_dir: Path = Path("runs"), overrides: dict | None = None,
                progress: ProgressCallback = no_progress) -> NightReport:
    """Every job of `config_path` in turn (each in its own process); returns the night's report."""
    from pipeline.tracking import RunRecorder
    from pipeline.tracking import tracking_uri as resolve_uri

    settings, jobs = load_config(config_path)
    for key, value in (overrides or {}).items():
        if value is not None:
            setattr(settings, key, value)
    if settings.rpc and not settings.rpc_key:
        raise UserError("rpc needs rpc_key (in [nightly] or --rpc-key)")
    uri = resolve_uri(tracking_uri)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = out / stamp
    folder.mkdir(parents=True, exist_ok=True)
    parent = RunRecorder(uri, settings.experiment, run_name=f"nightly-{stamp}",
                         tags={"nightly": "true", "config": str(config_path)})
    parent.params({"jobs": ", ".join(j.name for j in jobs), **{k: v for k, v in asdict(settings).items()
                                                                if k != "tuning_db"}})
    results = []
    # held until the summary is written: a signal now stops the job and the night, never the summary
    with _forwarding_signals() as signals:
        for i, job in enumerate(jobs):
            if signals.received is not None:
                results.append(_skipped(job))
                continue
            progress(ProgressEvent("nightly", f"job {i + 1}/{len(jobs)}: {job.name}", i, len(jobs)))
            spec = {"job": asdict(job), "settings": asdict(settings), "tuning_logs": str(tuning_logs),
                    "artifacts": str(artifacts), "runs_dir": str(runs_dir), "tracking_uri": uri,
                    "parent_pid": os.getpid()}
            res = _run_child(spec, folder / f"job-{i + 1:02d}-{job.name}", signals)
            res.update(job=job.name, model=job.model, variant=job.variant, target=job.target)
            _record_job(uri, settings.experiment, parent.run_id, res)
            results.append(res)
            progress(ProgressEvent("nightly", f"{job.name}: {res['status']}: "
                                              f"{res.get('decision') or res.get('error', '')}"))
        report = _finish_night(parent, stamp, folder, out, results, signals.received)
    return report


def _skipped(job: Job) -> dict:
    return {"status": "skipped", "error": "not run: the night was interrupted", "job": job.name,
            "model": job.model, "variant": job.variant, "target": job.target}


def _finish_night(parent, stamp: str, folder: Path, out: Path, results: list[dict],
                  interrupted: int | None) -> NightReport:
    """summary.json, summary.md and the parent run's metrics and status."""
    _attach_history(out, stamp, results)
    failed = [r for r in results if r["status"] != "ok" or r.get("regression")]
    code = INTERRUPTED if interrupted is not None else 1 if failed else 0
    report = NightReport(stamp, str(folder), results, parent.run_id, code)
    (folder / "summary.json").write_text(json.dumps(asdict(report), indent=2, default=str))
    (folder / "summary.md").write_text(render_markdown(report))
    parent.metrics({"jobs": len(results), "jobs_failed": sum(r["status"] != "ok" for r in results),
                    "regressions": sum(bool(r.get("regression")) for r in results),
                    "promoted": sum(bool(r.get("promoted")) for r in results)})
    parent.artifact(folder, "nightly")
    if interrupted is not None:
        skipped = sum(r["status"] == "skipped" for r in results)
        parent.finish("KILLED", f"interrupted by {signal.Signals(interrupted).name}; "
                                f"{skipped} job(s) not run")
    else:
        parent.finish("FINISHED" if code == 0 else "FAILED",
                      None if code == 0 else f"{len(failed)} job(s) failed or regressed")
    return report


class _SignalForwarder:
    """SIGTERM and SIGINT to the night go on to the running job's process, which stops after its
    current measurement (a second signal: at once), and the night starts no further job."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None      # the first signal
        self._child: subprocess.Popen | None = None

    def on_signal(self, signum: int, _frame) -> None:
        if self.received is None:
            self.received = signum
            log.warning("%s: stopping the running job and the night", signal.Signals(signum).name)
        if self._child is not None:
            self._child.send_signal(signum)   # a no-op once it has exited

    def attach(self, proc: subprocess.Popen | None) -> None:
        """Signals blocked meanwhile: one that came before the job started is sent here, once; one
        that comes meanwhile is handled right after, with the job in place."""
        saved = signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        try:
            self._child = proc
            if proc is not None and self.received is not None:
                proc.send_signal(self.received)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, saved)


@contextmanager
def _forwarding_signals() -> Iterator[_SignalForwarder]:
    """A `_SignalForwarder` installed for SIGTERM and SIGINT; the handlers before it are put back."""
    forwarder, saved = _SignalForwarder(), {}
    try:
        for sig in forwarder.SIGNALS:
            saved[sig] = signal.signal(sig, forwarder.on_signal)
    except ValueError:   # not the main thread: signals stay with whoever handles them there
        pass
    try:
        yield forwarder
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _run_child(spec: dict, stem: Path, signals: _SignalForwarder) -> dict:
    spec_path, result_path, log_path = (stem.with_suffix(s) for s in (".spec.json", ".result.json", ".log"))
    spec_path.write_text(json.dumps(spec, indent=1))
    t0 = time.perf_counter()
    with open(log_path, "wb") as sink:
        # its own session: a terminal's Ctrl-C reaches the night only, which passes it on once
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.nightly", "job", str(spec_path),
                                 str(result_path)], stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                start_new_session=True)
        signals.attach(proc)
        try:
            proc.wait()
        finally:
            signals.attach(None)
    wall = round(time.perf_counter() - t0, 1)
    if result_path.is_file():
        res = json.loads(result_path.read_text())
    else:   # died without a word: a signal (segfault, OOM killer) or an interpreter failure
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        res = {"status": "crashed", "error": f"job process {how}; log tail: {' | '.join(tail)}"}
    if signals.received is not None and res["status"] != "ok":
        # stopped by the signal we passed on, even where it came before the job could handle it
        res["status"] = "interrupted"
    res.update(wall_s=wall, log=str(log_path), exit=proc.returncode)
    return res


def _record_job(uri: str, experiment: str, parent_id: str, res: dict) -> None:
    from pipeline.tracking import RunRecorder

    rec = RunRecorder(uri, experiment, run_name=res["job"],
                      tags={"mlflow.parentRunId": parent_id, "model": res["model"],
                            "variant": res["variant"], "status": res["status"],
                            "pipeline_run_id": res.get("mlflow_run_id") or "",
                            "decision": res.get("decision") or res.get("error", "")})
    rec.metrics({k: res.get(k) for k in ("trials_new", "trials_total", "estimated_ms", "gain")
                 if isinstance(res.get(k), (int, float))})
    rec.metrics({f"latency_{k}_median": v for k, v in (res.get("latency_ms") or {}).items()})
    rec.metrics({"promoted": int(bool(res.get("promoted"))), "regression": int(bool(res.get("regression")))})
    # step = cumulative trials, so the curves of successive nights line up end to start in MLflow
    rec.series("tune_best_latency_ms", [(n, ms) for n, ms in res.get("curve", [])])
    status = {"ok": "FINISHED", "interrupted": "KILLED"}.get(res["status"], "FAILED")
    rec.finish(status, res.get("error"))


def _attach_history(out: Path, stamp: str, results: list[dict]) -> None:
    """Each job's nights so far (from earlier summaries in `out`), this one last."""
    earlier = []
    for path in sorted(out.glob("*/summary.json")):
        if path.parent.name < stamp:
            try:
                earlier.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
    for res in results:
        runs = [(night["stamp"], old) for night in earlier for old in night.get("jobs", [])
                if old.get("job") == res["job"] and old.get("status") == "ok"]
        runs += [(stamp, res)] if res["status"] == "ok" else []
        nights, running = [], None
        for when, job in runs:
            nights.append(_night_row(when, job, running))
            running = nights[-1]["trials_total"]
        res["history"] = nights


def _night_row(stamp: str, res: dict, start: int | None) -> dict:
    """One night; its trials continue from the night before (`start`), so the curve is one line even
    where the database's own count did not follow (a PostgreSQL store on a shipped preset counts the
    larger of its records and the shipped search; another host's nights in between)."""
    before = res.get("trials_before") or 0
    start = before if start is None else start
    return {"night": stamp, "trials_total": start + (res.get("trials_new") or 0),
            "trials_new": res.get("trials_new"), "estimated_ms": res.get("estimated_ms"),
            "new_ms": (res.get("latency_ms") or {}).get("new"),
            "champion_ms": (res.get("latency_ms") or {}).get("champion"), "promoted": res.get("promoted"),
            "curve": [[start + n - before, ms] for n, ms in res.get("curve", [])]}


def render_markdown(report: NightReport) -> str:
    lines = [f"# Nightly tuning {report.stamp}", "",
             f"MLflow parent run `{report.mlflow_run_id}`; exit code {report.exit_code}.", "",
             "| job | status | trials new / total | new ms | champion ms | decision |",
             "|---|---|---|---|---|---|"]
    for r in report.jobs:
        lat = r.get("latency_ms") or {}
        lines.append(f"| {r['job']} | {r['status']} | {_f(r.get('trials_new'))} / {_f(r.get('trials_total'))} "
                     f"| {_f(lat.get('new'), '{:.3f}')} | {_f(lat.get('champion'), '{:.3f}')} "
                     f"| {(r.get('decision') or r.get('error', '')).replace('|', '/')[:300]} |")
    for r in report.jobs:
        if not r.get("history"):
            continue
        lines += ["", f"## {r['job']}: the search across nights", "",
                  ("| night | trials (cumulative) | estimated ms (sum of best kernels) | new build ms | "
                   "champion ms | promoted |"), "|---|---|---|---|---|---|"]
        for h in r["history"]:
            lines.append(f"| {h['night']} | {_f(h['trials_total'])} | {_f(h['estimated_ms'], '{:.3f}')} | "
                         f"{_f(h['new_ms'], '{:.3f}')} | {_f(h['champion_ms'], '{:.3f}')} | "
                         f"{'yes' if h['promoted'] else 'no'} |")
        points = [p for h in r["history"] for p in h["curve"]]
        if points:
            step = max(1, len(points) // 12)
            shown = points[::step] + ([points[-1]] if (len(points) - 1) % step else [])
            lines += ["", "Tuning curve (cumulative trials -> estimated ms): "
                      + ", ".join(f"{n} -> {ms:.3f}" for n, ms in shown)]
    return "\n".join(lines) + "\n"


def _f(value, pattern: str = "{}") -> str:
    return "-" if value is None else pattern.format(value)


class _StopRequest:
    """The job's SIGTERM/SIGINT (passed on by the night): tuning stops after the current measurement,
    whose record is committed, and the pipeline's run is marked KILLED. A second one stops at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, _frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s: stopping after the current measurement (again to force)", signal.Signals(signum).name)


def _stop_with_parent(parent_pid: int | None) -> None:
    """Should the night die without passing a signal on (kill -9), Linux sends this job SIGTERM
    (PR_SET_PDEATHSIG), so it stops after its measurement instead of tuning on alone."""
    if not parent_pid or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)   # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:   # it died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def _child_main(spec_path: str, result_path: str) -> int:
    """The job process: the result (or the failure) goes to `result_path` as JSON."""
    from pipeline import tvm_compat

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s [%(levelname)s] %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    stop = _StopRequest()
    stop.install()
    _stop_with_parent(spec.get("parent_pid"))
    try:
        tvm_compat.apply()
        res = {"status": "ok", **run_job(spec, stop)}
        code = 0
    except KeyboardInterrupt:
        log.warning("job interrupted: its finished tuning records are kept")
        res = {"status": "interrupted", "error": "interrupted (SIGTERM or SIGINT); finished tuning records "
                                                 "are kept and the next night resumes from them"}
        code = INTERRUPTED
    except Exception as exc:  # noqa: BLE001  (recorded for the summary; the night goes on)
        log.error("job failed:\n%s", traceback.format_exc())
        res = {"status": "failed", "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
        code = 1
    tmp = Path(result_path + ".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    tmp.replace(result_path)
    return code


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "job":
        sys.exit("usage: python -m pipeline.nightly job SPEC.json RESULT.json")
    sys.exit(_child_main(sys.argv[2], sys.argv[3]))
