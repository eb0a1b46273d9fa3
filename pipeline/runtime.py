"""Running compiled modules: the only code an exported artifact needs (no tuning, no MLflow)."""

from __future__ import annotations

import os

import numpy as np


def use_threads(count: int) -> int:
    """Pin TVM's CPU thread pool to `count` threads; returns what will be used.

    TVM's runtime halves the logical CPU count to skip hyper-threads, so on a 2-vCPU machine it
    runs every parallel kernel on one thread while ONNX Runtime uses two. The pool reads
    TVM_NUM_THREADS when it starts (at the first parallel kernel, and in every runner process),
    so this must run before any compiled code does. An explicit TVM_NUM_THREADS wins.
    """
    os.environ.setdefault("TVM_NUM_THREADS", str(max(1, int(count))))
    return int(os.environ["TVM_NUM_THREADS"])


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


class CompiledModel:
    """A Relax VM over an executable or a loaded library, with its params already on the device."""

    def __init__(self, executable, params: list[np.ndarray], device: str = "cpu") -> None:
        import tvm
        from tvm import relax

        self.device = tvm.device(device, 0)
        self.vm = relax.VirtualMachine(executable, self.device)
        self._params = [tvm.runtime.tensor(p, self.device) for p in params]

    def to_device(self, inputs: list[np.ndarray]) -> list:
        import tvm

        return [tvm.runtime.tensor(np.ascontiguousarray(x), self.device) for x in inputs]

    def run_device(self, device_inputs: list):
        """One call on inputs already on the device (what the timing loops use)."""
        return self.vm["main"](*device_inputs, *self._params)

    def timed_call(self, inputs: list[np.ndarray]):
        """A zero-argument call that runs one inference on `inputs` (copied to the device now) and
        waits for it: what the latency loops time."""
        device_args = self.to_device(inputs)

        def call():
            self.run_device(device_args)
            self.device.sync()
        return call

    def __call__(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return _to_numpy(self.run_device(self.to_device(inputs)))


def _to_numpy(out) -> list[np.ndarray]:
    if hasattr(out, "numpy"):
        return [out.numpy()]
    return [o.numpy() for o in out]
