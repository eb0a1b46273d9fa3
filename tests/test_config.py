import pytest

from pipeline.config import parse_duration, parse_model_options, parse_shape_overrides
from pipeline.errors import UserError


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("30m", 1800), ("1.5h", 5400), ("45", 45),
                                          ("2min", 120)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "10x", "-5m", "0"])
def test_bad_durations(text):
    with pytest.raises(UserError):
        parse_duration(text)


def test_shapes_and_options():
    assert parse_shape_overrides(["x=1,3,8,8"]) == {"x": [1, 3, 8, 8]}
    assert parse_model_options(["layers=2", "scale=0.5", "act=gelu"]) == {
        "layers": 2, "scale": 0.5, "act": "gelu"}
    for bad in (["x"], ["x=1,a"], ["=1"], ["x=0,1"]):
        with pytest.raises(UserError):
            parse_shape_overrides(bad)
    with pytest.raises(UserError):
        parse_model_options(["novalue"])


def test_budget_presets_and_overrides():
    from pipeline.config import BUDGETS, resolve_budget

    assert list(BUDGETS) == ["quick", "default", "full"]
    quick, line = resolve_budget("quick")
    assert quick.trials is None and quick.trials_per_task == 8 and quick.time_budget_s == 600
    assert quick.total(29) == 232 and line.startswith("budget quick: up to 8 trials per task")
    fixed, line = resolve_budget("quick", trials=64)
    assert fixed.trials == 64 and fixed.trials_per_task is None and "64 trials" in line
    capped, _ = resolve_budget("full", trials_per_task=4, time_budget="90s")
    assert capped.trials_per_task == 4 and capped.time_budget_s == 90 and capped.total(3) == 12
    with pytest.raises(UserError, match="unknown budget"):
        resolve_budget("huge")
