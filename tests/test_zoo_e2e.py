"""Every zoo architecture through the whole CLI pipeline. Slow (real models), so CI runs the cheap
form: no search (`--trials 0`), a few timed calls, no untuned build. Verification still compares
every model against ONNX Runtime and exports it."""

import pytest

from tests.conftest import tune_cli


@pytest.mark.slow
@pytest.mark.parametrize("model,options", [
    ("resnet18", []),
    ("mobilenet_v2", []),
    ("bert-mini", []),
    ("resnet50", ["--model-option", "image=112"]),
])
def test_zoo_model_verifies_and_exports(model, options, tmp_path):
    res = tune_cli(["run", "--model", model, "--trials", "0", "--skip-untuned", "--repeats", "3",
                    "--json", *options], tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr
    summary = res.json()
    assert summary["verified"] is True and summary["tasks"] > 5
    assert summary["latency_ms"]["tuned"] > 0 and summary["artifact"]
