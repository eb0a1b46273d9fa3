"""Roofline: how far each kernel of a built model is from what this machine allows.

Ceilings are measured with kernels TVM builds itself: a GEMM on our register-blocked micro-kernel
(`schedules/cpu/matmul.py`) for fp32 compute, a 3x3 u8 x s8 -> s32 conv on the target's dot
instruction (`schedules/cpu/int8.py`: VNNI, pmaddubsw, sdot) for int8 compute where the ISA has one, and a
streaming scale `b = 2a` over arrays far larger than the caches for memory bandwidth. They are cached per machine and preset (a CPU model and a
thread count give the same ceilings every time; the cache key holds both).

Per kernel: FLOPs from the TIR (`estimate_tir_flops`), bytes as the sizes of its arguments (each
read or written once: a lower bound on traffic, so the memory-bound points are optimistic), time
from `pipeline.profile`. Attainable = min(peak, intensity x bandwidth).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Ceilings:
    preset: str
    threads: int
    peak_gflops: float          # fp32 FMA throughput reached by our GEMM
    bandwidth_gbs: float        # DRAM streaming (read + write)
    cpu: str
    measured_at: str
    gemm: str = ""              # what was measured, for the record
    stream: str = ""
    peak_int8_gops: float = 0.0  # 8-bit dot-product throughput; 0: the target has no dot instruction
    gemm_int8: str = ""

    @property
    def ridge(self) -> float:
        """Arithmetic intensity (flop/byte) where the memory roof meets the compute roof."""
        return self.peak_gflops / self.bandwidth_gbs

    def peak(self, precision: str = "fp32") -> float:
        if precision == "int8" and self.peak_int8_gops > 0:
            return self.peak_int8_gops
        return self.peak_gflops

    def attainable(self, intensity: float, precision: str = "fp32") -> float:
        return min(self.peak(precision), intensity * self.bandwidth_gbs)


def _cpu_name() -> str:
    from pipeline.targets import detect_host

    return detect_host().cpu_name


def default_cache_dir() -> Path:
    import os

    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "tvm-autotune" / "ceilings"


CACHE_VERSION = 2     # 2: int8 peak added; older files lack it and are measured again


def _cache_file(cache_dir: Path, preset: str, threads: int) -> Path:
    key = hashlib.sha256(f"{_cpu_name()}|{platform.node()}".encode()).hexdigest()[:12]
    return cache_dir / f"{preset}-t{threads}-{key}-v{CACHE_VERSION}.json"


def machine_ceilings(preset: str, target, threads: int, cache_dir: Path | None = None,
                     recalibrate: bool = False, size: str = "full") -> Ceilings:
    """Cached ceilings for this machine, or measure them (~15 s; `size="small"` ~3 s, for tests)."""
    path = _cache_file(cache_dir or default_cache_dir(), preset, threads)
    if path.exists() and not recalibrate:
        try:
            return Ceilings(**json.loads(path.read_text()))
        except (TypeError, ValueError) as exc:
            log.warning("ignoring unreadable ceilings cache %s: %s", path, exc)
    ceilings = measure_ceilings(preset, target, threads, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(ceilings), indent=2))
    log.info("ceilings for %s (%d threads): %.0f GFLOP/s fp32, %.0f GOP/s int8, %.1f GB/s, cached "
             "in %s", preset, threads, ceilings.peak_gflops, ceilings.peak_int8_gops,
             ceilings.bandwidth_gbs, path)
    return ceilings


def measure_ceilings(preset: str, target, threads: int, size: str = "full") -> Ceilings:
    from datetime import datetime, timezone

    batch, n = (8, 256) if size == "full" else (2, 128)
    stream = (32 if size == "full" else 8) * 1024 * 1024        # floats per array
    gflops = _gemm_gflops(target, batch, n)
    gbs = _stream_gbs(target, stream)
    int8 = _int8_conv_gops(target, 256 if size == "full" else 64)
    return Ceilings(preset, threads, round(gflops, 1), round(gbs, 2), _cpu_name(),
                    datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    gemm=f"fp32 {batch}x {n}^3 GEMMs, schedules/ matmul rule",
                    stream=f"b=2a, 2x{stream * 4 >> 20} MiB",
                    peak_int8_gops=round(int8[0], 1), gemm_int8=int8[1])


def _build(func, target):
    import tvm

    from schedules import default_rules, first_match

    with target:
        _, sch = first_match(func, target, default_rules(target), kernel="ceiling")
    return tvm.tirx.build(sch.mod, target=target)


def _best_seconds(lib, args, repeat: int = 7) -> float:
    """Best of `repeat`: on a shared machine the fastest run is the one nothing else disturbed."""
    import tvm

    timer = lib.time_evaluator("main", tvm.cpu(), number=1, repeat=repeat, min_repeat_ms=100)
    return float(min(timer(*args).results))


def _gemm_gflops(target, batch: int, n: int) -> float:
    """Batched n x n x n GEMMs: panels that stay in L2, so the FMA units are the limit (a single
    1024^3 GEMM streams its B panels from L3 and measured ~7% lower here)."""
    import tvm
    from tvm import te

    a = te.placeholder((batch, n, n), "float32", "A")
    b = te.placeholder((batch, n, n), "float32", "B")
    k = te.reduce_axis((0, n), "k")
    c = te.compute((batch, n, n), lambda z, i, j: te.sum(a[z, i, k] * b[z, k, j], axis=k), name="C")
    lib = _build(te.create_prim_func([a, b, c]), target)
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.standard_normal((batch, n, n), dtype=np.float32))
            for _ in range(2)]
    args.append(tvm.runtime.empty((batch, n, n), "float32", tvm.cpu()))
    return 2 * batch * n ** 3 / _best_seconds(lib, args) / 1e9


def _int8_conv_gops(target, channels: int) -> tuple[float, str]:
    """u8 x s8 -> s32 3x3 conv, 14x14 x `channels` -> `channels` NHWC, on the dot-instruction
    kernel with its weight prepacked at build time, as int8 models run it; (0, why) where the
    target has no such instruction. A conv, not a GEMM: our int8 matmul reaches about half of
    what the conv kernel does here (350 against 750 GOP/s), so a GEMM would understate the roof."""
    import tvm
    from tvm import relax

    from pipeline.build import build
    from pipeline.passes import post_tuning_passes
    from pipeline.passes.pipeline import fuse_for_build
    from schedules.cpu.int8 import dot_instruction

    ins = dot_instruction(target)
    if ins is None:
        return 0.0, "no 8-bit dot-product instruction on this target"
    rng = np.random.default_rng(0)
    shape = (1, 14, 14, channels)
    weight = rng.integers(-100, 100, (channels, 3, 3, channels)).astype(ins.b_dtype)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, ins.a_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.conv2d(x, relax.const(weight), padding=1, data_layout="NHWC",
                                                  kernel_layout="OHWI", out_dtype="int32"))
        bb.emit_func_output(y)
    mod = fuse_for_build(bb.get())
    built = build(mod, target, None, post_tuning_passes(True))
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    args = [tvm.runtime.tensor(rng.integers(0, 100, shape).astype(ins.a_dtype)),
            *(tvm.runtime.tensor(p) for p in built.params.values())]
    timer = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=7, min_repeat_ms=100)
    seconds = float(min(timer(*args).results))
    ops = 2 * 14 * 14 * channels * channels * 9 / seconds / 1e9
    return ops, (f"{ins.a_dtype} x {ins.b_dtype} 3x3 conv 14x14x{channels}->{channels} on "
                 f"{ins.name}, schedules/ int8 rule")


def _stream_gbs(target, floats: int) -> float:
    import tvm
    from tvm import te

    a = te.placeholder((floats,), "float32", "a")
    b = te.compute((floats,), lambda i: a[i] * tvm.tirx.const(2.0, "float32"), name="b")
    lib = _build(te.create_prim_func([a, b]), target)
    args = [tvm.runtime.tensor(np.ones(floats, dtype=np.float32)),
            tvm.runtime.empty((floats,), "float32", tvm.cpu())]
    return 2 * floats * 4 / _best_seconds(lib, args) / 1e9


@dataclass
class KernelCost:
    flops: float       # per call
    bytes: int         # per call: argument sizes
    precision: str = "fp32"    # "int8": judged against the int8 roof


def _precision(func) -> str:
    """"int8" for a kernel whose reduction reads 8-bit values (an integer conv / matmul), read from
    the unscheduled TIR; a scheduled one (nested blocks) is judged by its arguments: 8-bit operands
    next to an int32 one (the folded bias). A quantize kernel (float in, 8-bit out) is "fp32"."""
    from tvm import s_tir

    from schedules.analysis import block_facts

    eight_bit = {"int8", "uint8"}
    try:
        blocks = block_facts(s_tir.Schedule(func))
    except Exception:  # noqa: BLE001  (not schedulable TIR: judge by the arguments)
        blocks = None
    if blocks is not None:
        return "int8" if any(b.is_reduction and any(str(r.source.dtype) in eight_bit
                                                    for r in b.block.reads)
                             for b in blocks) else "fp32"
    dtypes = {str(p.dtype) for p in func.params if hasattr(p, "dtype")}
    return "int8" if dtypes & eight_bit and "int32" in dtypes else "fp32"


def _estimate_flops(func) -> float:
    import tvm
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(tvm.IRModule({"main": func})))
    except Exception:  # noqa: BLE001  (data-dependent loops: no estimate, the row says 0)
        return 0.0


def kernel_costs(mod, unscheduled: dict | None = None) -> dict[str, KernelCost]:
    """FLOPs and bytes of every PrimFunc in `mod` (the module that is compiled). FLOPs come from
    the same kernel in `unscheduled` (name -> PrimFunc before scheduling) when it is there: a
    tensorized kernel's dot instructions are opaque calls the estimate does not count (a
    `_prepacked` suffix, which the weight-prepacking split adds, is ignored when matching names)."""
    import tvm

    before = unscheduled or {}
    out = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        name = gv.name_hint
        source = before.get(name) or before.get(name.removesuffix("_prepacked")) or func
        flops = _estimate_flops(source)
        precision = _precision(source)
        nbytes = sum(int(np.prod([int(d) for d in p.shape])) * tvm.DataType(p.dtype).bits // 8
                     for p in func.params if hasattr(p, "shape"))
        out[gv.name_hint] = KernelCost(flops, nbytes, precision)
    return out


@dataclass
class RooflinePoint:
    kernel: str
    calls: int
    ms: float                 # per inference, all calls
    share: float              # of the kernels' total time
    gflop: float              # per inference
    mbytes: float             # per inference
    intensity: float          # flop / byte
    achieved_gflops: float
    attainable_gflops: float
    fraction: float           # achieved / attainable
    bound: str                # "compute" or "memory"
    precision: str = "fp32"   # which compute roof applies: "fp32" or "int8" (GOP/s)


def roofline_points(profile, costs: dict[str, KernelCost], ceilings: Ceilings) -> list[RooflinePoint]:
    kernels = [k for k in profile.kernels if not k.is_runtime and k.name in costs]
    total = sum(k.ms for k in kernels) or 1.0
    points = []
    for k in kernels:
        cost = costs[k.name]
        flop, nbytes = cost.flops * k.calls, cost.bytes * k.calls
        intensity = flop / nbytes if nbytes else 0.0
        achieved = flop / (k.ms * 1e6) if k.ms > 0 else 0.0
        attainable = ceilings.attainable(intensity, cost.precision)
        ridge = ceilings.peak(cost.precision) / ceilings.bandwidth_gbs
        points.append(RooflinePoint(
            k.name, k.calls, round(k.ms, 4), round(k.ms / total, 4), round(flop / 1e9, 4),
            round(nbytes / 1e6, 3), round(intensity, 3), round(achieved, 2), round(attainable, 2),
            round(achieved / attainable, 4) if attainable else 0.0,
            "compute" if intensity >= ridge else "memory", cost.precision))
    return points


def weighted_fraction(points: list[RooflinePoint]) -> float:
    """Time-weighted mean fraction of the roofline: one number per model."""
    return float(sum(p.fraction * p.share for p in points))


def write_roofline(points: list[RooflinePoint], ceilings: Ceilings, out_dir: Path,
                   title: str = "") -> dict[str, Path]:
    """roofline.png, roofline.csv, roofline.html and ceilings.json in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "roofline.csv", "html": out_dir / "roofline.html",
             "png": out_dir / "roofline.png", "ceilings": out_dir / "ceilings.json"}
    rows = [asdict(p) for p in points]
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["kernel"])
        writer.writeheader()
        writer.writerows(rows)
    paths["ceilings"].write_text(json.dumps(asdict(ceilings), indent=2))
    paths["html"].write_text(_html(points, ceilings, title))
    _plot(points, ceilings, paths["png"], title)
    return paths


