import numpy as np

from pipeline.importer import TensorSpec
from pipeline.verify import seeded_inputs, verify


def test_seeded_inputs_are_deterministic_and_typed():
    specs = [TensorSpec("input_ids", (1, 8), "int64"), TensorSpec("attention_mask", (1, 8), "int64"),
             TensorSpec("x", (2, 3), "float32")]
    a, b = seeded_inputs(specs, 0), seeded_inputs(specs, 0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["attention_mask"].sum() == 8 and a["x"].dtype == np.float32
    assert 0 <= a["input_ids"].min() and a["input_ids"].max() < 100


class _Model:
    inputs = [TensorSpec("x", (4,), "float32")]


class _Session:
    def __init__(self, scale):
        self.scale = scale

    def run(self, _, feeds):
        return [feeds["x"] * self.scale]


def test_verify_passes_and_fails_on_tolerance():
    def compiled(arrays):
        return [arrays[0] * 2.0]
    ok = verify(_Model(), compiled, _Session(2.0), tolerance=1e-6, samples=2)
    assert ok.passed and ok.max_abs_err == 0 and ok.min_cosine > 0.999999
    bad = verify(_Model(), compiled, _Session(2.001), tolerance=1e-6, samples=1)
    assert not bad.passed and bad.max_rel_err > 1e-4
