"""How much an int8 model loses against its fp32 original, from the two models' numpy outputs.

Three kinds of evidence, from strongest to weakest: accuracy on labelled data (a real drop in
points), top-1 agreement of a classifier's argmax with the fp32 model's on unlabelled inputs, and
cosine similarity of output rows for models without classes (embeddings, hidden states). Each is
summarised as `drop_points`, so one `--max-accuracy-drop` bound applies to all of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np

from pipeline.errors import PipelineError, UserError

Kind = Literal["top1_agreement", "cosine", "labelled"]


class AccuracyError(PipelineError):
    """The int8 model lost more accuracy than the user allowed; nothing is exported."""

    exit_code = 5


@dataclass(kw_only=True)
class AccuracyReport:
    """One comparison; fields a kind does not measure are None (and left out of `as_metrics`)."""

    kind: Kind
    samples: int
    top1_agreement: float | None = None
    max_abs_logit_err: float | None = None
    mean_abs_logit_err: float | None = None
    min_cosine: float | None = None
    mean_cosine: float | None = None
    reference_accuracy: float | None = None
    quantized_accuracy: float | None = None
    drop_points: float

    def as_metrics(self) -> dict[str, float]:
        """Numeric fields as "accuracy_<field>" metrics (the kind is a tag, not a metric)."""
        return {f"accuracy_{f.name}": float(getattr(self, f.name)) for f in fields(self)
                if f.name != "kind" and getattr(self, f.name) is not None}

    def summary(self) -> str:
        """The evidence behind `drop_points`, in a few words for a one-line message."""
        if self.kind == "labelled":
            return (f"accuracy {self.reference_accuracy:.2%} fp32 vs {self.quantized_accuracy:.2%} int8 "
                    f"on {self.samples} labelled samples")
        if self.kind == "top1_agreement":
            return f"top-1 agreement {self.top1_agreement:.2%} with fp32 over {self.samples} samples"
        return f"mean cosine {self.mean_cosine:.5f}, min {self.min_cosine:.5f} over {self.samples} samples"


def _rows(ref: Sequence[np.ndarray], q: Sequence[np.ndarray], keep_last: bool
          ) -> tuple[np.ndarray, np.ndarray]:
    """Both output lists stacked into [rows, features] float64 arrays: a row per sample, features
    the class axis (`keep_last`) or everything but the batch axis."""
    if len(ref) != len(q):
        raise ValueError(f"{len(ref)} reference output batches but {len(q)} quantized ones")
    if not ref:
        raise UserError("accuracy comparison needs at least one output batch")
    out_ref, out_q = [], []
    for i, (r, s) in enumerate(zip(ref, q)):
        r, s = np.asarray(r, np.float64), np.asarray(s, np.float64)
        if r.shape != s.shape:
            raise ValueError(f"output batch {i}: reference shape {r.shape} but quantized {s.shape}")
        if r.ndim == 0 or r.size == 0:
            raise ValueError(f"output batch {i}: expected a non-empty batch, got shape {r.shape}")
        shape = (-1, r.shape[-1]) if keep_last else (r.shape[0], -1)
        out_ref.append(r.reshape(shape))
        out_q.append(s.reshape(shape))
    if len({a.shape[1] for a in out_ref}) != 1:
        raise ValueError("output batches differ in feature size")
    return np.concatenate(out_ref), np.concatenate(out_q)


def _cosines(ref: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Cosine per row; two all-zero rows agree (1), one all-zero row against another does not (0),
    and a row with NaN/inf matches nothing (0), so one broken output lowers the mean, not voids it."""
    finite = np.isfinite(ref).all(axis=1) & np.isfinite(q).all(axis=1)
    ref, q = np.where(finite[:, None], ref, 0.0), np.where(finite[:, None], q, 0.0)
    dot = (ref * q).sum(axis=1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(q, axis=1)
    both_zero = ~ref.any(axis=1) & ~q.any(axis=1) & finite
    cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
    # Rounding can push a perfect match a hair past 1; a cosine is at most 1.
    return np.minimum(cos, 1.0)


def _errors(ref: np.ndarray, q: np.ndarray) -> dict[str, float]:
    err = np.abs(ref - q)
    cos = _cosines(ref, q)
    return {"max_abs_logit_err": float(err.max()), "mean_abs_logit_err": float(err.mean()),
            "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def compare_classifier(ref_outputs: Sequence[np.ndarray], q_outputs: Sequence[np.ndarray]) -> AccuracyReport:
    """Logits [batch, classes] per input batch, fp32 vs int8: how often the int8 argmax matches the
    fp32 one (the drop is the disagreement), plus logit errors and per-row cosines."""
    ref, q = _rows(ref_outputs, q_outputs, keep_last=True)
    # A row with NaN/inf is no prediction at all, whatever argmax makes of it: it counts as a miss.
    agree = (ref.argmax(axis=1) == q.argmax(axis=1)) & np.isfinite(q).all(axis=1)
    agreement = float(agree.mean())
    return AccuracyReport(kind="top1_agreement", samples=len(ref), top1_agreement=agreement,
                          drop_points=(1.0 - agreement) * 100.0, **_errors(ref, q))


def compare_embeddings(ref_outputs: Sequence[np.ndarray], q_outputs: Sequence[np.ndarray]) -> AccuracyReport:
    """Outputs without classes [batch, ...], fp32 vs int8: cosine per sample (all but the batch axis
    flattened); the drop is (1 - mean cosine) in points."""
    ref, q = _rows(ref_outputs, q_outputs, keep_last=False)
    errors = _errors(ref, q)
    return AccuracyReport(kind="cosine", samples=len(ref), drop_points=(1.0 - errors["mean_cosine"]) * 100.0,
                          **errors)


def compare_labelled(ref_acc: float, q_acc: float, n: int) -> AccuracyReport:
    """Accuracies (fractions in [0, 1]) of fp32 and int8 on the same `n` labelled samples; the drop is
    their difference in points (negative when int8 happens to do better)."""
    for name, value in (("reference", ref_acc), ("quantized", q_acc)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} accuracy must be a fraction in [0, 1], got {value}")
    if n < 1:
        raise UserError(f"accuracy needs at least one labelled sample, got {n}")
    return AccuracyReport(kind="labelled", samples=n, reference_accuracy=float(ref_acc),
                          quantized_accuracy=float(q_acc), drop_points=(ref_acc - q_acc) * 100.0)


def check_accuracy_drop(report: AccuracyReport, max_drop_points: float) -> None:
    """Raise AccuracyError when the report's drop exceeds `max_drop_points` (a NaN drop always does:
    an int8 model producing NaNs has proved nothing)."""
    if not math.isfinite(max_drop_points) or max_drop_points < 0:
        raise UserError(f"--max-accuracy-drop must be a finite number of points >= 0, got {max_drop_points}")
    if not report.drop_points <= max_drop_points:  # written so that NaN fails
        raise AccuracyError(f"int8 accuracy drop {report.drop_points:.2f} points exceeds --max-accuracy-drop "
                            f"{max_drop_points:g} ({report.summary()})")
