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
