"""All knobs of a `tune run`, in one typed place. Every field is also a CLI flag."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError
from pipeline.measure import MeasureSettings
from pipeline.tuning import TuneBudget


@dataclass
class RunConfig:
    model: str                                            # zoo name or .onnx path
    model_options: dict[str, object] = field(default_factory=dict)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    target: str = "auto"
    budget: TuneBudget = field(default_factory=TuneBudget)
    tuning_logs: Path = Path("tuning_logs")
    out: Path = Path("artifacts")
    runs_dir: Path = Path("runs")
    tracking_uri: str | None = None
    experiment: str | None = None
    skip_untuned: bool = False
    tolerance: float = 1e-3
    verify_samples: int = 2
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    seed: int = 0
    winograd: bool | None = None                          # None: the target preset's choice
    roofline: bool = True                                 # per-kernel profile + roofline plot
    profile_runs: int = 10                                # inferences the kernel profile averages
    ceilings_dir: Path | None = None                      # None: ~/.cache/tvm-autotune/ceilings
    register: bool = True                                 # artifact -> MLflow model version
    export_fastest: bool = True      # ship the default-scheduled build when it measured faster
    quantize: str = "none"                                # "none" or "int8"
    calibration: Path | None = None                       # .npy/.npz/image folder; None: synthetic
    calibration_method: str = "percentile"                # minmax | percentile | entropy | mse
    calibration_samples: int = 16
    keep_fp32: list[str] = field(default_factory=list)    # quantizable layer names kept in fp32
    max_accuracy_drop: float = 1.0                        # points; the run fails above it
    accuracy_samples: int = 50                            # seeded inputs the int8 gate compares on
    accuracy_data: Path | None = None                     # labelled .npz (inputs + labels) instead
    fallback_rounds: int = 4                              # int8 layers -> fp32 rounds before failing
    sparse: str = "off"                                   # auto | on | off: BSR kernels for sparse weights
    sparse_threshold: float = 0.7                         # block sparsity a weight needs for BSR
    sparse_block: str = "auto"                            # RxC (R along K, C along N) or auto
    precision: str = "fp32"          # fp32 | fp16 | bf16: ToMixedPrecision (pipeline/precision.py)
    rpc: str | None = None           # HOST:PORT of a TVM RPC tracker: measure on its servers
    rpc_key: str | None = None       # the device key those servers registered under
    tuning_db: str | None = None     # postgresql://... : tuning records there instead of JSON files


@dataclass(frozen=True)
class BudgetPreset:
    """One knob for how much tuning to buy (hidet's search_space 0/1/2 is the model)."""

    name: str
    trials_per_task: int
    time_budget_s: float
    description: str

    def budget(self) -> TuneBudget:
        return TuneBudget(trials=None, trials_per_task=self.trials_per_task,
                          time_budget_s=self.time_budget_s)

    def describe(self) -> str:
        return (f"budget {self.name}: up to {self.trials_per_task} trials per task, "
                f"at most {self.time_budget_s / 60:g} min of tuning ({self.description})")


BUDGETS = {b.name: b for b in (
    BudgetPreset("quick", 8, 10 * 60, "a first tuned module in minutes"),
    BudgetPreset("default", 32, 30 * 60, "most of the gain; a nightly job"),
    BudgetPreset("full", 128, 4 * 3600, "the long search, for releases"),
)}


def resolve_budget(name: str, trials: int | None = None, trials_per_task: int | None = None,
                   time_budget: str | None = None) -> tuple[TuneBudget, str]:
    """A preset, with any explicit flag overriding its part; returns the budget and its summary."""
    if name not in BUDGETS:
        raise UserError(f"unknown budget {name!r}: use one of {', '.join(BUDGETS)}")
    preset = BUDGETS[name]
    base = preset.budget()
    budget = TuneBudget(
        trials=trials,
        trials_per_task=trials_per_task if trials_per_task is not None else
        (None if trials is not None else base.trials_per_task),
        time_budget_s=parse_duration(time_budget) if time_budget else base.time_budget_s)
    if trials is None and trials_per_task is None and time_budget is None:
        return budget, preset.describe()
    parts = [f"{trials} trials" if trials is not None else
             f"up to {budget.trials_per_task} trials per task",
             f"at most {budget.time_budget_s / 60:g} min of tuning"]
    return budget, f"budget {name} with overrides: {', '.join(parts)}"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr)?\s*$", re.IGNORECASE)
_UNIT_S = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}


def parse_duration(text: str) -> float:
    """'30m', '90s', '1.5h', '45' (seconds) -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise UserError(f"bad duration {text!r}: use e.g. 90s, 30m or 1h")
    seconds = float(m.group(1)) * _UNIT_S[(m.group(2) or "").lower() or None]
    if seconds <= 0:
        raise UserError(f"duration must be positive, got {text!r}")
    return seconds


def parse_shape_overrides(items: list[str]) -> dict[str, list[int]]:
    """['input=1,3,224,224'] -> {'input': [1, 3, 224, 224]}."""
    out = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            shape = [int(d) for d in dims.split(",")]
        except ValueError:
            shape = []
        if not sep or not name or not shape or min(shape) <= 0:
            raise UserError(f"bad --input-shape {item!r}: use NAME=D1,D2,... with positive dims")
        out[name] = shape
    return out


def parse_model_options(items: list[str]) -> dict[str, object]:
    """['layers=2', 'hidden=128'] -> {'layers': 2, 'hidden': 128} (ints, floats or strings)."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"bad --model-option {item!r}: use KEY=VALUE")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out
