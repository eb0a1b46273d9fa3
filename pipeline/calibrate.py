"""Int8 calibration: activation statistics, clipping-range selection, quantization parameters, and the
calibration feeds themselves. Pure numpy (Pillow for image folders); nothing here knows about TVM.

    TensorObserver          - min / max / count and a histogram of one activation over many batches
    calibrate_*             - (obs) -> (lo, hi) clipping range, lo <= 0 <= hi, lo == 0 for non-negative data
    quant_params            - (lo, hi, dtype) -> scale / zero point (uint8 asymmetric, int8 symmetric)
    weight_scales           - symmetric per-output-channel int8 weight scales, and quantize_weight
    load_calibration_data   - .npy / .npz / image folder / seeded synthetic feeds, batched like the model

The histogram keeps positive values and magnitudes of negative values apart, each on a grid whose top is the
smallest power of two >= that side's max. A wider batch doubles the top and merges bin pairs, which is
exact: the histogram is the same whatever the order and split of the batches, and zero is always a bin
edge (exact zeros, e.g. after ReLU, are counted apart since they quantize without error).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.importer import TensorSpec
from pipeline.verify import seeded_inputs

log = logging.getLogger(__name__)

QUANT_DTYPES = ("uint8", "int8")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Below float32's smallest normal a scale's reciprocal overflows float32, the dtype the graph divides in.
_TINY = float(np.finfo(np.float32).tiny)
# Keeps bins * 2**-exponent finite for subnormal maxima.
_MIN_EXPONENT = -1000


def _ceil_log2(v: float) -> int:
    """The smallest e with 2**e >= v (v > 0), exactly (no float log)."""
    mantissa, exponent = math.frexp(v)      # v = mantissa * 2**exponent, mantissa in [0.5, 1)
    return max(exponent - 1 if mantissa == 0.5 else exponent, _MIN_EXPONENT)


def _merge(counts: np.ndarray, doublings: int) -> np.ndarray:
    """`counts` re-binned onto a grid 2**doublings times wider: bin i lands in bin i >> doublings."""
    out = np.zeros_like(counts)
    np.add.at(out, np.arange(counts.size) >> min(doublings, 62), counts)
    return out


class _HalfHistogram:
    """Counts of strictly positive values in `slots` bins over [0, 2**exponent]."""

    def __init__(self, slots: int) -> None:
        self.counts = np.zeros(slots, np.int64)
        self.exponent: int | None = None    # None until the first value
        self.amax = 0.0

    def add(self, v: np.ndarray) -> None:
        if v.size == 0:
            return
        amax = float(v.max())
        self.amax = max(self.amax, amax)
        exponent = _ceil_log2(amax)
        if self.exponent is None:
            self.exponent = exponent
        elif exponent > self.exponent:
            self.counts = _merge(self.counts, exponent - self.exponent)
            self.exponent = exponent
        slots = self.counts.size
        idx = (v * math.ldexp(slots, -self.exponent)).astype(np.int64)
        self.counts += np.bincount(np.minimum(idx, slots - 1), minlength=slots)

    def at(self, exponent: int) -> np.ndarray:
        """The counts on the grid of a top 2**exponent >= this one's."""
        if self.exponent is None:
            return np.zeros_like(self.counts)
        return _merge(self.counts, exponent - self.exponent) if exponent > self.exponent else self.counts

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.exponent) / self.counts.size if self.exponent is not None else 0.0

    def used(self) -> np.ndarray:
        """The counts up to the bin holding the max."""
        nonzero = np.flatnonzero(self.counts)
        return self.counts[: nonzero[-1] + 1] if nonzero.size else self.counts[:0]


