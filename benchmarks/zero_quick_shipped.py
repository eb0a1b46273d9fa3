"""Benchmark: how close to ONNX Runtime is a model (a) with no tuning, (b) after a fresh
`--budget quick` run, (c) with the shipped tuning logs? Each case is one `tune run`, whose measure
stage interleaves TVM and ONNX Runtime (same threads) in one process; the ratio is TVM / ORT.

    python benchmarks/zero_quick_shipped.py --model resnet50 [--cases zero,quick,shipped] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tune_run(cwd: Path, args: list[str]) -> tuple[float, dict]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", *args, "--json",
                           "--skip-untuned"], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"tune run failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1]}")
    return time.perf_counter() - start, json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--cases", default="zero,quick,shipped")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    opts = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp = Path(tmp)
        for case in opts.cases.split(","):
            logs = tmp / f"logs-{case}"
            if case == "shipped":   # only the committed shipped records, no local working database
                for shipped in (ROOT / "tuning_logs").glob("*/shipped"):
                    shutil.copytree(shipped, logs / shipped.parent.name / "shipped")
            budget = ["--trials", "0"] if case == "zero" else ["--budget", "quick"]
            wall, run = tune_run(tmp, ["--model", opts.model, *budget, "--tuning-logs", str(logs)])
            lat = run["latency_ms"]
            rows[case] = {"wall_s": round(wall, 1), "tuned_ms": lat["tuned"], "ort_ms": lat["onnxruntime"],
                          "tvm_over_ort": round(lat["tuned"] / lat["onnxruntime"], 3),
                          "trials_new": run["trials_new"], "trials_reused": run["trials_reused"],
                          "preset": run["preset"]}
            print(f"{opts.model} {case:8s} wall {wall:6.1f} s | TVM {lat['tuned']:8.2f} ms | "
                  f"ORT {lat['onnxruntime']:7.2f} ms | TVM/ORT {rows[case]['tvm_over_ort']:.2f}x | "
                  f"trials new {run['trials_new']} reused {run['trials_reused']}", flush=True)
    if opts.out:
        opts.out.write_text(json.dumps({"model": opts.model, "cases": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
