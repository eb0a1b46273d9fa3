"""Stage 6, measure: latency of several runners in one process, interleaved in short bursts, so that
background load and frequency changes hit every runner alike.

Bursts rather than single calls: ONNX Runtime's and TVM's thread pools both spin-wait after a
call. Alternating call by call on a 2-core machine, one runtime's spinning workers steal the cores
from the other (measured: TVM 61 ms interleaved vs 20 ms alone on resnet18). Each burst starts
with an untimed call that absorbs the other pool's wind-down."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MeasureSettings:
    warmup: int = 3                 # untimed calls per runner, but no more than ...
    warmup_seconds: float = 1.0     # ... this long (one call at least: a 2 s call needs no three)
    repeats: int = 50               # timed calls per runner at most ...
    max_seconds: float = 5.0        # ... or until a runner has used this much time
    min_repeats: int = 3            # ... but never fewer than this
    burst: int = 5                  # timed calls per runner before switching to the next


@dataclass
class Latency:
    samples_ms: list[float]

    @property
    def median(self) -> float:
        return float(np.median(self.samples_ms))

    @property
    def p90(self) -> float:
        return float(np.percentile(self.samples_ms, 90))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.samples_ms, 99))

    def as_dict(self) -> dict:
        return {"median_ms": self.median, "p90_ms": self.p90, "p99_ms": self.p99,
                "mean_ms": float(np.mean(self.samples_ms)), "samples": len(self.samples_ms)}


def measure_interleaved(runners: dict[str, Callable[[], object]],
                        settings: MeasureSettings = MeasureSettings()) -> dict[str, Latency]:
    """Each runner is a zero-argument call that runs one inference (inputs bound in advance)."""
    for fn in runners.values():
        start = time.perf_counter()
        for i in range(settings.warmup):
            if i and time.perf_counter() - start > settings.warmup_seconds:
                break
            fn()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    spent = dict.fromkeys(runners, 0.0)

    def wants(name: str) -> bool:
        n = len(samples[name])
        return n < settings.min_repeats or (n < settings.repeats and spent[name] < settings.max_seconds)

    while any(wants(n) for n in runners):
        for name, fn in runners.items():
            if not wants(name):
                continue
            fn()
            for _ in range(settings.burst):
                if not wants(name):
                    break
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                samples[name].append(dt * 1e3)
                spent[name] += dt
    return {name: Latency(s) for name, s in samples.items()}


def faster_build(stats: dict[str, Latency], margin: float = 0.03) -> str:
    """"untuned" when the default-scheduled build beat the tuned one by more than `margin` in this
    run, else "tuned". Tuning measures each kernel hot and alone; a record that wins there can lose
    inside the model (cold operands), so the run ships whichever build the model itself ran faster."""
    if "untuned" not in stats:
        return "tuned"
    return "untuned" if stats["untuned"].median < stats["tuned"].median * (1 - margin) else "tuned"
