"""Reference runtimes timed next to the TVM module in the measure stage: ONNX Runtime (always; it is
also the numerical reference) and OpenVINO (when installed), both on the model as given, with the
same thread count as the target's cores and their latency/fp32 settings."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)


def openvino_runner(onnx_model, feeds: dict[str, np.ndarray], threads: int) -> Callable[[], object] | None:
    """A zero-argument call running one OpenVINO inference, or None when OpenVINO is missing or
    cannot compile the model (logged, never fatal: it is a baseline, not a stage)."""
    try:
        import openvino as ov
    except ImportError:
        log.info("openvino is not installed: no OpenVINO baseline")
        return None
    try:
        core = ov.Core()
        model = core.read_model(onnx_model.SerializeToString(), b"")  # ONNX bytes, no external weights
        compiled = core.compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1})
        request = compiled.create_infer_request()
        by_name = {port.any_name: port for port in compiled.inputs}
        inputs = {by_name[name]: value for name, value in feeds.items() if name in by_name}
    except Exception as exc:  # noqa: BLE001  (any OpenVINO failure only drops the baseline)
        log.warning("OpenVINO baseline unavailable: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return None
    return lambda: request.infer(inputs)
