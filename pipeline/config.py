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