def _html(points, ceilings: Ceilings, title: str) -> str:
    import html

    head = ("kernel", "precision", "calls", "ms", "share", "GFLOP", "MB", "flop/B", "GFLOP/s",
            "roof GFLOP/s", "fraction", "bound")
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            p.kernel, p.precision, p.calls, p.ms, f"{p.share:.1%}", p.gflop, p.mbytes, p.intensity,
            p.achieved_gflops, p.attainable_gflops, f"{p.fraction:.1%}", p.bound)) + "</tr>"
        for p in points)
    return (f"<!doctype html><meta charset='utf-8'><title>roofline {html.escape(title)}</title>"
            f"<h1>Roofline {html.escape(title)}</h1><p>{html.escape(ceilings.cpu)}, "
            f"{ceilings.threads} threads: peak {ceilings.peak_gflops} GFLOP/s fp32, "
            f"{ceilings.peak_int8_gops or 'n/a'} GOP/s int8, bandwidth "
            f"{ceilings.bandwidth_gbs} GB/s, ridge {ceilings.ridge:.1f} flop/B; time-weighted "
            f"fraction {weighted_fraction(points):.1%}</p><table border=1 cellpadding=3><tr>"
            + "".join(f"<th>{h}</th>" for h in head) + f"</tr>{cells}</table>")


