"""Per-kernel time inside the whole model.

TVM 0.27's VM has no profiler any more (`profile=True` is gone); its instrument hook is called
before and after every packed call, kernels and VM builtins alike, so we time the calls ourselves.
The hook costs ~1 us per call: fine for kernels of 10 us and up, which is what the roofline wants.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class KernelTime:
    name: str
    calls: int            # per inference
    ms: float             # per inference, all calls together

    @property
    def is_runtime(self) -> bool:
        """VM builtins (allocation, tuples, shape checks): not a kernel of ours."""
        return self.name.startswith("vm.")


@dataclass
class KernelProfile:
    kernels: list[KernelTime] = field(default_factory=list)    # heaviest first
    runs: int = 0

    @property
    def total_ms(self) -> float:
        return sum(k.ms for k in self.kernels)

    def by_name(self) -> dict[str, KernelTime]:
        return {k.name: k for k in self.kernels}


def profile_kernels(compiled, inputs: list, runs: int = 10, warmup: int = 3) -> KernelProfile:
    """Time every call the VM makes in `runs` inferences of `compiled` (a CompiledModel)."""
    device_args = compiled.to_device(inputs)
    for _ in range(warmup):
        compiled.run_device(device_args)
    total: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    started: dict[str, float] = {}

    def instrument(func, name, before_run, ret, *args):
        if before_run:
            started[name] = time.perf_counter()
        else:
            total[name] += time.perf_counter() - started.pop(name)
            calls[name] += 1
        return 0

    vm = compiled.vm
    vm.set_instrument(instrument)
    try:
        for _ in range(runs):
            compiled.run_device(device_args)
        compiled.device.sync()
    finally:
        vm.set_instrument(None)
    kernels = [KernelTime(name, calls[name] // runs, total[name] / runs * 1e3) for name in total]
    kernels.sort(key=lambda k: -k.ms)
    return KernelProfile(kernels, runs)
