"""Runs side by side: latency, speedups against the baselines, what the tuning cost, and how close
the kernels came to the roofline. Reads the MLflow store only; the CLI and the notebook both use it."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import UserError


@dataclass
class RunRow:
    run_id: str
    run_name: str
    status: str
    model: str
    preset: str
    started: str
    latency_ms: float | None            # tuned module, median
    speedups: dict[str, float] = field(default_factory=dict)   # baseline -> baseline / tuned
    trials_new: int | None = None
    trials_reused: int | None = None
    tune_wall_s: float | None = None
    roofline_fraction: float | None = None
    verified: bool = False
    model_version: str | None = None

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _row(run) -> RunRow:
    from datetime import datetime, timezone

    m, tags = run.data.metrics, run.data.tags
    as_int = (lambda v: None if v is None else int(v))
    return RunRow(
        run_id=run.info.run_id, run_name=run.info.run_name or "", status=run.info.status,
        model=tags.get("model", ""), preset=tags.get("preset", ""),
        started=datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc)
        .strftime("%Y-%m-%d %H:%M"),
        latency_ms=m.get("latency_tuned_median"),
        speedups={k.removeprefix("speedup_tuned_vs_"): v for k, v in m.items()
                  if k.startswith("speedup_tuned_vs_")},
        trials_new=as_int(m.get("trials_new")), trials_reused=as_int(m.get("trials_reused")),
        tune_wall_s=m.get("tune_wall_s"), roofline_fraction=m.get("roofline_fraction"),
        verified=tags.get("verified") == "true", model_version=tags.get("model_version"))


def compare_runs(client, run_ids: list[str] | None = None, model: str | None = None,
                 preset: str | None = None, limit: int = 20) -> list[RunRow]:
    """The runs named by id, or the latest `limit` runs of `model` (on `preset`), newest first."""
    from mlflow.exceptions import MlflowException

    if run_ids:
        rows = []
        for run_id in run_ids:
            try:
                rows.append(_row(client.get_run(run_id)))
            except MlflowException:
                raise UserError(f"no MLflow run {run_id!r}") from None
        return rows
    if not model:
        raise UserError("give run ids, or --model (and optionally --preset)")
    filters = [f"tags.model = '{model}'"] + ([f"tags.preset = '{preset}'"] if preset else [])
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, " and ".join(filters), max_results=limit,
                              order_by=["attributes.start_time DESC"])
    if not runs:
        raise UserError(f"no runs of {model}" + (f" on {preset}" if preset else ""))
    return [_row(r) for r in runs]
