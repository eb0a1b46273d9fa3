"""Sparse rewrite: `matmul(x, const W[K, N])` with a sparse enough W becomes our BSR kernel.

For each float32 matmul with a 2-d constant weight (how ONNX MatMul/Gemm linear layers import),
the weight's block sparsity is measured for the block shape (R along K, C along N; by default
1 x the target's vector lanes, see schedules/cpu/sparse.py for why). Layers at or above the
threshold are candidates; with mode `auto` each candidate's sparse kernel and our dense matmul
are built for that shape through the same passes and build as the model, timed interleaved, and
the sparse kernel is kept only where it is faster. Every layer gets a `SparseDecision`.

The rewrite runs before LegalizeOps: the call_tir kernel carries op_pattern kOutEWiseFusable, so
FuseOps puts the bias add / GELU / residual add that follow into the sparse kernel as it does for
the dense one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse
import tvm
from tvm import relax

from pipeline.errors import UserError
from pipeline.progress import ProgressCallback, ProgressEvent, no_progress

log = logging.getLogger(__name__)

SPARSE_MODES = ("auto", "on", "off")      # on: every candidate, unmeasured (tests, experiments)


@dataclass
class SparseSettings:
    mode: str = "auto"
    threshold: float = 0.7                 # block sparsity a weight needs to be a candidate
    block: tuple[int, int] | None = None   # (R along K, C along N); None: the target's choice
    repeats: int = 5                       # timed rounds per layer in `auto` (best of)


@dataclass
class PackedBsr:
    """BSR of W^T (block rows = C output columns), padded to `length` blocks per block row."""
    data: np.ndarray       # [blocks_n, length, R, C]; padding blocks are zero
    indices: np.ndarray    # [blocks_n, length] int32: block row of K (R rows of W)
    k: int
    n: int
    block: tuple[int, int]
    nnz_blocks: int

    @property
    def blocks_n(self) -> int:
        return self.data.shape[0]

    @property
    def length(self) -> int:
        return self.data.shape[1]

    @property
    def padding(self) -> float:
        """Padded FMAs over real ones: what the static-extent kernel pays for its tunable loops."""
        return self.blocks_n * self.length / max(1, self.nnz_blocks)


@dataclass
class SparseDecision:
    name: str
    shape: list[int]                       # [M, K, N]
    block: list[int]
    block_sparsity: float
    sparse: bool = False
    reason: str = ""
    sparse_ms: float | None = None
    dense_ms: float | None = None
    padding: float | None = None

    @property
    def speedup(self) -> float | None:
        return self.dense_ms / self.sparse_ms if self.sparse_ms and self.dense_ms else None

    def as_dict(self) -> dict:
        return {**asdict(self), "speedup": round(float(self.speedup), 3) if self.speedup else None}


# --- the format -------------------------------------------------------------------------------

def parse_block(text: str) -> tuple[int, int] | None:
    """'1x16' -> (1, 16); 'auto' -> None."""
    if text in ("auto", ""):
        return None
    parts = text.lower().split("x")
    try:
        r, c = (int(p) for p in parts)
    except ValueError:
        r = c = 0
    if len(parts) != 2 or r < 1 or c < 1:
        raise UserError(f"bad block {text!r}: use RxC with positive sizes (e.g. 1x16) or auto")
    return r, c


def preferred_block(target) -> tuple[int, int]:
    """1 x vector lanes: one block is one FMA per output row (schedules/cpu/sparse.py)."""
    from schedules.analysis import vector_lanes

    return 1, vector_lanes(target) if target.kind.name == "llvm" else 16


def _padded(w: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    r, c = block
    k, n = w.shape
    out = np.zeros((-(-k // r) * r, -(-n // c) * c), w.dtype)
    out[:k, :n] = w
    return out


def block_sparsity(w: np.ndarray, block: tuple[int, int]) -> float:
    """Fraction of the RxC blocks of W[K, N] (zero-padded to whole blocks) that are all zero."""
    r, c = block
    p = _padded(w, block)
    nonzero = np.abs(p).reshape(p.shape[0] // r, r, p.shape[1] // c, c).max(axis=(1, 3)) > 0
    return float(1.0 - nonzero.mean())


def to_bsr(w: np.ndarray, block: tuple[int, int]) -> scipy.sparse.bsr_matrix:
    """BSR of W^T [N, K] with (C, R) blocks: one block row per C output columns."""
    r, c = block
    return scipy.sparse.bsr_matrix(_padded(w, block).T, blocksize=(c, r))


def pack_bsr(w: np.ndarray, block: tuple[int, int]) -> PackedBsr:
    bsr = to_bsr(w, block)
    bsr.sort_indices()                     # ascending K per row: X is read front to back
    counts = np.diff(bsr.indptr)
    length = max(1, int(counts.max()) if counts.size else 1)
    blocks_n = bsr.shape[0] // block[1]
    data = np.zeros((blocks_n, length, *block), w.dtype)
    indices = np.zeros((blocks_n, length), np.int32)
    slot = np.arange(bsr.indptr[-1]) - np.repeat(bsr.indptr[:-1], counts)
    row = np.repeat(np.arange(blocks_n), counts)
    data[row, slot] = bsr.data.transpose(0, 2, 1)        # (C, R) blocks -> (R, C)
    indices[row, slot] = bsr.indices
    return PackedBsr(data, indices, w.shape[0], w.shape[1], block, int(bsr.indptr[-1]))


def unpack_bsr(p: PackedBsr) -> np.ndarray:
    """The dense W[K, N] back (padding blocks are zero, so adding them changes nothing)."""
    r, c = p.block
    out = np.zeros((-(-p.k // r) * r, p.blocks_n * c), p.data.dtype)
    for j in range(p.blocks_n):
        for slot in range(p.length):
            k0 = int(p.indices[j, slot]) * r
            out[k0:k0 + r, j * c:(j + 1) * c] += p.data[j, slot]
    return out[:p.k, :p.n]


# --- the rewrite ------------------------------------------------------------------------------

@dataclass
class _Site:
    name: str
    call: relax.Call
    weight: np.ndarray
    lead: list[int]
    packed: PackedBsr | None = None
    decision: SparseDecision | None = None
    extra: dict = field(default_factory=dict)


def find_sites(func: relax.Function, block: tuple[int, int]) -> list[_Site]:
    matmul = tvm.ir.Op.get("relax.matmul")
    sites = []
    for blk in func.body.blocks:
        for b in blk.bindings:
            call = b.value
            if not (isinstance(call, relax.Call) and call.op.same_as(matmul)):
                continue
            w = call.args[1]
            if not isinstance(w, tvm.ir.expr.GenericConst) or len(w.value.shape) != 2:
                continue
            shape = call.args[0].ty.shape
            if str(call.args[0].ty.dtype) != "float32" or str(w.value.dtype) != "float32" \
                    or shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
                continue
            weight = w.value.numpy()
            site = _Site(f"matmul_{len(sites)}", call, weight, [int(d) for d in shape][:-1])
            m = int(np.prod(site.lead)) if site.lead else 1
            site.decision = SparseDecision(site.name, [m, *map(int, weight.shape)], list(block),
                                           round(block_sparsity(weight, block), 4))
            sites.append(site)
    return sites


def _kernel_call(bb: relax.BlockBuilder, site: _Site, x) -> relax.Expr:
    from schedules.cpu.sparse import bsr_matmul_func

    p = site.packed
    func = bsr_matmul_func(site.lead, p.k, p.blocks_n, p.length, p.block).without_attr(
        "global_symbol")                    # a module has one `main`; add_func names it
    gv = bb.add_func(func, f"bsr_matmul_{site.name}")
    width = p.blocks_n * p.block[1]
    out = relax.call_tir(gv, [x, relax.const(p.data), relax.const(p.indices)],
                         out_ty=relax.TensorType([*site.lead, width], "float32"))
    if width == p.n:
        return out
    return relax.op.strided_slice(out, axes=[len(site.lead)], begin=[0], end=[p.n])


def _layer_module(site: _Site, sparse: bool) -> tvm.IRModule:
    """`main(x)` = this one layer, dense or sparse: what the per-layer timing builds."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([*site.lead, site.weight.shape[0]], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = _kernel_call(bb, site, x) if sparse else relax.op.matmul(x, relax.const(site.weight))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _layer_timer(site: _Site, sparse: bool, target, late_passes, post_passes):
    """A zero-argument call that times one layer (ms per call), built as the model is."""
    from pipeline.build import build
    from pipeline.passes.pipeline import apply_passes
    from pipeline.runtime import CompiledModel

    built = build(apply_passes(_layer_module(site, sparse), target, late_passes), target, None,
                  post_passes)
    model = CompiledModel(built.executable, list(built.params.values()))
    x = np.random.default_rng(0).standard_normal([*site.lead, site.weight.shape[0]])
    args = model.to_device([x.astype(np.float32)]) + model._params
    fn = model.vm.time_evaluator("main", model.device, number=10, repeat=1, min_repeat_ms=20)
    return lambda: fn(*args).mean * 1e3


