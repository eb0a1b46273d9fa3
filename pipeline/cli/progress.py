"""How a long command reports and stops: one line per stage, a live bar while tuning, and a clean
stop on Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.cli.common import err


def print_stage(event) -> None:
    err.print(f"[cyan]{event.stage:>8}[/] {event.message}")

class ProgressView:
    """Renders ProgressEvents: one line per stage, a live bar while tuning."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), console=err, transient=False)
        self.tune_id = None

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        if event.stage != "tune" or event.n_tasks is None:
            if self.tune_id is not None:
                self.bar.stop()
                self.tune_id = None
            print_stage(event)
            return
        best = f"best {event.best_ms:.2f} ms" if event.best_ms is not None else "best: not all tasks measured"
        eta = f"ETA {event.eta_s:.0f}s" if event.eta_s is not None else ""
        info = (f"task {event.task_index + 1}/{event.n_tasks} | trials {event.trials_done}/"
                f"{event.trials_total} | {best} | {eta}")
        if self.tune_id is None:
            self.bar.start()
            self.tune_id = self.bar.add_task("tuning", total=event.trials_total, info=info)
        self.bar.update(self.tune_id, completed=event.trials_done, info=info)

    def close(self) -> None:
        if self.tune_id is not None:
            self.bar.stop()


class StopRequest:
    """Ctrl-C or SIGTERM asks for a clean stop: the current measurement finishes, its record is
    committed, the MLflow run is marked KILLED. A second signal stops at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def install(self) -> None:
        def on_signal(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            err.print("[yellow]stopping after the current measurement[/] (signal again to force)")
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
