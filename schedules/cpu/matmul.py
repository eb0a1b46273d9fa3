"""matmul / dense / batch_matmul ([batch...,] M x K @ K x N) as a register-blocked micro-kernel.

Same kernel as conv2d (see conv2d.py): an `m_i x (n_r * lanes)` output tile in vector registers,
`n_r` vectors of B loaded per k step, `m_i` broadcasts of A. Constant B (a dense layer's weight)
is layout-free, so RewriteLayout prepacks it to [n_o, k, n_r, lanes].

Loop nest:  parallel(batch..., n_o, m_o) . k_o . k_i . [m_i . n_r . n_v(vector)]
"""

from __future__ import annotations

from tvm import s_tir, tirx

from schedules.analysis import BlockFacts, block_facts, vector_lanes, vector_registers
from schedules.common import (
    accumulate_locally,
    extents,
    max_accumulators,
    tile_epilogue,
    vectorize_register_tile,
)
from schedules.knobs import Knobs, largest_divisor
from schedules.rule import CPURule


def _var_of(expr):
    return expr if isinstance(expr, tirx.Var) else None


def match_matmul(blocks: list[BlockFacts]):
    reductions = [i for i, b in enumerate(blocks) if b.is_reduction]
    if len(reductions) != 1:
        return None
    at = reductions[0]
    anchor = blocks[at]
    if not (anchor.kinds.endswith("SSR") and set(anchor.kinds[:-1]) == {"S"}):
        return None
    if not all(b.is_spatial for b in blocks[at + 1:]) or blocks[:at]:
        return None
    block = anchor.block
    if len(block.reads) != 2 or len(block.writes) != 1:
        return None
    *_, _m, n, k = [iv.var for iv in block.iter_vars]
    a, b = block.reads
    a_last, b_last = _var_of(a.region[-1].min), _var_of(b.region[-1].min)
    b_k = _var_of(b.region[-2].min) if len(b.region) > 1 else None
    if a_last is None or not a_last.same_as(k) or b_last is None or not b_last.same_as(n) \
            or b_k is None or not b_k.same_as(k):
        return None
    out_last = _var_of(block.writes[0].region[-1].min)
    if out_last is None or not out_last.same_as(n):
        return None
    return anchor, blocks[at + 1:]


def schedule_matmul(sch: s_tir.Schedule, anchor: BlockFacts, epilogue: list[BlockFacts], target,
                    tunable: bool) -> None:
    lanes_max = vector_lanes(target)
    registers = vector_registers(target)
    knobs = Knobs(sch, tunable)
    block = anchor.rv
    last = accumulate_locally(sch, block, epilogue)

    *batch, m, n, k = sch.get_loops(block)
    M, N, K = extents(sch, [m, n, k])
    lanes = largest_divisor(N, lanes_max)
    vectors = N // lanes
    n_r0 = largest_divisor(vectors, 4 if M == 1 else 2)
    m_i0 = largest_divisor(M, max(1, max_accumulators(4 * lanes, registers // 2) // n_r0))

    n_rest, n_v = sch.split(n, factors=[vectors, lanes], preserve_unit_iters=True)
    n_o, n_r = knobs.split2(n_rest, vectors, n_r0, max_inner=4)
    m_o, m_i = knobs.split2(m, M, m_i0, max_inner=16)
    k_o, k_i = knobs.split2(k, K, K, max_inner=K)
    sch.reorder(*batch, n_o, m_o, k_o, k_i, m_i, n_r, n_v)
    sch.reverse_compute_at(last, m_o, preserve_unit_loops=True)
    sch.parallel(sch.fuse(*batch, n_o, m_o))
    vectorize_register_tile(sch, block, unrolled=2)
    init = sch.decompose_reduction(block, k_o)
    vectorize_register_tile(sch, init, unrolled=2)
    tile_epilogue(sch, last, 1, lanes)


class Matmul(CPURule):
    name = "matmul"

    def schedule(self, sch: s_tir.Schedule, target, tunable: bool) -> bool:
        blocks = block_facts(sch)
        found = match_matmul(blocks) if blocks else None
        if found is None:
            return False
        schedule_matmul(sch, *found, target, tunable)
        return True


