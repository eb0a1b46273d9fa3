"""ONNX Runtime's own static int8 quantization: the baseline our int8 path is compared against.

Same model, same calibration feeds, ORT's recommended CPU recipe (QDQ, uint8 activations, int8
per-channel weights, min/max calibration), so a gap in accuracy or speed is ours and not the recipe's.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from pipeline.errors import UserError

log = logging.getLogger(__name__)


def ort_static_int8(model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]],
                    per_channel: bool = True, reduce_range: bool = False) -> onnx.ModelProto:
    """`model` statically quantized by `onnxruntime.quantization.quantize_static` in QDQ format,
    calibrated (min/max) on `calibration`, one feed dict per inference. `reduce_range` (7-bit weights)
    is ORT's advice for x86 CPUs without VNNI; off by default, as on VNNI machines."""
    _check_feeds(model, calibration)
    with tempfile.TemporaryDirectory(prefix="ort_quant_") as tmp:
        src = Path(tmp) / "model.onnx"
        dst = Path(tmp) / "model.int8.onnx"
        onnx.save(model, src)
        quantize_static(
            _preprocess(src, Path(tmp) / "model.pre.onnx"), dst, _FeedReader(calibration),
            quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=reduce_range,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax)
        return onnx.load(dst)


def _check_feeds(model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]]) -> None:
    if not calibration:
        raise UserError("static int8 quantization needs at least one calibration feed")
    initializers = {t.name for t in model.graph.initializer}
    wanted = {i.name for i in model.graph.input if i.name not in initializers}
    for n, feed in enumerate(calibration):
        missing = wanted - set(feed)
        if missing:
            raise UserError(f"calibration feed {n} lacks model input(s) {sorted(missing)}")


def _preprocess(src: Path, dst: Path) -> Path:
    """ORT's quantization pre-processing (shape inference, Conv+BN fusion and other graph
    optimizations), which ORT recommends before quantize_static. Best effort: when it fails the
    model is quantized as given, which still works, only with fewer fused ops."""
    try:
        quant_pre_process(src, dst)
    except Exception as exc:  # noqa: BLE001  (any failure here only skips an optional step)
        log.warning("ORT quantization pre-processing failed, quantizing the model as given: %s",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return src
    return dst


class _FeedReader(CalibrationDataReader):
    """Hands quantize_static the given feeds once each, in order."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def rewind(self) -> None:
        self._next = 0
