import numpy as np
import onnxruntime as ort
import pytest

from pipeline.errors import UserError
from pipeline.models import get_model, list_models
from pipeline.models.stats import graph_stats


def _run(model, feeds):
    return ort.InferenceSession(model.SerializeToString()).run(None, feeds)


def test_registry_has_the_zoo():
    assert {"resnet18", "resnet50", "mobilenet_v2", "bert-mini", "tiny-cnn"} <= {
        e.name for e in list_models()}


@pytest.mark.parametrize("name,params_m,gflops", [
    ("resnet18", 11.7, 3.6), ("resnet50", 25.6, 8.2), ("mobilenet_v2", 3.5, 0.6)])
def test_cnn_sizes_match_the_published_architectures(name, params_m, gflops):
    stats = graph_stats(get_model(name).build())
    assert stats.params / 1e6 == pytest.approx(params_m, rel=0.03)
    assert stats.flops / 1e9 == pytest.approx(gflops, rel=0.05)


def test_resnet50_runs_in_onnxruntime_with_sane_logits():
    model = get_model("resnet50").build()
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    (logits,) = _run(model, {"input": x})
    assert logits.shape == (1, 1000) and np.isfinite(logits).all() and logits.std() > 0


def test_bert_options_change_the_graph_and_run():
    model = get_model("bert-mini").build(layers=1, hidden=64, heads=2, seq=16, vocab=100)
    ids = np.arange(16, dtype=np.int64)[None]
    (out,) = _run(model, {"input_ids": ids, "attention_mask": np.ones((1, 16), np.int64)})
    assert out.shape == (1, 16, 64) and np.isfinite(out).all()
    default = graph_stats(get_model("bert-mini").build())
    assert default.inputs[0].shape == (1, 128)


def test_bert_mask_is_applied():
    model = get_model("bert-mini").build(layers=1, hidden=32, heads=2, seq=8, vocab=50)
    ids = np.arange(8, dtype=np.int64)[None]
    full = _run(model, {"input_ids": ids, "attention_mask": np.ones((1, 8), np.int64)})[0]
    half = _run(model, {"input_ids": ids, "attention_mask": np.array([[1] * 4 + [0] * 4])})[0]
    assert not np.allclose(full[0, :4], half[0, :4])


def test_weights_are_seeded():
    a = get_model("tiny-cnn").build(seed=1).SerializeToString()
    assert a == get_model("tiny-cnn").build(seed=1).SerializeToString()
    assert a != get_model("tiny-cnn").build(seed=2).SerializeToString()


def test_unknown_model_and_option_are_user_errors():
    with pytest.raises(UserError, match="unknown model"):
        get_model("resnet9000")
    with pytest.raises(UserError, match="no option"):
        get_model("resnet18").build(depth=3)