class TensorObserver:
    """Statistics of one activation tensor over calibration batches, in bounded memory.

    `bins` is the resolution: at least that many bins cover [0, max] of each sign (up to twice as many are
    kept, since each side's grid tops out at the next power of two)."""

    def __init__(self, bins: int = 2048) -> None:
        if bins < 16:
            raise UserError(f"an observer needs at least 16 histogram bins, got {bins}")
        self.bins = bins
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.zero_count = 0
        self._pos = _HalfHistogram(2 * bins)
        self._neg = _HalfHistogram(2 * bins)     # magnitudes of the negative values

    def update(self, x: np.ndarray) -> None:
        v = np.asarray(x, dtype=np.float64).ravel()
        if v.size == 0:
            return
        finite = np.isfinite(v)
        if not finite.all():
            raise UserError(f"a calibration batch has {v.size - int(finite.sum())} NaN/Inf values of "
                            f"{v.size}; check the calibration data and the float model")
        self.count += v.size
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))
        self.zero_count += int(np.count_nonzero(v == 0))
        self._pos.add(v[v > 0])
        self._neg.add(-v[v < 0])

    @property
    def empty(self) -> bool:
        return self.count == 0

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """(counts, edges) over the signed axis, negative bins first; the exact zeros are a bin of zero
        width at 0, so len(edges) == len(counts) + 1 and edges is non-decreasing."""
        neg, pos = self._neg.used()[::-1], self._pos.used()
        edges = np.concatenate([-self._neg.width * np.arange(neg.size, -1, -1), [0.0],
                                self._pos.width * np.arange(1, pos.size + 1)])
        return np.concatenate([neg, [self.zero_count], pos]).astype(np.int64), edges

    def abs_histogram(self) -> tuple[np.ndarray, float]:
        """(counts, width): |x| of the non-zero values in bins [i * width, (i + 1) * width), up to the
        bin holding max |x|."""
        exps = [h.exponent for h in (self._pos, self._neg) if h.exponent is not None]
        if not exps:
            return np.zeros(0, np.int64), 0.0
        top = max(exps)
        counts = self._pos.at(top) + self._neg.at(top)
        nonzero = np.flatnonzero(counts)
        return counts[: nonzero[-1] + 1], math.ldexp(1.0, top) / counts.size


# --- range selection --------------------------------------------------------------------------------------

Range = tuple[float, float]


def _require_data(obs: TensorObserver) -> None:
    if obs.empty:
        raise UserError("no calibration values were observed for a tensor; give at least one sample")


def _trivial(obs: TensorObserver) -> Range | None:
    """The range when there is nothing to choose: every observed value is the same constant."""
    _require_data(obs)
    return calibrate_minmax(obs) if obs.min == obs.max else None


def _symmetric(obs: TensorObserver, t: float) -> Range:
    """The range clipped at |x| <= t, never wider than what was seen, with lo == 0 for non-negative data."""
    return min(0.0, max(obs.min, -t)), max(0.0, min(obs.max, t))


def calibrate_minmax(obs: TensorObserver) -> Range:
    _require_data(obs)
    return min(obs.min, 0.0), max(obs.max, 0.0)


def calibrate_percentile(obs: TensorObserver, percentile: float = 99.99) -> Range:
    """Each tail beyond the `percentile`-th percentile (and below the (100 - percentile)-th) is clipped."""
    if not 50.0 < percentile <= 100.0:
        raise UserError(f"the calibration percentile must be in (50, 100], got {percentile}")
    trivial = _trivial(obs)
    if trivial:
        return trivial
    counts, edges = obs.histogram()
    cum = np.concatenate([[0], np.cumsum(counts)])

    def quantile(q: float) -> float:
        # Values are taken as uniform within a bin; the zero bin has no width, so ties at 0 stay at 0.
        target = q * obs.count
        j = int(np.clip(np.searchsorted(cum, target, side="left"), 1, counts.size))
        frac = np.clip((target - cum[j - 1]) / max(int(counts[j - 1]), 1), 0.0, 1.0)
        return float(edges[j - 1] + frac * (edges[j] - edges[j - 1]))

    lo = 0.0 if obs.min >= 0 else min(0.0, max(obs.min, quantile(1.0 - percentile / 100.0)))
    return lo, max(0.0, min(obs.max, quantile(percentile / 100.0)))


