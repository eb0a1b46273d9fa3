"""Stage 4, build: apply the tuning database to the tasks, lift weights to params, compile for the VM."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.passes import LiftConstantsToParams
from pipeline.roofline import kernel_costs

log = logging.getLogger(__name__)


@dataclass
class BuiltModule:
    executable: object                 # tvm.runtime.Executable
    params: dict[str, np.ndarray]      # passed to `main` after the real inputs, in this order
    scheduled_tasks: int               # PrimFuncs that got a schedule from the database
    total_tasks: int
    default_scheduled: dict[str, str] = field(default_factory=dict)   # kernel -> schedules/ rule
    costs: dict = field(default_factory=dict)   # kernel -> roofline.KernelCost, as compiled


def apply_database(mod, target, database_dir: Path | None, tuning_db: str | None = None):
    """Replace every PrimFunc that has a tuning record with its best schedule (from the JSON folder
    `database_dir`, or from the PostgreSQL store `tuning_db`)."""
    from tvm import relax

    from pipeline.logs import SHIPPED
    from pipeline.tuning import open_database
    from pipeline.tuning_db import database_lock

    if database_dir is not None and tuning_db:
        db = open_database(database_dir, tuning_db)
        with target, db:
            return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    if database_dir is None or not ((database_dir / "database_workload.json").exists()
                                    or (database_dir / SHIPPED).is_dir()):
        return mod

    # shared: never read a folder while another process is appending to it (or compacting it)
    with database_lock(database_dir, exclusive=False):
        db = open_database(database_dir)
        with target, db:
            return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)


def _compile(mod, target):
    import tvm

    config = {}
    if target.kind.name == "cuda":
        from schedules.gpu import build_config

        config = build_config(mod)
    if not config:
        return tvm.compile(mod, target=target)
    current = tvm.transform.PassContext.current()
    with tvm.transform.PassContext(opt_level=current.opt_level, config={**dict(current.config), **config}):
        return tvm.compile(mod, target=target)


def _count_scheduled(mod) -> tuple[int, int]:
    import tvm

    funcs = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return sum(bool(f.attrs and f.attrs.get("tirx.is_scheduled", False)) for f in funcs), len(funcs)


def build(mod, target, database_dir: Path | None = None, post_passes: list | None = None,
          default_schedules: bool = True, tuning_db: str | None = None) -> BuiltModule:
    """Compile a fused Relax module (the output of the graph passes) for `target`; `post_passes`
    (pipeline.passes.post_tuning_passes) run after the database is applied. Kernels without a
    tuning record get our default schedules (`schedules/`) unless `default_schedules` is off."""
    import tvm

    from pipeline.passes import apply_passes
    from schedules import ScheduleUntuned

    # Taken now: scheduling replaces the functions inside `mod` itself.
    fused = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    mod = apply_database(mod, target, database_dir, tuning_db)
    scheduled, total = _count_scheduled(mod)
    log.info("%d of %d kernels scheduled from the database", scheduled, total)
    untuned = ScheduleUntuned(target)
    if default_schedules:
        with target:
            mod = untuned(mod)
        log.info("%d kernels got a default schedule: %s", len(untuned.applied),
                 ", ".join(f"{k}={v}" for k, v in sorted(untuned.applied.items())))
    if post_passes:
        mod = apply_passes(mod, target, post_passes)
    mod, params = LiftConstantsToParams(mod)
    executable = _compile(mod, target)
    return BuiltModule(executable, params, scheduled, total, dict(untuned.applied),
                       kernel_costs(mod, unscheduled=fused))