def _time_layers(site: _Site, target, late_passes, post_passes, repeats: int,
                 dense_cache: dict) -> tuple[float, float]:
    """(sparse ms, dense ms), best of `repeats` rounds, the two alternating. The dense build
    depends only on the shape, so layers of one shape share it."""
    key = (tuple(site.lead), *site.weight.shape)
    if key not in dense_cache:
        dense_cache[key] = _layer_timer(site, False, target, late_passes, post_passes)
    timers = [_layer_timer(site, True, target, late_passes, post_passes), dense_cache[key]]
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate(timers):
            best[i] = min(best[i], fn())
    return best[0], best[1]


def sparsify(mod: tvm.IRModule, target, settings: SparseSettings, late_passes=(), post_passes=(),
             progress: ProgressCallback = no_progress) -> tuple[tvm.IRModule, list[SparseDecision]]:
    """(module with the chosen matmuls as BSR kernels, one decision per matmul site)."""
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    if settings.mode not in SPARSE_MODES:
        raise UserError(f"unknown --sparse {settings.mode!r}: use one of {', '.join(SPARSE_MODES)}")
    if not 0 <= settings.threshold <= 1:
        raise UserError("--sparse-threshold must be in [0, 1]")
    block = settings.block or preferred_block(target)
    sites = find_sites(mod["main"], block)
    if settings.mode == "off":
        return mod, []
    chosen, dense_cache = [], {}
    for i, site in enumerate(sites):
        d = site.decision
        if d.block_sparsity < settings.threshold:
            d.reason = f"block sparsity {d.block_sparsity:.2f} < threshold {settings.threshold:g}"
            continue
        site.packed = pack_bsr(site.weight, block)
        d.padding = round(float(site.packed.padding), 3)
        if settings.mode == "on":
            d.sparse, d.reason = True, "forced (--sparse on)"
        else:
            progress(ProgressEvent("sparse", f"timing {site.name} sparse vs dense", i, len(sites)))
            start = time.perf_counter()
            sparse_ms, dense_ms = _time_layers(site, target, late_passes, post_passes,
                                               settings.repeats, dense_cache)
            d.sparse_ms, d.dense_ms = round(float(sparse_ms), 4), round(float(dense_ms), 4)
            d.sparse = bool(sparse_ms < dense_ms)
            d.reason = f"measured {d.speedup:.2f}x" + ("" if d.sparse else ": dense is faster")
            log.debug("timing %s took %.1fs", site.name, time.perf_counter() - start)
        if d.sparse:
            chosen.append(site)
    for site in sites:
        log.info("sparse %s %s: %s (%s)", site.name, "x".join(map(str, site.decision.shape)),
                 "BSR" if site.decision.sparse else "dense", site.decision.reason)
    if not chosen:
        return mod, [s.decision for s in sites]

    bb = relax.BlockBuilder(mod)
    x_pat, w_pat = wildcard(), is_const()
    by_weight = [(s.call.args[1], s) for s in chosen]

    def rewrite(orig, matches):
        for const, site in by_weight:
            if matches[w_pat].same_as(const) and orig.args[0].same_as(site.call.args[0]):
                return _kernel_call(bb, site, matches[x_pat])
        return orig

    main = rewrite_call(is_op("relax.matmul")(x_pat, w_pat), rewrite, mod["main"])
    new = bb.get()
    new["main"] = main
    return relax.transform.Normalize()(new), [s.decision for s in sites]


