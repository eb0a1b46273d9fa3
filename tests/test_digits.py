import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipeline.digits import DigitsData, digits_accuracy, load_digits_split, train_digits_cnn
from pipeline.errors import UserError


@pytest.fixture(scope="module")
def data() -> DigitsData:
    return load_digits_split()


@pytest.fixture(scope="module")
def model(data) -> onnx.ModelProto:
    return train_digits_cnn(data)


def _predict(model: onnx.ModelProto):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"input": x})[0]


def test_split_shapes_and_scale(data):
    assert data.train_x.shape == (1347, 1, 8, 8) and data.test_x.shape == (450, 1, 8, 8)
    assert data.train_x.dtype == np.float32 and data.test_x.dtype == np.float32
    assert data.train_y.shape == (1347,) and data.test_y.shape == (450,)
    both = np.concatenate([data.train_x, data.test_x])
    assert both.min() == 0.0 and both.max() == 1.0
    assert set(np.unique(data.test_y)) == set(range(10))


def test_split_is_stratified(data):
    all_y = np.concatenate([data.train_y, data.test_y])
    expected = np.bincount(all_y, minlength=10) * 0.25
    assert np.all(np.abs(np.bincount(data.test_y, minlength=10) - expected) <= 1)


def test_split_is_seeded(data):
    again, other = load_digits_split(0), load_digits_split(1)
    assert np.array_equal(again.test_x, data.test_x) and np.array_equal(again.train_y, data.train_y)
    assert not np.array_equal(other.test_x, data.test_x)
    assert len(load_digits_split(0, test_fraction=0.5).test_y) in (898, 899)
    with pytest.raises(UserError):
        load_digits_split(0, test_fraction=1.0)


def test_exported_model_interface(model):
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and [d.dim_value for d in inp.type.tensor_type.shape.dim] == [1, 1, 8, 8]
    assert out.name == "logits" and [d.dim_value for d in out.type.tensor_type.shape.dim] == [1, 10]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    # The pipeline's Conv+BN fold needs a BN left to fold.
    assert "BatchNormalization" in {n.op_type for n in model.graph.node}


def test_trained_cnn_is_accurate(model, data):
    assert digits_accuracy(_predict(model), data, 1) >= 0.95


def test_training_is_deterministic_and_batch_is_fixed(model, data):
    assert train_digits_cnn(data).SerializeToString() == model.SerializeToString()
    batched = train_digits_cnn(data, export_batch=4)
    dims = [d.dim_value for d in batched.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [4, 1, 8, 8]
    # Same weights, other batch: same accuracy through the padded last batch (450 = 112 * 4 + 2).
    assert digits_accuracy(_predict(batched), data, 4) == digits_accuracy(_predict(model), data, 1)


def test_accuracy_pads_and_drops_the_last_batch(data):
    seen = []

    def always_three(x):
        seen.append(x.shape)
        logits = np.zeros((x.shape[0], 10), np.float32)
        logits[:, 3] = 1.0
        return logits

    assert digits_accuracy(always_three, data, 7) == pytest.approx(np.mean(data.test_y == 3))
    assert set(seen) == {(7, 1, 8, 8)} and len(seen) == -(-450 // 7)


def test_accuracy_rejects_bad_batches(data):
    with pytest.raises(UserError):
        digits_accuracy(lambda x: x, data, 0)
    with pytest.raises(ValueError):
        digits_accuracy(lambda x: np.zeros((1, 10)), data, 8)
