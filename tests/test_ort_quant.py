import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipeline import ort_quant
from pipeline.digits import digits_accuracy, load_digits_split, train_digits_cnn
from pipeline.errors import UserError
from pipeline.ort_quant import ort_static_int8


@pytest.fixture(scope="module")
def trained():
    data = load_digits_split()
    model = train_digits_cnn(data)
    calibration = [{"input": data.train_x[i:i + 1]} for i in range(64)]
    return data, model, calibration


@pytest.fixture(scope="module")
def quantized(trained) -> onnx.ModelProto:
    _, model, calibration = trained
    return ort_static_int8(model, calibration)


def _accuracy(model: onnx.ModelProto, data) -> float:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return digits_accuracy(lambda x: sess.run(None, {"input": x})[0], data, 1)


def _ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def _conv_weight_scales(model: onnx.ModelProto) -> list[np.ndarray]:
    """Scales of the DequantizeLinear nodes feeding conv weights (their input is an initializer)."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node
            if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
            and inits[n.input[0]].ndim == 4]


def test_int8_graph_is_qdq(quantized):
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(quantized)
    onnx.checker.check_model(quantized)
    scales = _conv_weight_scales(quantized)
    assert scales and all(s.ndim == 1 and s.size in (16, 32) for s in scales)  # per output channel


def test_int8_accuracy_within_two_points(trained, quantized):
    data, model, _ = trained
    fp32, int8 = _accuracy(model, data), _accuracy(quantized, data)
    assert fp32 >= 0.95
    assert fp32 - int8 <= 0.02


def test_per_tensor_option(trained):
    _, model, calibration = trained
    scales = _conv_weight_scales(ort_static_int8(model, calibration[:8], per_channel=False))
    assert scales and all(s.size == 1 for s in scales)


def test_preprocessing_failure_is_logged_and_skipped(trained, monkeypatch, caplog):
    data, model, calibration = trained

    def broken(*_args, **_kwargs):
        raise RuntimeError("symbolic shape inference exploded\nsecond line")

    monkeypatch.setattr(ort_quant, "quant_pre_process", broken)
    with caplog.at_level(logging.WARNING, logger="pipeline.ort_quant"):
        quantized = ort_static_int8(model, calibration[:16])
    assert "pre-processing failed" in caplog.text and "second line" not in caplog.text
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(quantized)
    # Without pre-processing the BN is quantized as is; still a working model.
    assert _accuracy(quantized, data) >= 0.9


def test_bad_calibration_is_a_user_error(trained):
    _, model, _ = trained
    with pytest.raises(UserError, match="at least one"):
        ort_static_int8(model, [])
    with pytest.raises(UserError, match="input"):
        ort_static_int8(model, [{"x": np.zeros((1, 1, 8, 8), np.float32)}])
