"""Benchmark: BSR sparse kernels against our dense build and ONNX Runtime, over a sparsity sweep.

Models: the zoo's bert-mini (hidden 256, 4 layers, seq 128) and a BERT-base-sized encoder layer
(bert_mini factory with hidden 768, 12 heads, 1 layer, seq 128). At each sparsity the model's
linear weights are magnitude-pruned in blocks (`pipeline.prune`, 1x16 by default) and measured:

    per layer   the six linear layers of the first encoder layer, each built alone as `tune run`
                builds it: our BSR kernel vs our dense matmul (default schedules, i.e. the
                untuned `--trials 0` build; no tuning database), interleaved best-of-N
    end to end  `--sparse on` build (every pruned linear as BSR, threshold 0, so the sweep shows
                where BSR loses too) vs our dense build vs ONNX Runtime (dense, graph opt ALL)
                on the same pruned model, interleaved (pipeline.measure), same threads

    python benchmarks/sparse.py [--sparsities 0,0.5,0.7,0.8,0.9,0.95] [--block 1x16] [--threads 2]

Writes benchmarks/results/sparse-sweep.json and sparse-sweep.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {"bert-mini": {},
          "bert-base-layer": {"hidden": 768, "heads": 12, "layers": 1}}


def _build(mod, target, late, post, database=None):
    from pipeline.build import build
    from pipeline.passes import apply_passes
    from pipeline.runtime import CompiledModel

    built = build(apply_passes(mod, target, late), target, database, post)
    return CompiledModel(built.executable, list(built.params.values()))


def bench_model(name: str, options: dict, sparsities: list[float], block, target, resolved,
                threads: int, settings, log, database=None) -> list[dict]:
    import numpy as np

    from pipeline.importer import import_model
    from pipeline.measure import measure_interleaved
    from pipeline.models import get_model
    from pipeline.passes import QUANTIZE_AT, apply_passes, preset_passes, split_passes
    from pipeline.passes.sparse import SparseSettings, _time_layers, find_sites, pack_bsr, sparsify
    from pipeline.prune import prune_model
    from pipeline.verify import onnxruntime_session, seeded_inputs

    passes, post = preset_passes(resolved.tuning)
    early, late = split_passes(passes, QUANTIZE_AT)
    base = get_model("bert-mini").build(**options)
    rows, dense_cache, dense = [], {}, None
    for sparsity in sparsities:
        proto = prune_model(base, sparsity, block) if sparsity > 0 else base
        model = import_model(name, loaded=(name, proto, "text"))
        mod = apply_passes(model.mod, target, early)
        feeds = seeded_inputs(model.inputs, 0)
        arrays = [feeds[s.name] for s in model.inputs]
        session = onnxruntime_session(model, threads=threads)
        if dense is None:            # dense latency does not depend on the weight values
            dense = _build(mod, target, late, post, database)
        t0 = time.perf_counter()
        sparse_mod, decisions = sparsify(mod, target, SparseSettings("on", 0.0, block))
        sparse = _build(sparse_mod, target, late, post, database)
        ref = session.run(None, feeds)[0]
        err = float(np.abs(sparse([*arrays])[0] - ref).max())
        dense_err = float(np.abs(dense([*arrays])[0] - ref).max()) if sparsity == 0 else None
        stats = measure_interleaved({"sparse": sparse.timed_call(arrays), "dense": dense.timed_call(arrays),
                                     "onnxruntime": lambda s=session, f=feeds: s.run(None, f)},
                                    settings)
        layers = []
        for site in find_sites(mod["main"], block)[:6]:        # the first encoder layer's linears
            site.packed = pack_bsr(site.weight, block)
            s_ms, d_ms = _time_layers(site, target, late, post, 7, dense_cache)
            layers.append({"name": site.name, "shape": site.decision.shape, "sparse_ms": s_ms,
                           "dense_ms": d_ms, "speedup": d_ms / s_ms,
                           "padding": round(site.packed.padding, 3)})
        lin_s, lin_d = sum(x["sparse_ms"] for x in layers), sum(x["dense_ms"] for x in layers)
        e2e = {k: v.as_dict() for k, v in stats.items()}
        row = {"model": name, "sparsity": sparsity, "max_abs_err_vs_ort": err,
               "dense_max_abs_err_vs_ort": dense_err,
               "bsr_layers": sum(d.sparse for d in decisions), "layers": layers,
               "linear_sparse_ms": lin_s, "linear_dense_ms": lin_d, "linear_speedup": lin_d / lin_s,
               "e2e": e2e,
               "e2e_speedup_vs_dense": e2e["dense"]["median_ms"] / e2e["sparse"]["median_ms"],
               "e2e_speedup_vs_ort": e2e["onnxruntime"]["median_ms"] / e2e["sparse"]["median_ms"],
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        log(f"{name:16s} {sparsity:5.0%}  linear {lin_s:7.3f} ms vs dense {lin_d:7.3f} ms "
            f"({row['linear_speedup']:5.2f}x)  e2e sparse {e2e['sparse']['median_ms']:7.3f} ms, "
            f"dense {e2e['dense']['median_ms']:7.3f} ({row['e2e_speedup_vs_dense']:5.2f}x), "
            f"ORT {e2e['onnxruntime']['median_ms']:7.3f} ({row['e2e_speedup_vs_ort']:5.2f}x)  "
            f"err {err:.1e}")
    return rows


def break_even(rows: list[dict], key: str) -> float | None:
    """Lowest swept sparsity from which sparse stays faster (ratio > 1), interpolated linearly."""
    pts = [(r["sparsity"], r[key]) for r in rows]
    for i in range(len(pts) - 1, -1, -1):
        if pts[i][1] <= 1:
            if i == len(pts) - 1:
                return None
            (s0, r0), (s1, r1) = pts[i], pts[i + 1]
            return round(s0 + (1 - r0) * (s1 - s0) / (r1 - r0), 3)
    return pts[0][0]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, model in zip(axes, MODELS):
        rs = [r for r in rows if r["model"] == model]
        xs = [100 * r["sparsity"] for r in rs]
        ax.plot(xs, [r["linear_speedup"] for r in rs], "o-", label="linear layers vs our dense")
        ax.plot(xs, [r["e2e_speedup_vs_dense"] for r in rs], "s-", label="end to end vs our dense")
        ax.plot(xs, [r["e2e_speedup_vs_ort"] for r in rs], "^-", label="end to end vs ONNX Runtime")
        ax.axhline(1, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{model}: BSR speedup")
        ax.set_xlabel("block sparsity (%)")
        ax.set_ylabel("speedup (x)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", default="0,0.5,0.7,0.8,0.9,0.95")
    ap.add_argument("--block", default="1x16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tuning-logs", type=Path, default=None,
                    help="end to end: both builds use this root's <preset> tuning records (tuned "
                         "dense); default: our default schedules on both")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sparse-sweep.json")
    args = ap.parse_args()

    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    from pipeline import tvm_compat
    from pipeline.measure import MeasureSettings
    from pipeline.passes.sparse import parse_block
    from pipeline.runtime import use_threads
    from pipeline.targets import resolve_target

    tvm_compat.apply()
    threads = use_threads(args.threads)
    resolved = resolve_target("auto")
    target = resolved.tvm_target()
    block = parse_block(args.block)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    settings = MeasureSettings(repeats=args.repeats, max_seconds=4.0, burst=3)
    database = args.tuning_logs / resolved.preset if args.tuning_logs else None
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, MODELS[name], sparsities, block, target, resolved, threads,
                            settings, lambda s: print(s, flush=True), database)
    summary = {m: {"break_even_linear": break_even([r for r in rows if r["model"] == m], "linear_speedup"),
                   "break_even_e2e_vs_dense": break_even([r for r in rows if r["model"] == m],
                                                         "e2e_speedup_vs_dense"),
                   "break_even_e2e_vs_ort": break_even([r for r in rows if r["model"] == m],
                                                       "e2e_speedup_vs_ort")}
               for m in args.models.split(",")}
    result = {"target": resolved.preset, "threads": threads, "block": list(block),
              "dense_baseline": f"end to end: tuning records of {database}; per layer: our default "
                                "schedules" if database else
                                "our default schedules (untuned, --trials 0 build), no tuning database",
              "sparse": "--sparse on: every pruned linear as BSR (threshold 0)",
              "rows": rows, "break_even": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(rows, args.out.with_suffix(".png"))
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
