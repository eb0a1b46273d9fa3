"""Benchmark: `tune run` twice on the same model and target in a fresh folder.

Prints the wall time of both runs and their ratio (resume must be well under half), and the tuned
latency against ONNX Runtime and the untuned build, measured interleaved inside each run.

    python benchmarks/resume_and_latency.py --model resnet18 --trials 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def tune_run(cwd: Path, args: list[str]) -> tuple[float, dict]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", *args, "--json"], cwd=cwd,
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"tune run failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1]}")
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--trials", default="64")
    parser.add_argument("--target", default="auto")
    opts = parser.parse_args()
    args = ["--model", opts.model, "--trials", opts.trials, "--target", opts.target]
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        first_s, first = tune_run(Path(tmp), args)
        second_s, second = tune_run(Path(tmp), args)
    print(f"model {first['model']} preset {first['preset']} tasks {first['tasks']}")
    print(f"run 1: {first_s:7.1f} s  trials new {first['trials_new']:4d} reused {first['trials_reused']}")
    print(f"run 2: {second_s:7.1f} s  trials new {second['trials_new']:4d} reused {second['trials_reused']}")
    print(f"resume wall-time ratio (run 2 / run 1): {second_s / first_s:.2f}")
    for name, run in (("run 1", first), ("run 2", second)):
        print(f"{name} stages (s): {run['stage_seconds']}")
        lat = run["latency_ms"]
        print(f"{name}: tuned {lat['tuned']:.2f} ms | onnxruntime {lat['onnxruntime']:.2f} ms "
              f"(tuned/ort {lat['tuned'] / lat['onnxruntime']:.2f}x) | untuned {lat['untuned']:.1f} ms "
              f"(untuned/tuned {lat['untuned'] / lat['tuned']:.1f}x)")


if __name__ == "__main__":
    main()
