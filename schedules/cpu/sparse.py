"""Block-sparse (BSR) x dense matmul: Y[..., N] = X[..., K] @ W[K, N] with W stored in blocks.

Orientation. A block is R rows of K by C columns of N of the MatMul weight W[K, N] (1x16 on
AVX-512). For one block the kernel broadcasts X[m, k] and multiplies it with C *contiguous* block
values, accumulating into C contiguous outputs Y[m, n0:n0+C]: one FMA with an embedded broadcast
per output row and C/lanes vectors, no gather, no horizontal sum. The other orientation (blocks
of K, i.e. a dot product along K per output) would need a horizontal reduction per output or a
gather of X. Blocks are grouped by *block column* j (C outputs): BSR of W^T, whose rows are W's
column blocks, so the loop over the nonzero blocks of one j accumulates an `m_i x C` tile of Y in
registers and stores it once.

Static loops. The blocks of each block column are padded to the longest column, `L` blocks
(padding blocks have zero values): every loop has a constant extent, so the kernel is an ordinary
reduction block that MetaSchedule can sample tiles for (DisallowDynamicLoop rejects the indptr-
bounded CSR loop). The cost is `L / mean` extra FMAs, reported by the pass per layer. Indices are
clamped to [0, K) in the kernel: a padded row past K reads a valid X element (times a zero block
value), and the tuner's runner, which fills int32 buffers with random values, cannot read out of
bounds (two integer ops per block, nothing next to the m_i x C FMAs).

Loop nest:  parallel(j_o, m_o) . j_i . l . r . [m_i . c_r . c_v(vector)]
"""

from __future__ import annotations

from tvm import s_tir, te, tirx

from schedules.analysis import BlockFacts, block_facts, vector_lanes, vector_registers
from schedules.common import accumulate_locally, extents, tile_epilogue, vectorize_register_tile
from schedules.knobs import Knobs, largest_divisor
from schedules.rule import CPURule

BLOCK_NAME = "bsr_matmul"
OUT_EWISE_FUSABLE = 4      # relay/relax OpPatternKind: elementwise consumers fuse into the output


def bsr_matmul_func(lead: list[int], k: int, blocks_n: int, length: int, block: tuple[int, int],
                    dtype: str = "float32") -> tirx.PrimFunc:
    """The unscheduled kernel. Args: X[*lead, k], data[blocks_n, length, R, C],
    indices[blocks_n, length] (int32, block row of K), Y[*lead, blocks_n * C] (the pass slices
    off the columns past N when N is not a multiple of C)."""
    r_size, c_size = block

    def i64(*dims):        # Relax's legalized kernels use int64 shapes; FuseTIR wants them equal
        return tuple(tirx.IntImm("int64", int(d)) for d in dims)

    x = te.placeholder(i64(*lead, k), dtype, name="X")
    data = te.placeholder(i64(blocks_n, length, r_size, c_size), dtype, name="data")
    indices = te.placeholder(i64(blocks_n, length), "int32", name="indices")
    rl = te.reduce_axis(i64(0, length), name="l")
    rr = te.reduce_axis(i64(0, r_size), name="r")

    def body(*i):
        *m, n = i
        j, c = n // c_size, n % c_size
        row = tirx.min(tirx.max(indices[j, rl].astype("int64") * r_size + rr, 0), k - 1)
        return te.sum(x[(*m, row)] * data[j, rl, rr, c], axis=[rl, rr])

    y = te.compute(i64(*lead, blocks_n * c_size), body, name=BLOCK_NAME)
    func = te.create_prim_func([x, data, indices, y])
    return func.with_attr("op_pattern", OUT_EWISE_FUSABLE).with_attr("sparse.bsr_block",
                                                                      [r_size, c_size])


