import math

import numpy as np
import pytest

from pipeline.accuracy import (
    AccuracyError,
    AccuracyReport,
    check_accuracy_drop,
    compare_classifier,
    compare_embeddings,
    compare_labelled,
)
from pipeline.errors import PipelineError, UserError


def _logits(seed: int = 0, batches: int = 4, batch: int = 8, classes: int = 10) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, classes)).astype(np.float32) for _ in range(batches)]


def test_identical_classifier_outputs_are_a_perfect_match():
    ref = _logits()
    report = compare_classifier(ref, [r.copy() for r in ref])
    assert report.kind == "top1_agreement" and report.samples == 32
    assert report.top1_agreement == 1.0
    assert report.max_abs_logit_err == 0.0 and report.mean_abs_logit_err == 0.0
    assert report.min_cosine == pytest.approx(1.0) and report.mean_cosine == pytest.approx(1.0)
    assert report.drop_points == 0.0
    check_accuracy_drop(report, 0.0)


def test_identical_embeddings_are_a_perfect_match():
    rng = np.random.default_rng(1)
    ref = [rng.standard_normal((2, 4, 3)) for _ in range(3)]
    report = compare_embeddings(ref, [r.copy() for r in ref])
    assert report.kind == "cosine" and report.samples == 6 and report.top1_agreement is None
    assert report.min_cosine == pytest.approx(1.0) and report.drop_points == pytest.approx(0.0, abs=1e-9)
    assert report.max_abs_logit_err == 0.0


def test_classifier_known_perturbation():
    # 4 rows, argmax flipped in exactly one; every logit shifted by a known amount.
    ref = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [1.0, 2.0, 0.0]])
    q = ref + 0.5
    q[3] = [2.0, 1.0, 0.0]  # argmax 1 -> 0, abs errors 1, 1, 0
    report = compare_classifier([ref[:2], ref[2:]], [q[:2], q[2:]])
    assert report.samples == 4
    assert report.top1_agreement == pytest.approx(0.75)
    assert report.drop_points == pytest.approx(25.0)
    assert report.max_abs_logit_err == pytest.approx(1.0)
    assert report.mean_abs_logit_err == pytest.approx((9 * 0.5 + 2 * 1.0) / 12)
    # [1,2,0] vs [2,1,0]: cos = 4 / 5
    assert report.min_cosine == pytest.approx(0.8)
    cos_shift = (3 * 3.5) / (3 * math.sqrt(3.5**2 + 0.25 + 0.25))
    assert report.mean_cosine == pytest.approx((3 * cos_shift + 0.8) / 4)


def test_scaling_keeps_cosine_and_agreement():
    ref = _logits(2)
    report = compare_classifier(ref, [r * 3.0 for r in ref])
    assert report.top1_agreement == 1.0 and report.min_cosine == pytest.approx(1.0)
    assert report.max_abs_logit_err > 0


def test_embeddings_known_cosine():
    ref = np.array([[[1.0, 0.0]], [[0.0, 2.0]]])           # [2, 1, 2]: two samples
    q = np.array([[[1.0, 1.0]], [[0.0, 5.0]]])              # cos 1/sqrt(2) and 1
    report = compare_embeddings([ref], [q])
    assert report.samples == 2
    assert report.min_cosine == pytest.approx(1 / math.sqrt(2))
    assert report.mean_cosine == pytest.approx((1 / math.sqrt(2) + 1) / 2)
    assert report.drop_points == pytest.approx((1 - report.mean_cosine) * 100)


def test_zero_and_non_finite_rows():
    ref = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0]])
    q = np.array([[0.0, 0.0], [1.0, 0.0], [np.nan, 1.0]])
    report = compare_embeddings([ref], [q])
    # both zero -> 1, one zero -> 0, NaN -> 0
    assert report.min_cosine == 0.0 and report.mean_cosine == pytest.approx(1 / 3)
    cls = compare_classifier([ref[2:]], [np.array([[np.nan, np.nan]])])
    assert cls.top1_agreement == 0.0 and cls.drop_points == 100.0


def test_labelled():
    report = compare_labelled(0.99, 0.975, 400)
    assert report.kind == "labelled" and report.samples == 400
    assert report.drop_points == pytest.approx(1.5)
    assert report.top1_agreement is None and report.mean_cosine is None
    assert compare_labelled(0.9, 0.92, 10).drop_points == pytest.approx(-2.0)
    with pytest.raises(ValueError):
        compare_labelled(95.0, 0.9, 10)  # percent, not a fraction
    with pytest.raises(UserError):
        compare_labelled(0.9, 0.9, 0)


def test_as_metrics_prefixes_and_skips_none():
    metrics = compare_labelled(0.99, 0.98, 100).as_metrics()
    assert metrics == {"accuracy_samples": 100.0, "accuracy_reference_accuracy": 0.99,
                       "accuracy_quantized_accuracy": 0.98, "accuracy_drop_points": pytest.approx(1.0)}
    cls = compare_classifier(_logits(), _logits()).as_metrics()
    assert set(cls) == {"accuracy_samples", "accuracy_top1_agreement", "accuracy_max_abs_logit_err",
                        "accuracy_mean_abs_logit_err", "accuracy_min_cosine", "accuracy_mean_cosine",
                        "accuracy_drop_points"}
    assert all(isinstance(v, float) for v in cls.values())


def test_check_accuracy_drop_bounds():
    report = compare_labelled(0.99, 0.97, 450)  # 2 points
    check_accuracy_drop(report, 2.5)
    check_accuracy_drop(AccuracyReport(kind="labelled", samples=1, drop_points=2.0), 2.0)  # bound inclusive
    with pytest.raises(AccuracyError) as err:
        check_accuracy_drop(report, 1.0)
    assert isinstance(err.value, PipelineError) and not isinstance(err.value, UserError)
    message = str(err.value)
    assert message.startswith("int8 accuracy drop 2.00 points exceeds --max-accuracy-drop 1 (")
    assert "\n" not in message and "99.00%" in message and "97.00%" in message


def test_check_accuracy_drop_fails_on_nan_and_rejects_bad_bounds():
    nan = AccuracyReport(kind="cosine", samples=1, min_cosine=math.nan, mean_cosine=math.nan,
                         drop_points=math.nan)
    with pytest.raises(AccuracyError):
        check_accuracy_drop(nan, 100.0)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(UserError):
            check_accuracy_drop(compare_labelled(0.9, 0.9, 1), bad)


def test_mismatched_outputs_are_rejected():
    with pytest.raises(ValueError):
        compare_classifier(_logits(batches=2), _logits(batches=3))
    with pytest.raises(ValueError):
        compare_classifier([np.zeros((2, 3))], [np.zeros((2, 4))])
    with pytest.raises(UserError):
        compare_embeddings([], [])
