"""Stage 2b, quantize: calibrate activation ranges on the float model, rewrite conv2d / matmul to
int8, and keep the layers whose error breaks the accuracy bound in fp32.

    calibrate  - one build of the float model that also returns every quantized layer's input
                 (passes.quantize.observer_module), run over the calibration set
    sensitivity- per layer, the relative error of its output when only it is quantized, from the
                 observed inputs (numpy), which orders the fp32 fallback
    gate       - the int8 build against the fp32 reference on a seeded set that calibration did not
                 see; while the drop exceeds the bound, the most sensitive int8 layers go back to
                 fp32 (1, 2, 4, ... of them), then the run fails if it still does not hold
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipeline.accuracy import AccuracyReport, compare_classifier, compare_embeddings, compare_labelled
from pipeline.calibrate import (
    CalibrationSet,
    QuantParams,
    TensorObserver,
    calibration_range,
    quant_params,
    quantize_weight,
    weight_scales,
)
from pipeline.errors import UserError
from pipeline.passes.quantize import QuantPlan, QuantSite, find_sites, observer_module, quantize_int8

log = logging.getLogger(__name__)


@dataclass
class QuantizeSettings:
    method: str = "percentile"          # calibration_range method
    keep_fp32: list[str] = field(default_factory=list)
    max_accuracy_drop: float = 1.0      # percentage points
    fallback_rounds: int = 4


@dataclass
class LayerReport:
    name: str
    kind: str
    shape: str
    macs: int
    int8: bool
    reason: str = ""                    # why it stayed fp32
    range: tuple[float, float] = (0.0, 0.0)
    scale: float = 0.0
    zero_point: int = 0
    dtype: str = ""
    sensitivity: float = 0.0            # relative output error with only this layer in int8

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class Calibration:
    sites: list[QuantSite]
    plan: QuantPlan
    layers: dict[str, LayerReport]
    seconds: float


Runner = Callable[[object], Callable[[list[np.ndarray]], list[np.ndarray]]]


def calibrate(mod, sites: list[QuantSite], data: CalibrationSet, compile_fn: Runner, method: str,
              act_dtype: str, keep_fp32: list[str], weight_max: int = 127) -> Calibration:
    """Ranges and quantization parameters for every site's input; `compile_fn` turns a Relax
    module (graph passes up to this stage) into a callable on numpy inputs."""
    start = time.perf_counter()
    names = {s.name for s in sites}
    unknown = sorted(set(keep_fp32) - names)
    if unknown:
        raise UserError(f"--keep-fp32: no layer named {', '.join(unknown)}; the quantizable layers "
                        f"are {_name_range(sites)}")
    run = compile_fn(observer_module(mod, sites))
    observed = list(dict.fromkeys(s.data for s in sites))
    observers = {v: TensorObserver() for v in observed}
    kept: dict = {}
    for i, feed in enumerate(data.samples):
        outs = run(feed)
        acts = outs[len(outs) - len(observed):]        # main returns (outputs..., observed...)
        for v, x in zip(observed, acts):
            observers[v].update(x)
            if i == 0:
                kept[v] = x
    plan, layers = QuantPlan(weight_max=weight_max), {}
    for s in sites:
        lo, hi = calibration_range(observers[s.data], method)
        params = quant_params(lo, hi, act_dtype)
        report = LayerReport(s.name, s.kind, "x".join(str(d) for d in s.weight.shape), s.macs, True,
                             range=(float(lo), float(hi)), scale=params.scale,
                             zero_point=params.zero_point, dtype=params.dtype)
        report.sensitivity = layer_sensitivity(s, kept[s.data], params, weight_max)
        why = unsupported(s)
        if why or s.name in keep_fp32:
            report.int8, report.reason = False, why or "--keep-fp32"
            plan.keep_fp32[s.name] = report.reason
        plan.activations[s.name] = params
        layers[s.name] = report
    seconds = time.perf_counter() - start
    log.info("calibrated %d layers on %d samples (%s, %s) in %.1fs", len(sites), len(data.samples),
             data.source, method, seconds)
    return Calibration(sites, plan, layers, seconds)


def _name_range(sites: list[QuantSite]) -> str:
    kinds: dict[str, int] = {}
    for s in sites:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    return ", ".join(f"{k}_0..{k}_{n - 1}" for k, n in kinds.items()) or "none"


def unsupported(site: QuantSite) -> str:
    """Why a site stays fp32 regardless of accuracy (shapes the integer kernels cannot take)."""
    if site.kind == "conv2d":
        out_ch, in_ch = site.weight.shape[0], site.weight.shape[3]
    else:
        in_ch, out_ch = site.weight.shape
    if site.kind == "matmul" and in_ch % 4:
        return f"input features {in_ch} not a multiple of 4 (dot-product depth)"
    if site.kind == "conv2d" and out_ch % 16:
        return f"output channels {out_ch} not a multiple of 16 (vector lanes)"
    return ""


def layer_sensitivity(site: QuantSite, x: np.ndarray, act: QuantParams, weight_max: int = 127) -> float:
    """||op(fq(x), fq(W)) - op(x, W)|| / ||op(x, W)|| for one observed input."""
    axis = site.channels_last_axis
    scales = weight_scales(site.weight, axis, weight_max)
    wq = quantize_weight(site.weight, scales, axis, weight_max).astype(np.float32)
    shape = [1] * wq.ndim
    shape[axis] = -1
    w_fq = wq * scales.reshape(shape)
    q = np.clip(np.round(x / act.scale) + act.zero_point, *_bounds(act.dtype))
    x_fq = ((q - act.zero_point) * act.scale).astype(np.float32)
    ref, approx = _apply(site, x, site.weight), _apply(site, x_fq, w_fq)
    return float(np.linalg.norm(approx - ref) / max(np.linalg.norm(ref), 1e-12))


def _bounds(dtype: str) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _apply(site: QuantSite, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    if site.kind == "matmul":
        return x @ w
    a = site.attrs
    top, left, bottom, right = a["padding"]
    xp = np.pad(x, [(0, 0), (top, bottom), (left, right), (0, 0)])
    kh, kw = w.shape[1:3]
    (sh, sw), (dh, dw) = a["strides"], a["dilation"]
    n, h, wd, _ = xp.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (wd - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, oh, ow, w.shape[0]), np.float32)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
            out += patch @ w[:, i, j, :].T
    return out


def fallback_order(cal: Calibration) -> list[str]:
    """Int8 layers, most sensitive first."""
    layers = [r for r in cal.layers.values() if r.int8]
    return [r.name for r in sorted(layers, key=lambda r: -r.sensitivity)]


def apply_plan(mod, cal: Calibration):
    return quantize_int8(mod, cal.sites, cal.plan)


def keep_in_fp32(cal: Calibration, names: list[str], reason: str) -> None:
    for name in names:
        cal.plan.keep_fp32[name] = reason
        cal.layers[name].int8, cal.layers[name].reason = False, reason


def sites_of(mod) -> list[QuantSite]:
    return find_sites(mod["main"])


@dataclass
class EvalSet:
    """What the int8 model is judged on: seeded feeds (never the calibration ones) with the fp32
    reference outputs, or labelled real data."""

    feeds: list[dict[str, np.ndarray]]
    reference: list[list[np.ndarray]]
    kind: str                                   # "classifier" or "embeddings"
    labels: np.ndarray | None = None            # per feed row, for labelled data

    def report(self, run: Callable[[dict], list[np.ndarray]]) -> AccuracyReport:
        outs = [run(feed)[0] for feed in self.feeds]
        if self.labels is not None:
            ref = np.concatenate([r[0] for r in self.reference]).argmax(-1)
            got = np.concatenate(outs).argmax(-1)
            n = len(self.labels)
            return compare_labelled(float((ref[:n] == self.labels).mean()),
                                    float((got[:n] == self.labels).mean()), n)
        refs = [r[0] for r in self.reference]
        return compare_classifier(refs, outs) if self.kind == "classifier" else \
            compare_embeddings(refs, outs)


def eval_set(feeds: list[dict[str, np.ndarray]], reference: Callable[[dict], list[np.ndarray]],
             labels: np.ndarray | None = None) -> EvalSet:
    ref = [reference(f) for f in feeds]
    first = ref[0][0]
    kind = "classifier" if first.ndim == 2 and first.shape[-1] > 1 else "embeddings"
    return EvalSet(feeds, ref, kind, labels)


@dataclass
class QuantizeOutcome:
    mod: object                                 # the int8 Relax module (before the later passes)
    calibration: Calibration
    report: AccuracyReport
    rounds: list[dict] = field(default_factory=list)   # int8 layers and drop per gate round

    def table(self) -> list[dict]:
        return [r.as_dict() for r in self.calibration.layers.values()]

    @property
    def int8_macs_fraction(self) -> float:
        layers = self.calibration.layers.values()
        total = sum(r.macs for r in layers) or 1
        return sum(r.macs for r in layers if r.int8) / total


def quantize_model(mod, data: CalibrationSet, evaluation: EvalSet, compile_fn: Runner,
                   settings: QuantizeSettings, act_dtype: str, weight_max: int = 127) -> QuantizeOutcome:
    """Calibrate, rewrite, and move sensitive layers back to fp32 until the accuracy bound holds
    on `evaluation` (or the rounds run out; the caller's gate then fails the run)."""
    sites = sites_of(mod)
    if not sites:
        raise UserError("--quantize int8: the model has no conv2d or matmul with constant weights")
    cal = calibrate(mod, sites, data, compile_fn, settings.method, act_dtype, settings.keep_fp32,
                    weight_max)
    order, take = fallback_order(cal), 1
    rounds: list[dict] = []
    while True:
        qmod = apply_plan(mod, cal)
        report = evaluation.report(compile_fn(qmod))
        rounds.append({"int8_layers": sum(r.int8 for r in cal.layers.values()),
                       "drop_points": round(report.drop_points, 4)})
        log.info("int8 gate round %d: %d int8 layers, accuracy drop %.3f points", len(rounds),
                 rounds[-1]["int8_layers"], report.drop_points)
        if report.drop_points <= settings.max_accuracy_drop or not order \
                or len(rounds) > settings.fallback_rounds:
            return QuantizeOutcome(qmod, cal, report, rounds)
        keep_in_fp32(cal, order[:take], f"accuracy fallback (round {len(rounds)})")
        order, take = order[take:], take * 2
