"""Integer conv2d (NHWC) and matmul on the CPU's dot-product instruction (x86 VNNI `vpdpbusd`,
ARM `sdot`): `lanes` int32 accumulators, each adding a `depth`-element dot product of 8-bit values
per instruction. x86 CPUs without VNNI get the same product from two instructions (AVX-512BW /
AVX2 `pmaddubsw`: u8 x s8 pairs summed to int16, then `pmaddwd` with ones: pairs of those to
int32); the int16 sum saturates for 255 x 127 x 2, so their weights are quantized to [-63, 63]
(`weight_max`), as ONNX Runtime's `reduce_range` does for the same reason.

The kernel is the fp32 micro-kernel of conv2d.py / matmul.py with the vector FMA replaced by the
dot instruction: an `m_i x (n_r * lanes)` int32 tile in registers; per step one weight vector
(`lanes` output channels x `depth` input channels, 64 bytes) is loaded per `n_r`, and `depth`
consecutive input bytes are broadcast as one 32-bit word. The weight is prepacked at build time
to [n_o, ..., k_o, lanes, depth] (a layout-rewrite block, split out of the kernel and folded into
the constant by the post-tuning passes), so each vector load is contiguous.

TVM 0.27's own `dot_16x4_vnni` intrinsic does not compile with the LLVM it bundles (LLVM 22 takes
the byte operands of vpdpbusd as <64 x i8>, TVM passes <16 x i32>), so we declare our own. The
kernels tensorize the `global`-scope variant (the tile buffer is global so that it lives on the
stack, see common.accumulate_locally); the `local` one stays registered for tuning records made
before that change, whose traces name it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from schedules.analysis import BlockFacts, block_facts, vector_registers
from schedules.common import (
    accumulate_locally,
    extents,
    inline_prologue,
    max_accumulators,
    schedule_injective,
    tile_epilogue,
)
from schedules.knobs import Knobs, largest_divisor
from schedules.rule import CPURule

LAYOUT_REWRITE = "meta_schedule.layout_rewrite_preproc"


@dataclass(frozen=True)
class DotInstruction:
    name: str
    feature: str          # LLVM target feature that provides it
    lanes: int            # int32 accumulators per instruction
    depth: int            # 8-bit products summed into each accumulator
    a_dtype: str          # the activation operand (broadcast)
    b_dtype: str          # the weight operand (vector)
    llvm_intrinsic: str   # acc' = f(acc, a, b); or, with `widen`, pairs = f(a, b) summed by `widen`
    widen: str = ""       # int16 pairs -> int32 (pmaddwd with ones), added to acc
    weight_max: int = 127  # |quantized weight| bound that keeps the instruction exact

    def intrin_name(self, scope: str) -> str:
        return f"tvm_autotune.{self.name}_{self.lanes}x{self.depth}_{scope}"


VNNI = DotInstruction("vpdpbusd", "avx512vnni", 16, 4, "uint8", "int8", "llvm.x86.avx512.vpdpbusd.512")
AVX512BW = DotInstruction("pmaddubsw512", "avx512bw", 16, 4, "uint8", "int8",
                          "llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512", 63)
AVX2 = DotInstruction("pmaddubsw256", "avx2", 8, 4, "uint8", "int8", "llvm.x86.avx2.pmadd.ub.sw",
                      "llvm.x86.avx2.pmadd.wd", 63)
SDOT = DotInstruction("sdot", "dotprod", 4, 4, "int8", "int8", "llvm.aarch64.neon.sdot.v4i32.v16i8")
INSTRUCTIONS = (VNNI, AVX512BW, AVX2, SDOT)     # the first the target has is used


def _register(ins: DotInstruction, scope: str) -> str:
    lanes, depth, a_dt, b_dt = ins.lanes, ins.depth, ins.a_dtype, ins.b_dtype
    word = f"{a_dt}x{depth}"
    a_vec, b_vec, acc_vec = f"{a_dt}x{lanes * depth}", f"{b_dt}x{lanes * depth}", f"int32x{lanes}"
    pairs_vec = f"int16x{lanes * depth // 2}"
    two_step = bool(ins.widen)

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((depth,), a_dt, offset_factor=1),
             B: T.Buffer((lanes, depth), b_dt, offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope=scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:depth], B[0:lanes, 0:depth])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, depth):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((depth,), a_dt, offset_factor=1),
             B: T.Buffer((lanes, depth), b_dt, offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope=scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:depth], B[0:lanes, 0:depth])
            T.writes(C[0:lanes])
            # The `depth` activation bytes as one 32-bit word, broadcast to every lane. Written
            # inline: a named value here becomes a buffer, which the CPU backend allocates on the
            # heap (TVMBackendAllocWorkspace) once per register tile.
            if two_step:
                C[T.ramp(T.int32(0), 1, lanes)] = C.vload([0], dtype=acc_vec) + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(ins.widen),
                    T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id(ins.llvm_intrinsic),
                        T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], word), dtype="int32"),
                                                  lanes), dtype=a_vec),
                        B.vload([0, 0], dtype=b_vec), dtype=pairs_vec),
                    T.broadcast(T.int16(1), lanes * depth // 2), dtype=acc_vec)
            else:
                C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(ins.llvm_intrinsic), C.vload([0], dtype=acc_vec),
                    T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], word), dtype="int32"), lanes),
                                  dtype=a_vec),
                    B.vload([0, 0], dtype=b_vec), dtype=acc_vec)

    name = ins.intrin_name(scope)
    TensorIntrin.register(name, desc, impl, override=True)
    return name


for _ins in INSTRUCTIONS:
    for _scope in ("local", "global"):
        _register(_ins, _scope)


def dot_instruction(target) -> DotInstruction | None:
    from tvm.target.codegen import target_has_features

    for ins in INSTRUCTIONS:
        try:
            if target_has_features(ins.feature, target):
                return ins
        except Exception:  # noqa: BLE001, S112  (a feature unknown to this target's LLVM backend)
            continue
    return None


@dataclass
class IntMatch:
    prologue: list[BlockFacts]
    anchor: BlockFacts
    epilogue: list[BlockFacts]
    conv: bool                # NHWC conv2d (n, h, w, f, ry, rx, rc) or matmul (batch..., m, n, k)


def _int_operands(block: tirx.SBlock, ins: DotInstruction) -> bool:
    if len(block.reads) != 2 or len(block.writes) != 1:
        return False
    a, b = (str(r.source.dtype) for r in block.reads)
    return (a, b, str(block.writes[0].source.dtype)) == (ins.a_dtype, ins.b_dtype, "int32")


def match_int8(blocks: list[BlockFacts], ins: DotInstruction) -> IntMatch | None:
    from schedules.cpu.conv2d import match_conv2d_nhwc
    from schedules.cpu.matmul import match_matmul

    conv = match_conv2d_nhwc(blocks)
    if conv is not None and _int_operands(conv.anchor.block, ins):
        shape = [int(x) for x in conv.anchor.block.reads[1].source.shape]   # OHWI weight
        if shape[0] % ins.lanes == 0 and shape[3] % ins.depth == 0:
            return IntMatch(conv.prologue, conv.anchor, conv.epilogue, conv=True)
        return None
    found = match_matmul(blocks)
    if found is None or not _int_operands(found[0].block, ins):
        return None
    anchor, epilogue = found
    b_shape = [int(x) for x in anchor.block.reads[1].source.shape]
    if len(b_shape) != 2 or b_shape[1] % ins.lanes or b_shape[0] % ins.depth:
        return None      # only a constant [K, N] weight gets prepacked
    return IntMatch([], anchor, epilogue, conv=False)


def _prepack_weight(sch: s_tir.Schedule, block, ins: DotInstruction, conv: bool) -> None:
    """Read the weight through a copy in [n_o, ..., k_o, lanes, depth] order, marked as a layout
    rewrite so SplitLayoutRewritePreproc + FoldConstant run it once on the constant."""
    lanes, depth = ins.lanes, ins.depth
    copy = sch.cache_read(block, 1, "global")
    sch.annotate(copy, LAYOUT_REWRITE, True)
    if conv:
        index_map = lambda f, ry, rx, rc: (f // lanes, ry, rx, rc // depth, f % lanes, rc % depth)
    else:
        index_map = lambda k, n: (n // lanes, k // depth, n % lanes, k % depth)
    sch.transform_layout(block, ("read", 1), index_map)


def schedule_int8(sch: s_tir.Schedule, match: IntMatch, ins: DotInstruction, target,
                  tunable: bool) -> None:
    lanes, depth = ins.lanes, ins.depth
    knobs = Knobs(sch, tunable)
    anchor = match.anchor.rv
    prologue = inline_prologue(sch, match.prologue, match.anchor)
    last = accumulate_locally(sch, anchor, match.epilogue)
    _prepack_weight(sch, anchor, ins, match.conv)

    # Up to half the vector registers hold accumulators (VNNI: 32 zmm -> 16; NEON: 32 q -> 16;
    # AVX2: 16 ymm -> 8), fewer where the tile would no longer be a stack buffer (AVX-512: 15 x 64
    # bytes).
    accumulators = max_accumulators(4 * lanes, vector_registers(target) // 2)
    if match.conv:
        n, h, w, f, ry, rx, rc = sch.get_loops(anchor)
        _, H, W, F, _, _, C = extents(sch, [n, h, w, f, ry, rx, rc])
        f_rest, f_v = sch.split(f, factors=[F // lanes, lanes], preserve_unit_iters=True)
        n_r0 = largest_divisor(F // lanes, 4 if W * H < 16 else 2)
        f_o, f_r = knobs.split2(f_rest, F // lanes, n_r0, max_inner=4)
        w_o, w_i = knobs.split2(w, W, largest_divisor(W, max(1, accumulators // n_r0)), max_inner=16)
        h_o, h_i = knobs.split2(h, H, 1, max_inner=4)
        rc_o, rc_d = sch.split(rc, factors=[C // depth, depth], preserve_unit_iters=True)
        outer = [n, h_o, w_o, f_o]
        sch.reorder(*outer, ry, rx, rc_o, h_i, w_i, f_r, f_v, rc_d)
        tile = [h_i, w_i, f_r]
        reduce_from = ry
    else:
        *batch, m, n, k = sch.get_loops(anchor)
        M, N, K = extents(sch, [m, n, k])
        n_rest, f_v = sch.split(n, factors=[N // lanes, lanes], preserve_unit_iters=True)
        n_r0 = largest_divisor(N // lanes, 4 if M == 1 else 2)
        f_o, f_r = knobs.split2(n_rest, N // lanes, n_r0, max_inner=4)
        m_o, m_i = knobs.split2(m, M, largest_divisor(M, max(1, accumulators // n_r0)), max_inner=16)
        k_o, k_d = sch.split(k, factors=[K // depth, depth], preserve_unit_iters=True)
        outer = [*batch, f_o, m_o]
        sch.reorder(*outer, k_o, m_i, f_r, f_v, k_d)
        tile = [m_i, f_r]
        reduce_from = k_o
    sch.reverse_compute_at(last, outer[-1], preserve_unit_loops=True)
    sch.parallel(sch.fuse(*outer))
    init = sch.decompose_reduction(anchor, reduce_from)
    sch.tensorize(f_v, ins.intrin_name("global"))
    for lp in tile:
        sch.unroll(lp)
    *_, i_vec = init_loops = sch.get_loops(init)
    sch.vectorize(i_vec)
    for lp in init_loops[-1 - len(tile):-1]:
        sch.unroll(lp)
    tile_epilogue(sch, last, 1, lanes)      # below the parallel loop
    for b in prologue:
        schedule_injective(sch, b.rv, 64)


class Int8Dot(CPURule):
    """u8 x s8 (x86) / s8 x s8 (ARM) conv2d NHWC and matmul with int32 accumulation, tensorized."""

    name = "int8_dot"
    rewrites_layout = True     # its weight prepacking is part of the schedule, not RewriteLayout's

    def schedule(self, sch: s_tir.Schedule, target, tunable: bool) -> bool:
        ins = dot_instruction(target)
        blocks = block_facts(sch) if ins is not None else None
        match = match_int8(blocks, ins) if blocks else None
        if match is None:
            return False
        schedule_int8(sch, match, ins, target, tunable)
        return True
