import time

from pipeline.measure import Latency, MeasureSettings, measure_interleaved


def test_interleaved_order_and_caps():
    calls = []
    runners = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    stats = measure_interleaved(runners, MeasureSettings(warmup=1, repeats=6, max_seconds=10, burst=3))
    assert calls[:2] == ["a", "b"]  # one warm-up call each
    burst = ["a"] * 4 + ["b"] * 4       # per turn: one untimed call (the other pool winds down), 3 timed
    assert calls[2:] == burst * 2, "runners alternate in bursts"
    assert stats["a"].as_dict()["samples"] == 6


def test_slow_runner_stops_at_its_time_cap_but_keeps_minimum():
    stats = measure_interleaved({"slow": lambda: time.sleep(0.02), "fast": lambda: None},
                                MeasureSettings(warmup=0, repeats=100, max_seconds=0.05, min_repeats=3,
                                                burst=1))
    assert 3 <= len(stats["slow"].samples_ms) <= 5
    assert len(stats["fast"].samples_ms) == 100


def test_percentiles():
    lat = Latency([float(i) for i in range(1, 101)])
    assert lat.median == 50.5 and lat.p90 > 89 and lat.p99 > 98


def test_the_faster_build_is_exported_only_past_the_margin():
    from pipeline.measure import Latency, faster_build

    tuned = Latency([10.0, 10.0, 10.0])
    assert faster_build({"tuned": tuned}) == "tuned"                                # nothing to compare
    assert faster_build({"tuned": tuned, "untuned": Latency([9.9] * 3)}) == "tuned"  # within 3%: noise
    assert faster_build({"tuned": tuned, "untuned": Latency([9.0] * 3)}) == "untuned"
    assert faster_build({"tuned": tuned, "untuned": Latency([12.0] * 3)}) == "tuned"
