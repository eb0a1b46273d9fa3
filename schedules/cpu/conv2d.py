"""NHWC conv2d (dense and depthwise) as a register-blocked micro-kernel.

The output tile of `h_i x w_i` pixels by `f_r` vectors of channels lives in vector registers for
the whole reduction (the TOPI x86 NCHWc / oneDNN brgemm idea): per reduction step, `f_r` weight
vectors are loaded once and each of the `h_i * w_i` input scalars is broadcast into `f_r` FMAs.
The accumulator is a `local` buffer indexed only by unrolled loops, which LLVM turns into
registers. Weights are `layout_free`, so MetaSchedule's RewriteLayout prepacks them into the
order the kernel reads them ([f_o, rc_o, ry, rx, rc_i, f_r, f_v]) once, at build time.

Loop nest:  parallel(n, h_o, w_o, f_o) . rc_o . ry . rx . rc_i . [h_i . w_i . f_r . f_v(vector)]
Knobs:      f_r, w_i, h_i, rc_i (sample_perfect_tile when tunable; defaults from the register file).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx

from schedules.analysis import BlockFacts, block_facts, index_vars, vector_lanes, vector_registers
from schedules.common import (
    accumulate_locally,
    extents,
    inline_prologue,
    max_accumulators,
    schedule_injective,
    tile_epilogue,
    vectorize_register_tile,
)
from schedules.knobs import Knobs, largest_divisor
from schedules.rule import CPURule


@dataclass
class ConvMatch:
    prologue: list[BlockFacts]
    anchor: BlockFacts
    epilogue: list[BlockFacts]


def match_conv2d_nhwc(blocks: list[BlockFacts]) -> ConvMatch | None:
    reductions = [i for i, b in enumerate(blocks) if b.is_reduction]
    if len(reductions) != 1:
        return None
    at = reductions[0]
    anchor = blocks[at]
    if anchor.kinds != "SSSSRRR" or not all(b.is_spatial for b in blocks[:at] + blocks[at + 1:]):
        return None
    block = anchor.block
    v = [iv.var for iv in block.iter_vars]
    n, h, w, f, ry, rx, rc = v
    if len(block.reads) != 2 or len(block.writes) != 1:
        return None
    out = block.writes[0]
    if not _indexed_by(out, [n, h, w, f]):
        return None
    data, weight = block.reads
    if not _indexed_by(weight, [f, ry, rx, rc]):
        return None
    if len(data.region) != 4 or not _uses(data.region[3].min, rc):
        return None
    if not all(b.block.writes and len(b.block.writes[0].source.shape) == 4 for b in blocks[at + 1:]):
        return None
    return ConvMatch(blocks[:at], anchor, blocks[at + 1:])


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in index_vars(expr))


def _indexed_by(region, variables: list) -> bool:
    return len(region.region) == len(variables) and all(
        r.min.same_as(v) and isinstance(r.extent, tirx.IntImm) and int(r.extent) == 1
        for r, v in zip(region.region, variables))


def register_tile(width: int, f_vectors: int, accumulators: int) -> tuple[int, int]:
    """(w_i, f_r): the most accumulators up to `accumulators` (at most half the vector register
    file: the rest holds the weight vectors, the broadcast input and what LLVM needs for addressing
    without spilling; and a stack-sized tile, see common.max_accumulators); on a tie, the squarer
    tile, which issues fewer loads per FMA (7x2: 9 per 14 FMAs, 14x1: 15)."""
    best = (1, 1)
    for f_r in (1, 2, 4):
        if f_vectors % f_r:
            continue
        w_i = largest_divisor(width, max(1, accumulators // f_r))
        if w_i * f_r >= best[0] * best[1]:
            best = (w_i, f_r)
    return best


def schedule_conv2d_nhwc(sch: s_tir.Schedule, match: ConvMatch, target, tunable: bool) -> None:
    lanes_max = vector_lanes(target)
    registers = vector_registers(target)
    anchor = match.anchor.rv
    knobs = Knobs(sch, tunable)

    prologue = inline_prologue(sch, match.prologue, match.anchor)
    last = accumulate_locally(sch, anchor, match.epilogue)

    n, h, w, f, ry, rx, rc = sch.get_loops(anchor)
    _, H, W, F, _, _, C = extents(sch, [n, h, w, f, ry, rx, rc])
    lanes = largest_divisor(F, lanes_max) if F % 4 == 0 else 1
    w_i0, f_r0 = register_tile(W, F // lanes, max_accumulators(4 * lanes, registers // 2))

    f_rest, f_v = sch.split(f, factors=[F // lanes, lanes], preserve_unit_iters=True)
    f_o, f_r = knobs.split2(f_rest, F // lanes, f_r0, max_inner=4)
    w_o, w_i = knobs.split2(w, W, w_i0, max_inner=16)
    h_o, h_i = knobs.split2(h, H, 1, max_inner=4)
    rc_o, rc_i = knobs.split2(rc, C, C, max_inner=C)
    # Pixel tiles outermost, weight panels inside: the input rows of one tile stay in L1/L2 while
    # every weight panel passes over them. Per layer (hot caches) this was ~10% faster than the
    # weight-stationary order; inside ResNet-50 (cold operands) the two orders, and a heuristic
    # that picks the one reading the larger operand once, measured within noise (45-52 ms).
    outer = [n, h_o, w_o, f_o]
    sch.reorder(*outer, rc_o, ry, rx, rc_i, h_i, w_i, f_r, f_v)
    sch.reverse_compute_at(last, outer[-1], preserve_unit_loops=True)
    # One parallel loop over all output tiles: 7x7 maps have too few rows to balance two cores,
    # and static chunking still hands each thread a contiguous run of tiles.
    sch.parallel(sch.fuse(*outer))
    vectorize_register_tile(sch, anchor)
    # The update block stops being a "reduction block" once its init is split off, and the
    # vectorize primitive refuses such blocks: annotate first, decompose second.
    init = sch.decompose_reduction(anchor, rc_o)
    vectorize_register_tile(sch, init)
    tile_epilogue(sch, last, 1, lanes)      # below the parallel loop
    for b in prologue:
        schedule_injective(sch, b.rv, lanes_max)


class Conv2DNHWC(CPURule):
    """conv2d / depthwise conv2d in NHWC with OHWI (layout-free) weights."""

    name = "conv2d_nhwc"

    def schedule(self, sch: s_tir.Schedule, target, tunable: bool) -> bool:
        blocks = block_facts(sch)
        match = match_conv2d_nhwc(blocks) if blocks else None
        if match is None:
            return False
        schedule_conv2d_nhwc(sch, match, target, tunable)
        return True
