"""Progress reporting: the library calls a callback with events; the CLI renders them (rich)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    stage: str                       # import, passes, tune, build, verify, measure, record, export
    message: str = ""
    task_index: int | None = None    # tune: the task just measured (0-based) ...
    n_tasks: int | None = None       # ... of this many
    trials_done: int = 0             # tune: new trials measured so far in this run
    trials_total: int = 0            # tune: new trials this run may spend
    best_ms: float | None = None     # tune: estimated model latency from the best schedules so far
    elapsed_s: float = 0.0
    eta_s: float | None = None


ProgressCallback = Callable[[ProgressEvent], None]


def no_progress(_: ProgressEvent) -> None:
    """The default callback: the library itself never prints."""
