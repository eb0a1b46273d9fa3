"""Schedule pieces shared by the rules: epilogue handling, injective stages, loop annotation."""

from __future__ import annotations

from tvm import s_tir, tirx

from schedules.analysis import BlockFacts


def inline_prologue(sch: s_tir.Schedule, blocks: list[BlockFacts], anchor: BlockFacts
                    ) -> list[BlockFacts]:
    """Inline the stages before the anchor that need no buffer of their own: padding that pads
    nothing (1x1 convs), and elementwise producers of what only the epilogue reads (an int8
    residual's dequantize), which then compute inside the epilogue. Returns the rest."""
    from schedules.analysis import is_trivial_copy

    anchor_reads = {r.source.name for r in anchor.block.reads}
    kept = []
    for b in blocks:
        feeds_anchor = any(w.source.name in anchor_reads for w in b.block.writes)
        if is_trivial_copy(b.block) or not feeds_anchor:
            sch.compute_inline(b.rv)
        else:
            kept.append(b)
    return kept


def fold_epilogue(sch: s_tir.Schedule, epilogue: list[BlockFacts]):
    """Inline a chain of elementwise epilogue stages into the last one; returns it (or None)."""
    if not epilogue:
        return None
    for b in epilogue[:-1]:
        sch.compute_inline(b.rv)
    return epilogue[-1].rv


def accumulate_locally(sch: s_tir.Schedule, anchor, epilogue: list[BlockFacts]):
    """The register-tile setup every micro-kernel shares: the epilogue folded into one stage (or a
    write-back cache when there is none), and the anchor accumulating in a tile buffer that LLVM
    keeps in registers. Returns the stage that writes the output.

    The tile buffer's scope is `global`, not `local`: TVM 0.27 (LowerTVMBuiltin) puts a CPU
    allocation on the stack only when its scope is global and it is under ACCUMULATOR_BYTES;
    anything else is a TVMBackendAllocWorkspace call per tile, plus a memset and stores of every
    accumulator into that escaped buffer. On a 1x1 int8 conv (K = 64) that was half the time."""
    last = fold_epilogue(sch, epilogue)
    if last is None:
        last = sch.cache_write(anchor, 0, "global")
    sch.set_scope(anchor, 0, "global")
    return last


ACCUMULATOR_BYTES = 1024    # a register tile must stay below this to live on the stack (see above)


def max_accumulators(vector_bytes: int, limit: int = 16) -> int:
    """Vector accumulators a register tile may hold and still be a stack allocation."""
    return max(1, min(limit, (ACCUMULATOR_BYTES - 1) // vector_bytes))


def extents(sch: s_tir.Schedule, loops) -> list[int]:
    out = []
    for loop in loops:
        ext = sch.get(loop).extent
        if not isinstance(ext, tirx.IntImm):
            raise ValueError("symbolic extent")
        out.append(int(ext))
    return out


def _split_off_vector(sch: s_tir.Schedule, loops: list, lanes: int) -> list:
    """Split `lanes` off the innermost loop and vectorize them when it divides; returns the loops
    left above the vector."""
    (inner,) = extents(sch, loops[-1:])
    if inner % lanes or inner < lanes:
        return loops
    outer, vec = sch.split(loops[-1], factors=[None, lanes])
    sch.vectorize(vec)
    return loops[:-1] + [outer]


def schedule_injective(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Parallel outer loops, vectorized innermost axis. An innermost axis that does not divide
    by `lanes` stays serial below the parallel loop when short (vectorized if a power of two
    up to 16), else joins the parallel loop."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = extents(sch, loops)[-1]                 # symbolic extents: not ours to schedule
    rest = _split_off_vector(sch, loops, lanes)
    if rest is loops:
        if inner <= 64:
            rest = loops[:-1]
            if inner in (2, 4, 8, 16):
                sch.vectorize(loops[-1])
    if rest:
        sch.parallel(sch.fuse(*rest) if len(rest) > 1 else rest[0])


def tile_epilogue(sch: s_tir.Schedule, block, depth: int, lanes: int) -> None:
    """The loops below `depth` (a register tile after reverse_compute_at): vectorize the channel
    axis, unroll the rest."""
    tile = sch.get_loops(block)[depth:]
    if not tile:
        return
    for lp in _split_off_vector(sch, tile, lanes):
        sch.unroll(lp)


def vectorize_register_tile(sch: s_tir.Schedule, block, unrolled: int = 3) -> None:
    """The innermost loop becomes the vector, the `unrolled` loops above it are unrolled, so every
    accumulator access has a constant index and LLVM keeps the tile in registers."""
    *_, vec = loops = sch.get_loops(block)
    if sch.get(vec).kind != tirx.ForKind.VECTORIZED:
        sch.vectorize(vec)
    for lp in loops[-1 - unrolled:-1]:
        if sch.get(lp).kind != tirx.ForKind.UNROLLED:
            sch.unroll(lp)