def match_bsr(blocks: list[BlockFacts]):
    """(anchor, epilogue) when the function is our BSR kernel plus elementwise stages."""
    anchors = [i for i, b in enumerate(blocks) if b.block.name_hint.startswith(BLOCK_NAME)]
    if len(anchors) != 1 or anchors[0] != 0:
        return None
    anchor = blocks[0]
    if not anchor.kinds.endswith("RR") or set(anchor.kinds[:-2]) != {"S"}:
        return None
    if not all(b.is_spatial for b in blocks[1:]):
        return None
    return anchor, blocks[1:]


def schedule_bsr(sch: s_tir.Schedule, anchor: BlockFacts, epilogue: list[BlockFacts], target,
                 tunable: bool, k: int, block_c: int) -> None:
    lanes_max = vector_lanes(target)
    registers = vector_registers(target)
    knobs = Knobs(sch, tunable)
    block = anchor.rv
    last = accumulate_locally(sch, block, epilogue)

    *lead, n, rl, rr = sch.get_loops(block)
    m = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    (M, NC) = extents(sch, [m, n])
    blocks_n = NC // block_c
    lanes = largest_divisor(block_c, lanes_max)
    vectors = block_c // lanes
    # accumulators: m_i * vectors registers, leaving a few for the block values and addresses;
    # and the m_i rows of X the blocks index at random stay in L1 (32 KB): measured 2x slower
    # with 16 rows of K=1024 than with 8
    m_i0 = largest_divisor(M, max(1, min((registers - 8) // vectors, max(4, 8192 // k))))
    # enough parallel tasks for the cores, each a run of block columns sharing the X rows in cache
    j_i0 = largest_divisor(blocks_n, max(1, blocks_n // 8))

    j, c_r, c_v = sch.split(n, factors=[blocks_n, vectors, lanes], preserve_unit_iters=True)
    j_o, j_i = knobs.split2(j, blocks_n, j_i0, max_inner=blocks_n)
    m_o, m_i = knobs.split2(m, M, m_i0, max_inner=max(1, (registers - 4) // vectors))
    sch.reorder(j_o, m_o, j_i, rl, rr, m_i, c_r, c_v)
    sch.reverse_compute_at(last, j_i, preserve_unit_loops=True)
    sch.parallel(sch.fuse(j_o, m_o))
    vectorize_register_tile(sch, block, unrolled=2)
    init = sch.decompose_reduction(block, rl)
    vectorize_register_tile(sch, init, unrolled=2)
    tile_epilogue(sch, last, 2, lanes)


class BsrMatmul(CPURule):
    """Our BSR kernel (`bsr_matmul_func`) with its fused elementwise epilogue. Knobs: the
    M tile in registers and the block columns per parallel task."""

    name = "bsr_matmul"
    rewrites_layout = True     # data is packed in kernel order already: no RewriteLayout

    def schedule(self, sch: s_tir.Schedule, target, tunable: bool) -> bool:
        blocks = block_facts(sch)
        found = match_bsr(blocks) if blocks else None
        if found is None:
            return False
        anchor = found[0]
        operands = _operands(anchor)
        if operands is None:
            return False
        schedule_bsr(sch, *found, target, tunable, *operands)
        return True


def _operands(anchor: BlockFacts) -> tuple[int, int] | None:
    """(K, C) from the buffers the anchor reads: `data` is the float buffer whose leading dims are
    the int32 `indices` buffer's shape, X the other float one."""
    bufs = [r.source for r in anchor.block.reads]
    ints = [b for b in bufs if "int" in str(b.dtype)]
    if len(ints) != 1 or len(bufs) != 3:
        return None
    idx_shape = [int(d) for d in ints[0].shape]
    floats = [b for b in bufs if b is not ints[0] and "float" in str(b.dtype)]
    data = [b for b in floats if len(b.shape) == 4 and [int(d) for d in b.shape[:2]] == idx_shape]
    x = [b for b in floats if not any(b.same_as(d) for d in data[:1])]
    if not data or len(x) != 1:
        return None
    return int(x[0].shape[-1]), int(data[0].shape[-1])
