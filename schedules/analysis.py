"""Block-level facts the rules match on: which block is the anchor, which blocks are prologue and
epilogue, and how the anchor indexes its buffers. Plain TIR inspection, no scheduling."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import ir, s_tir, tirx


@dataclass
class BlockFacts:
    rv: object                        # SBlockRV
    block: tirx.SBlock
    kinds: str                        # one letter per block iter: S spatial, R reduction, O other

    @property
    def is_reduction(self) -> bool:
        return "R" in self.kinds

    @property
    def is_spatial(self) -> bool:
        return set(self.kinds) <= {"S"}


def _kind(iter_var: tirx.IterVar) -> str:
    return {tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}.get(iter_var.iter_type, "O")


def block_facts(sch: s_tir.Schedule) -> list[BlockFacts] | None:
    """The root's child blocks in order, or None when the function nests blocks (already scheduled)."""
    root = sch.get_sblock("root", func_name="main") if _has_root(sch) else None
    if root is None:
        return None
    facts = []
    for rv in sch.get_child_blocks(root):
        block = sch.get(rv)
        if _nested(block):
            return None
        facts.append(BlockFacts(rv, block, "".join(_kind(iv) for iv in block.iter_vars)))
    return facts


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root", func_name="main")
        return True
    except Exception:  # noqa: BLE001  (no root block: not a schedulable function)
        return False


def _nested(block: tirx.SBlock) -> bool:
    """An unscheduled leaf block's body is a single store; anything else is a scheduled nest."""
    return not isinstance(block.body, tirx.BufferStore)


def index_vars(index: tirx.PrimExpr) -> list:
    return list(tirx.analysis.undefined_vars(index))


def is_trivial_copy(block: tirx.SBlock) -> bool:
    """`out[i...] = in[i...]` with identical indices: a padding stage that pads nothing."""
    body = block.body
    if not isinstance(body, tirx.BufferStore) or not isinstance(body.value, ir.TensorLoad):
        return False
    load = body.value
    return (len(load.indices) == len(body.indices)
            and all(a.same_as(b) for a, b in zip(load.indices, body.indices))
            and [int(x) for x in load.source.shape] == [int(x) for x in body.buffer.shape])


def vector_lanes(target, dtype_bits: int = 32) -> int:
    """SIMD lanes of `dtype_bits` on an llvm target, from LLVM's own feature table for its mcpu/mattr."""
    from tvm.target.codegen import target_has_features

    bits = 512 if target_has_features("avx512f", target) else \
        256 if target_has_features("avx2", target) or target_has_features("avx", target) else 128
    return bits // dtype_bits


def vector_registers(target) -> int:
    """Architectural SIMD registers: 32 on AArch64 (v0-v31) and with AVX-512 (zmm0-31), 16 with
    AVX/AVX2 or SSE. Register tiles hold up to half of them as accumulators."""
    if str(target.attrs.get("mtriple", "")).startswith("aarch64"):
        return 32
    return 32 if vector_lanes(target) == 16 else 16