def _plot(points, ceilings: Ceilings, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    plot_roofline(points, ceilings, ax, title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roofline(points: list[RooflinePoint], ceilings: Ceilings, ax, title: str = "") -> None:
    """The roof (log-log, ridge marked) and one dot per kernel on a matplotlib Axes, dot area
    proportional to the kernel's share of the time, the five heaviest labelled."""
    xs = [p.intensity for p in points if p.intensity > 0 and p.achieved_gflops > 0]
    lo = min([0.05, *xs]) / 2
    hi = max([ceilings.ridge * 20, *xs]) * 2
    grid = np.geomspace(lo, hi, 200)
    ax.plot(grid, [ceilings.attainable(x) for x in grid], color="black", lw=1.5,
            label=f"fp32 roof: {ceilings.bandwidth_gbs:g} GB/s, {ceilings.peak_gflops:g} GFLOP/s")
    if ceilings.peak_int8_gops > 0 and any(p.precision == "int8" for p in points):
        ax.plot(grid, [ceilings.attainable(x, "int8") for x in grid], color="black", lw=1, ls="--",
                label=f"int8 roof: {ceilings.peak_int8_gops:g} GOP/s")
    ax.axvline(ceilings.ridge, color="grey", ls=":", lw=1)
    ax.annotate(f"ridge {ceilings.ridge:.1f} flop/B", (ceilings.ridge, ceilings.peak_gflops),
                textcoords="offset points", xytext=(4, -14), fontsize=8, color="grey")
    shown = [p for p in points if p.intensity > 0 and p.achieved_gflops > 0]
    sizes = [30 + 1200 * p.share for p in shown]
    for precision, marker in (("fp32", "o"), ("int8", "s")):
        group = [(p, s) for p, s in zip(shown, sizes) if p.precision == precision]
        if group:
            ax.scatter([p.intensity for p, _ in group], [p.achieved_gflops for p, _ in group],
                       s=[s for _, s in group], marker=marker, alpha=0.6, edgecolors="black",
                       linewidths=0.5, c=["tab:blue" if p.bound == "compute" else "tab:orange"
                                          for p, _ in group])
    for p in sorted(shown, key=lambda p: -p.share)[:5]:
        ax.annotate(p.kernel[:28], (p.intensity, p.achieved_gflops), fontsize=7,
                    textcoords="offset points", xytext=(5, 3))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (flop / byte)")
    ax.set_ylabel("GFLOP/s (GOP/s for int8)")
    ax.set_title(f"Roofline {title} (dot area: share of latency; orange: memory-bound; "
                 "squares: int8)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.2)


def read_roofline(folder: Path) -> tuple[list[RooflinePoint], Ceilings]:
    """The table and ceilings that `write_roofline` left in `folder`."""
    ceilings = Ceilings(**json.loads((folder / "ceilings.json").read_text()))
    fields = RooflinePoint.__dataclass_fields__
    points = []
    with (folder / "roofline.csv").open() as f:
        for row in csv.DictReader(f):
            points.append(RooflinePoint(**{k: v if fields[k].type == "str" else _number(v)
                                           for k, v in row.items()}))
    return points, ceilings


def _number(text: str):
    return int(text) if text.lstrip("-").isdigit() else float(text)


def find_roofline(ref: str, tracking_uri: str) -> Path:
    """The roofline folder of a run: `ref` is a run folder, an exported artifact (its manifest
    names the MLflow run) or an MLflow run id (the folder is downloaded from the run's artifacts)."""
    from pipeline.errors import UserError

    path = Path(ref)
    if path.is_dir():
        if (path / "roofline" / "roofline.csv").exists():
            return path / "roofline"
        if (path / "roofline.csv").exists():
            return path
        manifest = path / "manifest.json"
        if not manifest.exists():
            raise UserError(f"{ref} holds no roofline (not a run folder, roofline folder or artifact)")
        ref = json.loads(manifest.read_text()).get("mlflow_run_id") or ""
        if not ref:
            raise UserError(f"{manifest} names no MLflow run")
    import tempfile

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_run(ref)
        folder = client.download_artifacts(ref, "run/roofline", tempfile.mkdtemp(prefix="roofline-"))
    except MlflowException as exc:
        raise UserError(f"no roofline for run {ref!r} in {tracking_uri}: "
                        f"{str(exc).splitlines()[0]}") from None
    if not (Path(folder) / "roofline.csv").exists():
        raise UserError(f"run {ref} has no roofline (it ran with --no-roofline or failed earlier)")
    return Path(folder)
