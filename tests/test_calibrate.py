"""Int8 calibration (pure numpy, no TVM): range methods on distributions whose answer is known, observers
over batches that widen the range, quantization parameters, and the calibration data loaders."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.calibrate import (
    CALIBRATION_METHODS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TensorObserver,
    calibrate_entropy,
    calibrate_minmax,
    calibrate_mse,
    calibrate_percentile,
    calibration_range,
    load_calibration_data,
    quant_params,
    quantize_weight,
    weight_scales,
)
from pipeline.errors import UserError
from pipeline.importer import TensorSpec
from pipeline.verify import seeded_inputs

NORMAL_999 = 3.090232306167813     # Phi^-1(0.999)
NORMAL_9999 = 3.719016485455709    # Phi^-1(0.9999)


def observe(*batches: np.ndarray, bins: int = 2048) -> TensorObserver:
    obs = TensorObserver(bins)
    for b in batches:
        obs.update(b)
    return obs


def fake_quant(x: np.ndarray, lo: float, hi: float, dtype: str) -> np.ndarray:
    """x quantized with quant_params(lo, hi, dtype) and dequantized, as the integer kernels see it."""
    p = quant_params(lo, hi, dtype)
    qmin, qmax = (0, 255) if dtype == "uint8" else (-127, 127)
    q = np.clip(np.rint(x / p.scale) + p.zero_point, qmin, qmax)
    return (q - p.zero_point) * p.scale


def mse(x: np.ndarray, lo: float, hi: float, dtype: str) -> float:
    return float(np.mean((fake_quant(x, lo, hi, dtype) - x) ** 2))


# --- range methods ----------------------------------------------------------------------------------------

def test_minmax_is_the_exact_range_and_includes_zero():
    x = np.random.default_rng(0).uniform(-2.0, 3.0, 10_000)
    obs = observe(x[:4000], x[4000:])
    assert calibrate_minmax(obs) == (x.min(), x.max())
    assert obs.count == 10_000
    positive = np.random.default_rng(1).uniform(1.0, 3.0, 1000)
    assert calibrate_minmax(observe(positive)) == (0.0, positive.max())


def test_percentile_matches_the_normal_quantiles():
    x = np.random.default_rng(0).standard_normal(1_000_000)
    obs = observe(x)
    lo, hi = calibrate_percentile(obs, 99.9)
    assert hi == pytest.approx(NORMAL_999, abs=0.02) and lo == pytest.approx(-NORMAL_999, abs=0.02)
    # Against the sample itself the histogram is off by at most about a bin (width 8 / 4096 here).
    assert hi == pytest.approx(np.percentile(x, 99.9), abs=4e-3)
    assert lo == pytest.approx(np.percentile(x, 0.1), abs=4e-3)
    assert calibrate_percentile(obs)[1] == pytest.approx(NORMAL_9999, abs=0.05)
    assert calibrate_percentile(obs, 100.0) == calibrate_minmax(obs)
    with pytest.raises(UserError, match="percentile"):
        calibrate_percentile(obs, 30.0)


def test_percentile_keeps_exact_zeros_at_zero():
    x = np.maximum(np.random.default_rng(0).standard_normal(100_000), 0)   # half of it exactly 0
    obs = observe(x)
    assert obs.zero_count == np.count_nonzero(x == 0)
    assert calibrate_percentile(obs, 99.0)[1] == pytest.approx(np.percentile(x, 99.0), abs=0.01)


@pytest.fixture(scope="module")
def gaussian_with_outliers() -> np.ndarray:
    """4M unit normals and three outliers at 25-40 sigma: rare enough that squared error, too, is
    better spent on the bulk than on them."""
    x = np.random.default_rng(0).standard_normal(1 << 22)
    x[[17, 1 << 20, 3 << 20]] = [30.0, -25.0, 40.0]
    return x


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_entropy_and_mse_clip_rare_outliers(gaussian_with_outliers, method):
    x = gaussian_with_outliers
    obs = observe(*np.split(x, 4))
    lo, hi = calibration_range(obs, method)
    assert calibrate_minmax(obs) == (-25.0, 40.0)
    assert 3.5 < hi < 6.0 and lo == -hi            # a few sigma, symmetric for a symmetric bulk
    bulk = np.delete(x, [17, 1 << 20, 3 << 20])
    assert mse(bulk, lo, hi, "int8") < mse(bulk, -25.0, 40.0, "int8") / 20
    assert mse(x, lo, hi, "int8") < mse(x, -25.0, 40.0, "int8") / 5


def test_mse_minimizes_the_real_error_even_when_outliers_win():
    """Three outliers at 400-1000 sigma in 256k values: clipping them costs more than the bulk's
    resolution gains, so the least-squares range stays wide; whatever it is, no symmetric threshold on
    a fine grid does noticeably better on the data itself."""
    x = np.random.default_rng(1).standard_normal(1 << 18)
    x[:3] = [1000.0, -700.0, 400.0]
    lo, hi = calibrate_mse(observe(x))
    grid = np.geomspace(1.0, 1000.0, 120)
    best = min(mse(x, -t, t, "int8") for t in grid)
    assert mse(x, lo, hi, "int8") <= best * 1.01
    assert hi > 300


@pytest.mark.parametrize("bins", [16, 32, 2048])
def test_mse_is_near_optimal_on_coarse_histograms(bins):
    """With 16 bins the bulk shares a bin or two with values the step resolves finely; the model of the
    error within a bin must still rank the thresholds as the data does."""
    x = np.random.default_rng(0).standard_normal(1 << 18)
    x[:2] = [30.0, -20.0]
    lo, hi = calibrate_mse(observe(x, bins=bins))
    best = min(mse(x, -t, t, "int8") for t in np.linspace(2.0, 30.0, 57))
    assert mse(x, lo, hi, "int8") <= best * 1.01


def test_mse_uint8_on_signed_data_is_locally_optimal():
    rng = np.random.default_rng(2)
    x = rng.gamma(2.0, 1.0, 1 << 18) - 1.0        # skewed: a short negative tail, a long positive one
    x[:2] = [60.0, -30.0]
    lo, hi = calibrate_mse(observe(x), dtype="uint8")
    assert -30.0 < lo < 0.0 < hi < 60.0 and hi > 3 * -lo
    err = mse(x, lo, hi, "uint8")
    assert err < mse(x, -30.0, 60.0, "uint8") / 1.5
    for f in (0.5, 0.8, 0.9, 1.1, 1.25, 2.0):
        assert err <= mse(x, lo * f, hi, "uint8") * 1.01
        assert err <= mse(x, lo, hi * f, "uint8") * 1.01


def test_mse_and_entropy_on_a_clean_gaussian():
    x = np.random.default_rng(3).standard_normal(1 << 20)
    obs = observe(x)
    # The least-squares clip of a unit normal at 8 bits is near 3.9 sigma.
    assert calibrate_mse(obs)[1] == pytest.approx(3.9, abs=0.2)
    assert 3.5 < calibrate_entropy(obs)[1] < 6.0


@pytest.mark.parametrize("method", sorted(CALIBRATION_METHODS))
def test_relu_output_gets_lo_zero(method):
    rng = np.random.default_rng(4)
    x = np.maximum(rng.standard_normal(200_000) * 2.0, 0.0)
    x[:2] = [30.0, 25.0]
    lo, hi = calibration_range(observe(x), method)
    assert lo == 0.0 and 0.0 < hi <= 30.0
    assert quant_params(lo, hi, "uint8").zero_point == 0


def test_widening_batches_give_the_histogram_of_the_concatenation():
    rng = np.random.default_rng(5)
    batches = [0.1 * rng.standard_normal(50_000), 10.0 * rng.standard_normal(50_000) + 3.0,
               rng.standard_normal(50_000), np.maximum(rng.standard_normal(50_000) * 50.0, 0.0)]
    whole = observe(np.concatenate(batches))
    for order in (batches, batches[::-1]):
        obs = observe(*order)
        counts, edges = obs.histogram()
        whole_counts, whole_edges = whole.histogram()
        assert np.array_equal(counts, whole_counts) and np.array_equal(edges, whole_edges)
        assert counts.sum() == obs.count == 200_000
        width = float(np.max(np.diff(edges)))
        for method in CALIBRATION_METHODS:
            got, want = calibration_range(obs, method), calibration_range(whole, method)
            assert got == pytest.approx(want, abs=width), method


def test_observer_memory_is_bounded():
    obs = TensorObserver(bins=64)
    rng = np.random.default_rng(6)
    for i in range(40):
        obs.update(rng.standard_normal(1000) * 2.0 ** (i - 20))
    counts, _ = obs.histogram()
    assert counts.size <= 2 * (2 * 64) + 1 and counts.sum() == 40_000
    assert calibrate_minmax(obs)[1] == obs.max


def test_bad_observations_and_unknown_methods():
    obs = TensorObserver()
    with pytest.raises(UserError, match="no calibration values"):
        calibration_range(obs, "minmax")
    with pytest.raises(UserError, match="NaN"):
        obs.update(np.array([1.0, np.nan]))
    obs.update(np.arange(10.0))
    with pytest.raises(UserError, match="entropy, minmax, mse, percentile"):
        calibration_range(obs, "kl")
    assert calibration_range(obs, "percentile", percentile=99.0) == calibrate_percentile(obs, 99.0)


@pytest.mark.parametrize("value", [0.0, 5.0, -2.0])
def test_constant_tensors_give_finite_parameters(value):
    obs = observe(np.full(1000, value, np.float32))
    for method in CALIBRATION_METHODS:
        lo, hi = calibration_range(obs, method)
        assert (lo, hi) == (min(value, 0.0), max(value, 0.0))
        for dtype in ("uint8", "int8"):
            p = quant_params(lo, hi, dtype)
            assert np.isfinite(p.scale) and p.scale > 0
            assert fake_quant(np.array([value]), lo, hi, dtype)[0] == pytest.approx(value, abs=p.scale / 2)


# --- quantization parameters ------------------------------------------------------------------------------

def test_uint8_params_are_asymmetric_with_zero_exact():
    p = quant_params(-1.0, 3.0, "uint8")
    assert p.dtype == "uint8" and p.scale == float(np.float32(4.0 / 255))
    assert p.zero_point == 64                        # round(1 / (4 / 255)) = round(63.75)
    assert fake_quant(np.array([0.0]), -1.0, 3.0, "uint8")[0] == 0.0
    x = np.linspace(-1.0, 3.0, 1001)
    assert np.max(np.abs(fake_quant(x, -1.0, 3.0, "uint8") - x)) <= p.scale / 2 + 1e-7
    assert quant_params(0.0, 6.0, "uint8").zero_point == 0
    assert quant_params(-4.0, -1.0, "uint8").zero_point == 255     # hi is raised to 0


def test_int8_params_are_symmetric():
    p = quant_params(-2.0, 5.0, "int8")
    assert p.zero_point == 0 and p.scale == float(np.float32(5.0 / 127))
    x = np.linspace(-5.0, 5.0, 1001)
    assert np.max(np.abs(fake_quant(x, -2.0, 5.0, "int8") - x)) <= p.scale / 2 + 1e-7
    assert quant_params(0.0, 0.0, "int8").scale == 1.0


def test_quant_params_reject_bad_input():
    with pytest.raises(UserError, match="int4"):
        quant_params(-1.0, 1.0, "int4")
    with pytest.raises(UserError, match="invalid quantization range"):
        quant_params(2.0, 1.0, "uint8")
    with pytest.raises(UserError, match="invalid quantization range"):
        quant_params(-np.inf, 1.0, "int8")


def _check_weights(w: np.ndarray, axis: int) -> np.ndarray:
    scales = weight_scales(w, axis)
    q = quantize_weight(w, scales, axis)
    assert scales.dtype == np.float32 and scales.shape == (w.shape[axis],)
    assert q.dtype == np.int8 and q.shape == w.shape and q.min() >= -127 and q.max() <= 127
    shape = [1] * w.ndim
    shape[axis] = -1
    s = scales.astype(np.float64).reshape(shape)
    assert np.all(np.abs(w - q * s) <= s / 2 * (1 + 1e-6))
    return scales


def test_weight_scales_per_output_channel():
    rng = np.random.default_rng(7)
    conv = rng.standard_normal((16, 3, 3, 8)) * rng.uniform(0.01, 10.0, (16, 1, 1, 1))   # OHWI
    conv[3] = 0.0
    scales = _check_weights(conv, 0)
    expect = np.abs(conv).max(axis=(1, 2, 3)) / 127
    assert np.allclose(scales[np.arange(16) != 3], expect[np.arange(16) != 3], rtol=1e-6)
    assert scales[3] > 0 and np.isfinite(scales[3])
    assert not quantize_weight(conv, scales, 0)[3].any()
    dense = rng.standard_normal((32, 24)).astype(np.float32)                            # (in, out)
    assert np.allclose(_check_weights(dense, 1), np.abs(dense).max(axis=0) / 127, rtol=1e-6)
    assert np.array_equal(weight_scales(dense, -1), weight_scales(dense, 1))


def test_quantize_weight_rounds_half_to_even():
    w = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -127.0]])
    scales = weight_scales(w, 0)
    assert scales[0] == 1.0
    assert quantize_weight(w, scales, 0).tolist() == [[127, 0, 2, 2, 0, -2, -127]]
    assert quantize_weight(w * 2, scales, 0).tolist() == [[127, 1, 3, 5, -1, -3, -127]]   # clipped
    with pytest.raises(ValueError):
        quantize_weight(w, np.ones(3, np.float32), 0)


# --- calibration data -------------------------------------------------------------------------------------

IMAGE_SPEC = TensorSpec("pixels", (2, 3, 16, 16), "float32")


def test_no_path_gives_seeded_synthetic_feeds(caplog):
    specs = [IMAGE_SPEC, TensorSpec("ids", (2, 8), "int64")]
    with caplog.at_level(logging.WARNING, logger="pipeline.calibrate"):
        data = load_calibration_data(None, specs, "generic", count=3, seed=5)
    assert data.synthetic and len(data.samples) == 3 and "synthetic" in data.source
    assert "seeded random" in caplog.text
    for i, feed in enumerate(data.samples):
        want = seeded_inputs(specs, 5 + i)
        assert all(np.array_equal(feed[k], want[k]) for k in want)
    with pytest.raises(UserError, match=">= 1"):
        load_calibration_data(None, specs, "generic", count=0)


def test_npy_is_split_into_model_batches(tmp_path, caplog):
    arr = np.random.default_rng(8).standard_normal((7, 3, 16, 16))      # float64, 3 batches and a half
    np.save(tmp_path / "x.npy", arr)
    with caplog.at_level(logging.WARNING, logger="pipeline.calibrate"):
        data = load_calibration_data(tmp_path / "x.npy", [IMAGE_SPEC], "image")
    assert not data.synthetic and data.source == str(tmp_path / "x.npy")
    assert len(data.samples) == 3 and "dropping the last 1" in caplog.text
    assert data.samples[1]["pixels"].dtype == np.float32 and data.samples[1]["pixels"].shape == (2, 3, 16, 16)
    assert np.array_equal(data.samples[1]["pixels"], arr[2:4].astype(np.float32))
    assert len(load_calibration_data(tmp_path / "x.npy", [IMAGE_SPEC], "image", count=2).samples) == 2
    with pytest.raises(UserError, match="single-input"):
        load_calibration_data(tmp_path / "x.npy", [IMAGE_SPEC, TensorSpec("y", (2,), "float32")], "generic")


def test_npy_shape_and_dtype_mismatches(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((6, 3, 5, 5), np.float32))
    with pytest.raises(UserError, match=r"expected shape \(N, 3, 16, 16\).*got \(6, 3, 5, 5\)"):
        load_calibration_data(tmp_path / "bad.npy", [IMAGE_SPEC], "image")
    np.save(tmp_path / "one.npy", np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(UserError, match="fewer than one batch of 2"):
        load_calibration_data(tmp_path / "one.npy", [IMAGE_SPEC], "image")
    np.save(tmp_path / "floats.npy", np.zeros((2, 8), np.float32))
    with pytest.raises(UserError, match="does not cast to int64"):
        load_calibration_data(tmp_path / "floats.npy", [TensorSpec("ids", (1, 8), "int64")], "text")


def test_npz_by_input_name(tmp_path):
    specs = [IMAGE_SPEC, TensorSpec("ids", (2, 8), "int64")]
    pixels = np.ones((4, 3, 16, 16), np.float32)
    ids = np.arange(32, dtype=np.int32).reshape(4, 8)
    np.savez(tmp_path / "both.npz", pixels=pixels, ids=ids)
    data = load_calibration_data(tmp_path / "both.npz", specs, "generic")
    assert len(data.samples) == 2 and data.samples[1]["ids"].dtype == np.int64
    assert np.array_equal(data.samples[1]["ids"], ids[2:4])
    np.savez(tmp_path / "half.npz", pixels=pixels)
    with pytest.raises(UserError, match="lacks arrays for model input.* ids"):
        load_calibration_data(tmp_path / "half.npz", specs, "generic")


def test_bad_paths(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_calibration_data(tmp_path / "nope.npy", [IMAGE_SPEC], "image")
    (tmp_path / "data.csv").write_text("1,2,3\n")
    with pytest.raises(UserError, match=r"\.npy or \.npz"):
        load_calibration_data(tmp_path / "data.csv", [IMAGE_SPEC], "image")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(UserError, match="cannot read"):
        load_calibration_data(tmp_path / "junk.npy", [IMAGE_SPEC], "image")
    with open(tmp_path / "archive.npy", "wb") as f:       # file objects: numpy would fix the suffix
        np.savez(f, pixels=np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(UserError, match="holds an .npz archive"):
        load_calibration_data(tmp_path / "archive.npy", [IMAGE_SPEC], "image")
    with open(tmp_path / "single.npz", "wb") as f:
        np.save(f, np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(UserError, match="holds a single array"):
        load_calibration_data(tmp_path / "single.npz", [IMAGE_SPEC], "image")


COLOUR = (200, 100, 50)


def _normalized(rgb: tuple[int, int, int]) -> np.ndarray:
    return (np.array(rgb) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)


def test_image_folder_is_imagenet_preprocessed(tmp_path, caplog):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in enumerate([(40, 30), (30, 50), (64, 64), (17, 23), (100, 20)]):   # (width, height)
        Image.new("RGB", size, COLOUR).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="pipeline.calibrate"):
        data = load_calibration_data(folder, [IMAGE_SPEC], "image")
    assert "dropping the last 1 images" in caplog.text and not data.synthetic
    assert len(data.samples) == 2
    want = _normalized(COLOUR)[:, None, None]
    for feed in data.samples:
        x = feed["pixels"]
        assert x.shape == (2, 3, 16, 16) and x.dtype == np.float32
        assert np.allclose(x, want, atol=1e-5)


def test_image_folder_crops_the_center(tmp_path):
    # 64x32, the left 8 columns black: the shorter side goes to round(16 * 256 / 224) = 18 (width 36),
    # the center crop starts at column 10, past the black (now 4.5 columns wide); grayscale turns RGB.
    img = np.full((32, 64), 255, np.uint8)
    img[:, :8] = 0
    Image.fromarray(img).save(tmp_path / "a.png")                     # 2-d uint8: grayscale
    Image.new("RGB", (20, 20), COLOUR).save(tmp_path / "b.JPG")     # suffixes match in any case
    spec = TensorSpec("x", (1, 3, 16, 16), "float32")
    data = load_calibration_data(tmp_path, [spec], "generic")
    assert len(data.samples) == 2
    assert np.allclose(data.samples[0]["x"][0], _normalized((255, 255, 255))[:, None, None], atol=1e-5)
    with pytest.raises(UserError, match="does not match"):
        load_calibration_data(tmp_path, [spec], "image", image_size=(24, 24))


def test_image_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        load_calibration_data(empty, [IMAGE_SPEC], "image")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (broken / name).write_bytes(b"\xff\xd8 truncated, not a jpeg")
    with pytest.raises(UserError, match="cannot read image .*a.jpg"):
        load_calibration_data(broken, [IMAGE_SPEC], "image")
    with pytest.raises(UserError, match="image models"):
        load_calibration_data(broken, [TensorSpec("ids", (1, 8), "int64")], "text")
    with pytest.raises(UserError, match="NCHW"):
        load_calibration_data(broken, [TensorSpec("ids", (1, 8), "int64")], "generic")


def test_module_does_not_import_tvm():
    code = "import sys, pipeline.calibrate; sys.exit('tvm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0
