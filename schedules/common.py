"""Schedule pieces shared by the rules: epilogue handling, injective stages, loop annotation."""

from __future__ import annotations

from tvm import s_tir, tirx

from schedules.analysis import BlockFacts


def inline_trivial_copies(sch: s_tir.Schedule, blocks: list[BlockFacts]) -> list[BlockFacts]:
    """Inline padding stages that pad nothing (1x1 convs): they are pure copies."""
    from schedules.analysis import is_trivial_copy

    kept = []
    for b in blocks:
        if is_trivial_copy(b.block):
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


def extents(sch: s_tir.Schedule, loops) -> list[int]:
    out = []
    for loop in loops:
        ext = sch.get(loop).extent
        if not isinstance(ext, tirx.IntImm):
            raise ValueError("symbolic extent")
        out.append(int(ext))
    return out


def schedule_injective(sch: s_tir.Schedule, block, lanes: int, parallel: bool = True) -> None:
    """Parallel outer loops, vectorized innermost axis (when it divides by `lanes`)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    exts = extents(sch, loops)
    inner = loops[-1]
    if exts[-1] % lanes == 0 and exts[-1] >= lanes:
        outer_part, inner = sch.split(loops[-1], factors=[None, lanes])
        loops = loops[:-1] + [outer_part]
        sch.vectorize(inner)
    elif exts[-1] <= 64:
        loops = loops[:-1]
        sch.vectorize(inner) if exts[-1] in (2, 4, 8, 16) else None
    if parallel and loops:
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        sch.parallel(fused)


def tile_epilogue(sch: s_tir.Schedule, block, depth: int, lanes: int) -> None:
    """The loops below `depth` (a register tile after reverse_compute_at): vectorize the channel
    axis, unroll the rest."""
    tile = sch.get_loops(block)[depth:]
    if not tile:
        return
    exts = extents(sch, tile)
    if exts[-1] % lanes == 0 and exts[-1] >= lanes:
        outer, vec = sch.split(tile[-1], factors=[None, lanes])
        sch.vectorize(vec)
        tile = tile[:-1] + [outer]
    for lp in tile:
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