# --- `tune run --sparse` ----------------------------------------------------------------------

def check_sparse_flags(config) -> SparseSettings:
    """The run's SparseSettings, or a UserError for a bad flag."""
    if config.sparse not in SPARSE_MODES:
        raise UserError(f"unknown --sparse {config.sparse!r}: use one of {', '.join(SPARSE_MODES)}")
    if not 0 <= config.sparse_threshold <= 1:
        raise UserError("--sparse-threshold must be in [0, 1]")
    if config.sparse != "off" and config.quantize != "none":
        raise UserError("--sparse and --quantize int8 cannot be combined yet")
    return SparseSettings(config.sparse, config.sparse_threshold, parse_block(config.sparse_block))


def sparse_stage(config, mod: tvm.IRModule, target, late_passes, post_passes, recorder, run_dir,
                 progress: ProgressCallback = no_progress) -> tuple[tvm.IRModule, dict]:
    """Run `sparsify` for `tune run`; writes sparse.json (the per-layer decisions) to the run
    folder and MLflow. Returns the module and the summary for RunResult.sparse."""
    import json

    settings = check_sparse_flags(config)
    mod, decisions = sparsify(mod, target, settings, late_passes, post_passes, progress)
    block = list(settings.block or preferred_block(target))
    table = [d.as_dict() for d in decisions]
    (run_dir / "sparse.json").write_text(json.dumps(
        {"mode": settings.mode, "threshold": settings.threshold, "block": block, "layers": table},
        indent=2))
    recorder.params({"sparse": settings.mode, "sparse_threshold": settings.threshold,
                     "sparse_block": "x".join(map(str, block))})
    sparse_layers = sum(d.sparse for d in decisions)
    recorder.metrics({"sparse_layers": sparse_layers, "dense_layers": len(decisions) - sparse_layers})
    return mod, {"mode": settings.mode, "block": block, "sparse_layers": sparse_layers,
                 "layers": len(decisions),
                 "decisions": {d.name: ("bsr" if d.sparse else "dense") + f": {d.reason}"
                               for d in decisions}}