def calibrate_entropy(obs: TensorObserver, bins_out: int | None = None) -> Range:
    """TensorRT's threshold: the |x| clip t whose `bins_out`-level quantization of the histogram below t
    (clipped mass folded into the last bin) has the least KL divergence from it. `bins_out` defaults to 255
    for non-negative data (uint8) and 128 otherwise (int8, one sign)."""
    if bins_out is None:
        bins_out = 255 if obs.min >= 0 else 128
    if bins_out < 2:
        raise UserError(f"entropy calibration needs bins_out >= 2, got {bins_out}")
    trivial = _trivial(obs)
    if trivial:
        return trivial
    counts, width = obs.abs_histogram()
    n = counts.size
    amax = max(-obs.min, obs.max)
    if n <= bins_out:           # the histogram is no finer than the quantization grid: nothing to trade
        return calibrate_minmax(obs)
    # Coarse pass then full resolution around its best: KL is smooth in i at the scale of a few bins.
    stride = max(1, (n - bins_out) // 256)
    coarse = range(bins_out, n + 1, stride)
    best = min(coarse, key=lambda i: _kl(counts, i, bins_out))
    fine = range(max(bins_out, best - stride), min(n, best + stride) + 1)
    best = min(fine, key=lambda i: _kl(counts, i, bins_out))
    t = amax if best == n else best * width
    log.debug("entropy threshold %.6g (bin %d of %d, max |x| %.6g)", t, best, n, amax)
    return _symmetric(obs, t)


def _kl(counts: np.ndarray, i: int, bins_out: int) -> float:
    """KL(P || Q): P the first i bins with the mass beyond added to bin i - 1, Q the first i bins merged
    into bins_out levels and spread back evenly over the bins where P is non-zero."""
    p = counts[:i].astype(np.float64)
    p[-1] += counts[i:].sum()
    support = p > 0
    starts = (np.arange(bins_out) * i) // bins_out
    sizes = np.diff(np.append(starts, i))
    level_mass = np.add.reduceat(counts[:i].astype(np.float64), starts)
    level_support = np.add.reduceat(support.astype(np.float64), starts)
    q = np.repeat(level_mass / np.maximum(level_support, 1.0), sizes) * support
    # Only the last level can be empty where P is not (the clipped mass sits there): 1e-4 of a count
    # keeps the divergence finite but large, like MXNet's / TVM's smoothing of this search.
    q[support & (q == 0)] = 1e-4
    p, q = p[support] / p.sum(), q[support] / q[support].sum()
    return float(np.sum(p * np.log(p / q)))


class _Side:
    """Squared-error bookkeeping for one side of the histogram (|x| of one sign, or of both), values taken
    as uniform within a bin. Candidate clip points are the bin edges t_k = k * width, k = 1..n, the last
    one moved down to the exact max."""

    def __init__(self, counts: np.ndarray, width: float, amax: float) -> None:
        if counts.size == 0:                # a side with no values: one candidate, t = 0, costing nothing
            counts, width, amax = np.zeros(1), 1.0, 0.0
        n = counts.size
        c = counts.astype(np.float64)
        j = np.arange(n, dtype=np.float64)
        k = j + 1
        self.width = width
        self.t = np.minimum(k * width, amax)
        self.t[-1] = amax
        # Sums over the bins below edge m (m = 0..n) of the counts and of x^2 (a bin [a, a + w) holds
        # count * (a^2 + a w + w^2 / 3) of it).
        self.p0 = np.concatenate([[0.0], np.cumsum(c)])
        self.p2 = np.concatenate([[0.0], np.cumsum(c * width * width * (j * j + j + 1 / 3))])
        self.inside = self.p0[1:]

        def beyond(a: np.ndarray) -> np.ndarray:       # sums over the bins >= k, k = 1..n
            return np.append(np.cumsum(a[::-1])[::-1], 0.0)[1:]
        s0, s1, s2 = beyond(c), beyond(c * j), beyond(c * j * j)
        # Clipping a bin [a, a + w) at t <= a costs count * ((a - t)^2 + (a - t) w + w^2 / 3), summed
        # here through the moments of the bins beyond t.
        clip = width * width * (s2 - 2 * k * s1 + k * k * s0 + s1 - k * s0 + s0 / 3)
        self.clip = np.maximum(clip, 0.0)

    def rounding(self, step: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Rounding error of the values inside t_k on a grid of `step` through 0: values within step / 2
        of 0 round to 0 and cost x^2; the others cost step^2 / 12 on average. (A flat step^2 / 12 would
        charge a bulk far narrower than the step, e.g. beside huge outliers, far more than it costs.)"""
        n = self.p0.size - 1
        u = np.minimum(step / 2, self.t[k])
        m = np.minimum((u / self.width).astype(np.int64), n - 1)
        a = m * self.width
        # The bins below m whole, and the part of bin m below u (a uniform bin's x^2 is not linear in u).
        count_m = (self.p0[m + 1] - self.p0[m]) / self.width
        near0 = self.p0[m] + count_m * (u - a)
        near0_sq = self.p2[m] + count_m * (u ** 3 - a ** 3) / 3
        return near0_sq + (self.inside[k] - near0) * step * step / 12


def calibrate_mse(obs: TensorObserver, dtype: str | None = None) -> Range:
    """The range whose quantization to `dtype` has the least expected squared error over all observed
    values, clipping and rounding (exact zeros cost nothing). `dtype` defaults to uint8 for non-negative
    data and int8 (symmetric) otherwise.

    This weighs every value alike: a few outliers far out can be worth more than the bulk's resolution,
    and then the range stays wide (unlike entropy, which matches the histogram's shape)."""
    dtype = dtype or ("uint8" if obs.min >= 0 else "int8")
    _check_dtype(dtype)
    trivial = _trivial(obs)
    if trivial:
        return trivial
    if obs.min >= 0 or dtype == "int8":
        # One threshold: [0, t] in 255 (uint8) or 127 (int8) steps, or [-t, t] in 2 * 127 steps.
        side = _Side(*obs.abs_histogram(), max(-obs.min, obs.max))
        k = np.arange(side.t.size)
        err = side.clip + side.rounding(side.t / (255 if dtype == "uint8" else 127), k)
        return _symmetric(obs, float(side.t[np.argmin(err)]))
    # uint8 on signed data: both ends share the step (hi - lo) / 255, so the search is over pairs: every
    # 16th-ish candidate of each side first, then all of them around the best pair.
    neg = _Side(obs._neg.used(), obs._neg.width, obs._neg.amax)
    pos = _Side(obs._pos.used(), obs._pos.width, obs._pos.amax)

    def best_pair(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
        step = (neg.t[a, None] + pos.t[None, b]) / 255
        err = (neg.clip[a, None] + pos.clip[None, b] + neg.rounding(step, a[:, None])
               + pos.rounding(step, b[None, :]))
        i, j = np.unravel_index(int(np.argmin(err)), err.shape)
        return int(a[i]), int(b[j])

    def coarse(size: int) -> np.ndarray:
        return np.unique(np.linspace(0, size - 1, min(size, 257)).round().astype(np.int64))

    def around(i: int, size: int) -> np.ndarray:
        reach = size // 256 + 1
        return np.arange(max(0, i - reach), min(size, i + reach + 1))

    a, b = best_pair(coarse(neg.t.size), coarse(pos.t.size))
    a, b = best_pair(around(a, neg.t.size), around(b, pos.t.size))
    return -float(neg.t[a]), float(pos.t[b])


CALIBRATION_METHODS: dict[str, Callable[..., Range]] = {
    "minmax": calibrate_minmax,
    "percentile": calibrate_percentile,
    "entropy": calibrate_entropy,
    "mse": calibrate_mse,
}


def calibration_range(obs: TensorObserver, method: str, **options) -> Range:
    """`options` go to the method (percentile=, bins_out=, dtype=)."""
    fn = CALIBRATION_METHODS.get(method)
    if fn is None:
        raise UserError(f"unknown calibration method {method!r}; choose one of "
                        f"{', '.join(sorted(CALIBRATION_METHODS))}")
    lo, hi = fn(obs, **options)
    return float(lo), float(hi)


# --- quantization parameters ------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantParams:
    scale: float          # a float32 value, so numpy and the compiled graph quantize alike
    zero_point: int
    dtype: str


def _check_dtype(dtype: str) -> None:
    if dtype not in QUANT_DTYPES:
        raise UserError(f"unknown quantized dtype {dtype!r}; choose one of {', '.join(QUANT_DTYPES)}")


def quant_params(lo: float, hi: float, dtype: str) -> QuantParams:
    """uint8: asymmetric, zero point chosen so 0.0 is exact (0 when lo == 0); int8: symmetric, zero point 0.
    A zero range (an all-zero tensor) gets scale 1, as in ONNX Runtime: any scale is exact on it."""
    _check_dtype(dtype)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise UserError(f"invalid quantization range [{lo}, {hi}]")
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    span = (hi - lo) / 255 if dtype == "uint8" else max(-lo, hi) / 127
    with np.errstate(over="ignore"):
        scale = float(np.float32(span))
    if not math.isfinite(scale):
        raise UserError(f"quantization range [{lo}, {hi}] is too wide for a float32 scale")
    if scale < _TINY:
        scale = 1.0
    if dtype == "int8":
        return QuantParams(scale, 0, dtype)
    return QuantParams(scale, int(np.clip(np.rint(-lo / scale), 0, 255)), dtype)


def _channel_shape(ndim: int, axis: int) -> list[int]:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for a {ndim}-d weight")
    shape = [1] * ndim
    shape[axis] = -1
    return shape


def weight_scales(w: np.ndarray, axis: int, qmax: int = 127) -> np.ndarray:
    """Symmetric int8 scale per slice along `axis` (the output channels): max |w| over the other axes / qmax
    (127; 63 for kernels whose int16 pair sums must not saturate), float32. An all-zero channel gets scale 1 (its weights are 0 at any scale, and a tiny scale would blow
    up the bias / (x_scale * w_scale) the integer kernels add); others are floored at float32's tiny."""
    w = np.asarray(w)
    _channel_shape(w.ndim, axis)
    if not np.isfinite(w).all():
        raise UserError("a weight tensor has NaN/Inf values; the float model is broken")
    amax = np.max(np.abs(w.astype(np.float64)), axis=tuple(i for i in range(w.ndim) if i != axis % w.ndim))
    return np.where(amax > 0, np.maximum(amax / qmax, _TINY), 1.0).astype(np.float32)


def quantize_weight(w: np.ndarray, scales: np.ndarray, axis: int, qmax: int = 127) -> np.ndarray:
    """round(w / scale) half to even, clipped to [-qmax, qmax] (symmetric: -128 is never used), int8."""
    w = np.asarray(w)
    shape = _channel_shape(w.ndim, axis)
    scales = np.asarray(scales, np.float64)
    if scales.shape != (w.shape[axis],) or not (scales > 0).all():
        raise ValueError(f"need {w.shape[axis]} positive scales for axis {axis}, got shape {scales.shape}")
    q = np.rint(w.astype(np.float64) / scales.reshape(shape))
    return np.clip(q, -qmax, qmax).astype(np.int8)


# --- calibration data -------------------------------------------------------------------------------------

@dataclass
class CalibrationSet:
    samples: list[dict[str, np.ndarray]]    # one feed per inference, each shaped like the model's inputs
    source: str
    synthetic: bool


def load_calibration_data(path: Path | None, specs: list[TensorSpec], task: str, count: int = 16,
                          seed: int = 0, image_size: tuple[int, int] | None = None) -> CalibrationSet:
    """Up to `count` feeds from `path` (a .npy for a single-input model, a .npz keyed by input name, or a
    folder of images for an image model), or `count` seeded synthetic feeds when `path` is None.

    Arrays carry samples on their leading axis and are cut into feeds of the model's batch size.
    `image_size` (height, width) is the crop for image folders, by default the input's spatial shape."""
    if count < 1:
        raise UserError(f"the number of calibration samples must be >= 1, got {count}")
    if path is None:
        log.warning("no calibration data given: activation ranges come from %d seeded random feeds, "
                    "which real inputs need not resemble; int8 accuracy is unproven", count)
        return CalibrationSet([seeded_inputs(specs, seed + i) for i in range(count)],
                              f"synthetic (seeds {seed}..{seed + count - 1})", True)
    path = Path(path)
    if not path.exists():
        raise UserError(f"calibration data not found: {path}")
    if path.is_dir():
        samples = _image_feeds(path, specs, task, count, image_size)
    elif path.suffix.lower() == ".npy":
        if len(specs) != 1:
            raise UserError(f"a .npy file feeds a single-input model; this one has inputs "
                            f"{', '.join(s.name for s in specs)}: give an .npz keyed by input name")
        samples = _array_feeds({specs[0].name: _load(path, np.ndarray)}, specs, count, path)
    elif path.suffix.lower() == ".npz":
        samples = _array_feeds(_load_npz(path, specs), specs, count, path)
    else:
        raise UserError(f"calibration data must be a .npy or .npz file or a folder of images, got {path}")
    log.info("calibration data: %d feeds from %s", len(samples), path)
    return CalibrationSet(samples, str(path), False)


def _load(path: Path, kind: type) -> np.ndarray | np.lib.npyio.NpzFile:
    """np.load without pickles, insisting on an array (.npy) or an archive (.npz) as the suffix says."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} as numpy data: {str(exc).splitlines()[0]}") from exc
    if not isinstance(loaded, kind):
        if isinstance(loaded, np.lib.npyio.NpzFile):
            loaded.close()
        raise UserError(f"{path} holds {'an .npz archive' if kind is np.ndarray else 'a single array'}, "
                        f"not what its suffix says")
    return loaded


def _load_npz(path: Path, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    with _load(path, np.lib.npyio.NpzFile) as archive:
        names = set(archive.files)
        missing = [s.name for s in specs if s.name not in names]
        if missing:
            raise UserError(f"{path} lacks arrays for model input(s) {', '.join(missing)} "
                            f"(it has {', '.join(sorted(names)) or 'none'})")
        extra = sorted(names - {s.name for s in specs})
        if extra:
            # Not a warning: an archive may hold more than inputs (labels for an accuracy check, say).
            log.info("%s: ignoring arrays %s, which are no model input", path, ", ".join(extra))
        try:
            return {s.name: archive[s.name] for s in specs}
        except (OSError, ValueError) as exc:     # a pickled or corrupt member
            raise UserError(f"cannot read {path}: {str(exc).splitlines()[0]}") from exc


def _cast(name: str, a: np.ndarray, dtype: str) -> np.ndarray:
    """`a` as `dtype` where no value changes kind (float -> int would truncate) or overflows."""
    target = np.dtype(dtype)
    if not np.can_cast(a.dtype, target, casting="same_kind"):
        raise UserError(f"calibration data for input {name!r} is {a.dtype}, which does not cast to {dtype}")
    if target.kind in "iu" and a.size and a.dtype.kind in "iu":
        info = np.iinfo(target)
        if a.min() < info.min or a.max() > info.max:
            raise UserError(f"calibration data for input {name!r} has values outside {dtype}'s range")
    return a.astype(target, copy=False)


def _array_feeds(arrays: dict[str, np.ndarray], specs: list[TensorSpec], count: int,
                 path: Path) -> list[dict[str, np.ndarray]]:
    """Cut each input's samples (leading axis) into batches of the input's batch size."""
    batches: dict[str, list[np.ndarray]] = {}
    for s in specs:
        a = arrays[s.name]
        batch, sample_shape = (s.shape[0], tuple(s.shape[1:])) if s.shape else (1, ())
        if a.ndim < 1 or tuple(a.shape[1:]) != sample_shape:
            expected = "(N" + "".join(f", {d}" for d in sample_shape) + ")"
            raise UserError(f"calibration data for input {s.name!r}: expected shape {expected} for N "
                            f"samples, got {tuple(a.shape)}")
        a = _cast(s.name, a, s.dtype)
        usable = min(a.shape[0] // batch, count)
        if usable == 0:
            raise UserError(f"calibration data for input {s.name!r} has {a.shape[0]} samples, fewer than "
                            f"one batch of {batch}")
        if usable < count and a.shape[0] % batch:
            log.warning("%s: input %s: dropping the last %d samples, not a whole batch of %d", path, s.name,
                        a.shape[0] % batch, batch)
        batches[s.name] = [a[i * batch:(i + 1) * batch].reshape(s.shape) for i in range(usable)]
    sizes = {name: len(b) for name, b in batches.items()}
    if len(set(sizes.values())) > 1:
        raise UserError(f"calibration inputs give different numbers of batches: "
                        f"{', '.join(f'{k}: {v}' for k, v in sizes.items())}")
    return [{name: b[i] for name, b in batches.items()} for i in range(min(sizes.values()))]


def _image_input(specs: list[TensorSpec], task: str) -> TensorSpec:
    """The input an image folder feeds. A model loaded from an .onnx path has task "generic", so one float
    NCHW input with 3 channels counts as an image model too."""
    if task not in ("image", "generic"):
        raise UserError(f"an image folder is calibration data for image models, and this is a {task} "
                        f"model: give a .npy or .npz file")
    nchw_rgb = (len(specs) == 1 and len(specs[0].shape) == 4 and specs[0].shape[1] == 3
                and specs[0].dtype.startswith("float"))
    if not nchw_rgb:
        got = ", ".join(f"{s.name} {list(s.shape)} {s.dtype}" for s in specs)
        raise UserError(f"an image folder feeds one float NCHW input with 3 channels (RGB); this model "
                        f"takes {got}: give a .npy or .npz file")
    return specs[0]


def _image_feeds(folder: Path, specs: list[TensorSpec], task: str, count: int,
                 image_size: tuple[int, int] | None) -> list[dict[str, np.ndarray]]:
    spec = _image_input(specs, task)
    batch = spec.shape[0]
    height, width = tuple(image_size or spec.shape[2:4])
    if (height, width) != tuple(spec.shape[2:4]):
        raise UserError(f"image size {height}x{width} does not match input {spec.name!r} of shape "
                        f"{list(spec.shape)}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    if len(files) < batch:
        raise UserError(f"{folder} has {len(files)} images, fewer than one batch of {batch}")
    usable = min(len(files) // batch, count)
    if usable < count and len(files) % batch:
        log.warning("%s: dropping the last %d images, not a whole batch of %d", folder, len(files) % batch,
                    batch)
    files = files[: usable * batch]
    images = np.stack([imagenet_preprocess(f, height, width) for f in files]).astype(spec.dtype)
    return [{spec.name: images[i * batch:(i + 1) * batch]} for i in range(usable)]


def imagenet_preprocess(file: Path, height: int, width: int) -> np.ndarray:
    """torchvision's ImageNet eval transform: shorter side to round(size * 256 / 224) (bilinear), center
    crop, RGB in [0, 1], normalized by the ImageNet mean and std; float32 [3, height, width]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            rgb = img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UserError(f"cannot read image {file}: {str(exc).splitlines()[0]}") from exc
    # max(): a non-square crop must fit inside the resized image whichever side is shorter.
    short = round(max(height, width) * 256 / 224)
    w, h = rgb.size
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    rgb = rgb.resize(size, Image.Resampling.BILINEAR)
    left, top = round((size[0] - width) / 2), round((size[1] - height) / 2)
    rgb = rgb.crop((left, top, left + width, top + height))
    x = (np.asarray(rgb, np.float32) / 255.0 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    return np.ascontiguousarray(x.transpose(2, 0, 1), np.float32)
