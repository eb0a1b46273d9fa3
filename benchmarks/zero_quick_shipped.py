"""Benchmark: how close to ONNX Runtime and OpenVINO is a model (a) with no tuning (our default
schedules), (b) after a fresh `--budget quick` run (with its tuning curve), (c) with the shipped
tuning logs, at batch 1 and 8? Each case is one `tune run`, whose measure stage alternates TVM,
ONNX Runtime and OpenVINO (same thread count) in one process; every ratio is TVM / baseline from
that one run.

    python benchmarks/zero_quick_shipped.py --model resnet50 [--cases zero,quick,shipped] [--batches 1,8]

Writes `<out-dir>/<model>.json` and `<model>.png`, and logs both (and every figure) to MLflow in
the experiment `benchmarks` (`--tracking-uri`, default: the pipeline's store, ./mlflow.db).
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
BASELINES = ("onnxruntime", "openvino")


def tune_run(cwd: Path, args: list[str]) -> tuple[float, dict]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", *args, "--json",
                           "--skip-untuned"], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"tune run failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1]}")
    return time.perf_counter() - start, json.loads(proc.stdout.strip().splitlines()[-1])


def run_case(tmp: Path, model: str, case: str, batch: int) -> dict:
    logs = tmp / f"logs-{case}-b{batch}"
    if case == "shipped":   # only the committed shipped records, no local working database
        for shipped in (ROOT / "tuning_logs").glob("*/shipped"):
            shutil.copytree(shipped, logs / shipped.parent.name / "shipped")
    budget = ["--trials", "0"] if case == "zero" else ["--budget", "quick"]
    extra = ["--model-option", f"batch={batch}"] if batch != 1 else []
    wall, run = tune_run(tmp, ["--model", model, *budget, *extra, "--tuning-logs", str(logs)])
    lat = run["latency_ms"]
    row = {"case": case, "batch": batch, "wall_s": round(wall, 1), "tvm_ms": lat["tuned"],
           "trials_new": run["trials_new"], "trials_reused": run["trials_reused"],
           "preset": run["preset"], "tune_curve": run.get("tune_curve", [])}
    for base in BASELINES:
        if base in lat:
            row[f"{base}_ms"] = lat[base]
            row[f"tvm_over_{base}"] = round(lat["tuned"] / lat[base], 3)
    return row


def describe(model: str, row: dict) -> str:
    ratios = " | ".join(f"TVM/{b} {row[f'tvm_over_{b}']:.2f}x ({row[f'{b}_ms']:.2f} ms)"
                        for b in BASELINES if f"tvm_over_{b}" in row)
    return (f"{model} b{row['batch']} {row['case']:8s} wall {row['wall_s']:6.1f} s | "
            f"TVM {row['tvm_ms']:8.2f} ms | {ratios} | trials new {row['trials_new']} "
            f"reused {row['trials_reused']}")


def plot(model: str, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curve) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['case']}\nb{r['batch']}" for r in rows]
    width = 0.38
    for i, base in enumerate(BASELINES):
        values = [r.get(f"tvm_over_{base}", float("nan")) for r in rows]
        bars.bar([x + (i - 0.5) * width for x in range(len(rows))], values, width, label=f"TVM / {base}")
    bars.axhline(1.0, color="black", linewidth=0.8)
    bars.set_xticks(range(len(rows)), labels)
    bars.set_ylabel("latency ratio (lower is better)")
    bars.set_title(f"{model}: TVM latency over baselines")
    bars.legend()
    for r in rows:
        if r["tune_curve"]:
            xs = [p["tune_s"] for p in r["tune_curve"]]
            ys = [p["estimated_ms"] for p in r["tune_curve"]]
            curve.plot(xs, ys, marker=".", label=f"b{r['batch']} ({r['trials_new']} trials)")
    curve.set_xlabel("tuning wall time (s)")
    curve.set_ylabel("estimated model latency (ms, sum of best kernels)")
    curve.set_title("fresh --budget quick: tuning curve")
    if curve.lines:
        curve.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_to_mlflow(model: str, rows: list[dict], files: list[Path], tracking_uri: str | None) -> str:
    from pipeline.tracking import RunRecorder
    from pipeline.tracking import tracking_uri as resolve_uri

    recorder = RunRecorder(resolve_uri(tracking_uri), "benchmarks", run_name=f"zero_quick_shipped-{model}",
                           tags={"model": model, "benchmark": "zero_quick_shipped"})
    recorder.metrics({f"{r['case']}_b{r['batch']}_{k}": v for r in rows for k, v in r.items()
                      if isinstance(v, (int, float)) and k != "batch"})
    for f in files:
        recorder.artifact(f, "benchmark")
    recorder.finish("FINISHED")
    return recorder.run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--cases", default="zero,quick,shipped")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tracking-uri", default=None)
    opts = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for batch in [int(b) for b in opts.batches.split(",")]:
            for case in opts.cases.split(","):
                rows.append(run_case(Path(tmp), opts.model, case, batch))
                print(describe(opts.model, rows[-1]), flush=True)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    out_json, out_png = opts.out_dir / f"{opts.model}.json", opts.out_dir / f"{opts.model}.png"
    out_json.write_text(json.dumps({"model": opts.model, "rows": rows}, indent=2) + "\n")
    plot(opts.model, rows, out_png)
    run_id = log_to_mlflow(opts.model, rows, [out_json, out_png], opts.tracking_uri)
    print(f"wrote {out_json} and {out_png}; mlflow run {run_id}")


if __name__ == "__main__":
    main()
