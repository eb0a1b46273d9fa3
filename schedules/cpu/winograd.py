"""Winograd F(m x m, 3 x 3) convolution for NHWC: the transforms as TE kernels, and their schedules.

A 3x3 stride-1 conv becomes   V = B^T d B  (input tiles),   M[ab] = V[ab] @ U[ab]  (alpha^2
independent GEMMs, U = G w G^T folded from the constant weight at compile time),   y = A^T M A.
F(4x4, 3x3) does 36 multiplies per 16 outputs instead of 144 (4x fewer), F(2x2, 3x3) 16 per 4
instead of 36 (2.25x); the GEMMs run on the matmul micro-kernel, the transforms are cheap
elementwise arithmetic. The matrices are Lavin & Gray's (arXiv:1509.09308), points 0, +-1, +-2,
+-1/2 for F(4, 3), which keep fp32 error around 1e-6 per layer.

Both transforms are separable (rows, then columns), and every coefficient is a compile-time
constant: each stage is written as `select(axis == i, <sum of the nonzero terms of row i>, ...)`.
The schedules unroll the transform axes, so each select folds to one expression with constant
coefficients and no multiplications by 0 or 1 survive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import s_tir, te, tirx

from schedules.analysis import block_facts, vector_lanes
from schedules.knobs import largest_divisor
from schedules.rule import CPURule


@dataclass(frozen=True)
class WinogradMatrices:
    m: int               # output tile
    BT: np.ndarray       # alpha x alpha   input transform (transposed)
    G: np.ndarray        # alpha x 3       weight transform
    AT: np.ndarray       # m x alpha       output transform (transposed)

    @property
    def alpha(self) -> int:
        return self.m + 2


WINOGRAD = {
    2: WinogradMatrices(
        2,
        BT=np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64),
        G=np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], dtype=np.float64),
        AT=np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)),
    4: WinogradMatrices(
        4,
        BT=np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                     [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
                    dtype=np.float64),
        G=np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                    [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=np.float64),
        AT=np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                     [0, 1, -1, 8, -8, 1]], dtype=np.float64)),
}

# Block names the schedule rules match on (they survive FuseTIR; function attributes do not).
INPUT_BLOCK = "winograd_input"
OUTPUT_BLOCK = "winograd_output"


def transform_weight(weight_ohwi: np.ndarray, m: int) -> np.ndarray:
    """U[a*alpha+b, c, k] = (G w[k, :, :, c] G^T)[a, b], in float64, returned as float32."""
    G = WINOGRAD[m].G
    u = np.einsum("ay,kyxc,bx->abck", G, weight_ohwi.astype(np.float64), G)
    alpha = WINOGRAD[m].alpha
    return u.reshape(alpha * alpha, *u.shape[2:]).astype(np.float32)


def _linear(coeffs, term):
    """sum(c * term(j)) over the nonzero c, without multiplications by +-1."""
    out = None
    for j, c in enumerate(coeffs):
        if c == 0:
            continue
        t = term(j)
        t = t if c == 1 else -t if c == -1 else t * tirx.const(float(c), "float32")
        out = t if out is None else out + t
    return out if out is not None else tirx.const(0.0, "float32")


def _select(axis, rows: list):
    """rows[axis] with `axis` a loop variable: folds to one row once the loop is unrolled."""
    out = rows[-1]
    for i in range(len(rows) - 2, -1, -1):
        out = tirx.Select(axis == i, rows[i], out)
    return out


def input_transform(data: te.Tensor, m: int) -> te.Tensor:
    """NHWC data (padding 1 folded in) -> V[alpha*alpha, P, C], P = N * (H/m) * (W/m) tiles."""
    BT = WINOGRAD[m].BT
    alpha = m + 2
    N, H, W, C = (int(x) for x in data.shape)
    TH, TW = H // m, W // m
    P = N * TH * TW

    def tile_elem(i, j, p, c):
        n, t = p // (TH * TW), p % (TH * TW)
        h, w = t // TW * m + i - 1, t % TW * m + j - 1
        inside = tirx.all(h >= 0, h < H, w >= 0, w < W)
        # Padding as a load at a clamped (always valid) index times a 0/1 mask. Not a select: in a
        # select's true branch TVM's simplifier assumes the condition, drops the clamp as
        # redundant, and LLVM loads before selecting, from outside `data` (a segfault at batch 8,
        # where the input starts a fresh mapping). Not a Let either: the FLOP counter rejects it.
        load = data[n, tirx.max(tirx.min(h, H - 1), 0), tirx.max(tirx.min(w, W - 1), 0), c]
        return load * tirx.Cast("float32", inside)

    # rows[i, b] = sum_j d[i, j] * BT[b, j]  (d B)
    rows = te.compute((alpha, alpha, P, C), lambda i, b, p, c: _select(
        b, [_linear(BT[bb], lambda j: tile_elem(i, j, p, c)) for bb in range(alpha)]),
        name=INPUT_BLOCK + "_rows")
    # V[a*alpha+b] = sum_i BT[a, i] * rows[i, b]  (B^T d B)
    return te.compute((alpha * alpha, P, C), lambda ab, p, c: _select(
        ab // alpha, [_linear(BT[a], lambda i: rows[i, ab % alpha, p, c]) for a in range(alpha)]),
        name=INPUT_BLOCK)


def output_transform(product: te.Tensor, m: int, out_shape: tuple[int, int, int, int]) -> te.Tensor:
    """M[alpha*alpha, P, K] -> NHWC y = A^T M A, tile by tile."""
    AT = WINOGRAD[m].AT
    alpha = m + 2
    N, H, W, K = out_shape
    TH, TW = H // m, W // m

    # cols[a, s, p, k] = sum_b M[a*alpha+b] * AT[s, b]  (M A)
    cols = te.compute((alpha, m, N * TH * TW, K), lambda a, s, p, k: _select(
        s, [_linear(AT[ss], lambda b: product[a * alpha + b, p, k]) for ss in range(m)]),
        name=OUTPUT_BLOCK + "_cols")

    def y(n, h, w, k):
        p = n * (TH * TW) + h // m * TW + w // m
        return _select(h % m, [_linear(AT[r], lambda a: cols[a, w % m, p, k]) for r in range(m)])

    return te.compute((N, H, W, K), y, name=OUTPUT_BLOCK)


def _transform_stages(sch: s_tir.Schedule, first: str, final: str):
    """(first stage, final stage, blocks after it) of a transform kernel, after inlining what was
    fused in front of the first stage (a layout transpose, an activation); None if it is not one.
    A kernel holding a transform in front of another is refused: inlining would recompute it."""
    blocks = block_facts(sch)
    if not blocks or not all(b.is_spatial for b in blocks):
        return None
    names = [b.block.name_hint for b in blocks]
    if final not in names or names.index(final) < 1 or names[names.index(final) - 1] != first:
        return None
    at = names.index(final)
    if any(n.startswith(("winograd_input", "winograd_output")) for n in names[:at - 1]):
        return None
    for b in blocks[:at - 1]:
        sch.compute_inline(b.rv)
    return blocks[at - 1].rv, blocks[at].rv, blocks[at + 1:]


class WinogradInputTransform(CPURule):
    """Loop nest: parallel(P) . c_o . [a . b (unrolled) . c_v (vector)], the row stage computed
    per (tile, channel vector) in registers."""

    name = "winograd_input"

    def schedule(self, sch: s_tir.Schedule, target, tunable: bool) -> bool:
        stages = _transform_stages(sch, INPUT_BLOCK + "_rows", INPUT_BLOCK)
        if stages is None or stages[2]:
            return False
        rows, out, _ = stages
        ab, p, c = sch.get_loops(out)
        alpha2, _, C = (int(sch.get(lp).extent) for lp in (ab, p, c))
        alpha = round(alpha2 ** 0.5)
        lanes = largest_divisor(C, vector_lanes(target))
        a, b = sch.split(ab, factors=[alpha, alpha])
        c_o, c_v = sch.split(c, factors=[C // lanes, lanes])
        sch.reorder(p, c_o, a, b, c_v)
        tile = sch.fuse(p, c_o)
        sch.parallel(tile)
        _in_registers(sch, rows, tile, [a, b], c_v, depth=1)
        return True


class WinogradOutputTransform(CPURule):
    """Loop nest: parallel(n, h/m, w/m) . k_o . [r . s (unrolled) . k_v (vector)], the column stage
    per tile in registers, and the fused epilogue (bias, residual, ReLU) inlined into the store."""

    name = "winograd_output"

    def schedule(self, sch: s_tir.Schedule, target, tunable: bool) -> bool:
        stages = _transform_stages(sch, OUTPUT_BLOCK + "_cols", OUTPUT_BLOCK)
        if stages is None:
            return False
        cols, out, epilogue = stages
        # The epilogue: the bias / residual / ReLU chain, and the residual's own layout transpose
        # (a producer, not a consumer of the transform). Producers and intermediate stages inline
        # forward; what is left (the stage that writes the output) inlines back into the store.
        kept = []
        for b in epilogue:
            try:
                sch.compute_inline(b.rv)
            except s_tir.ScheduleError:     # the output stage cannot be inlined forward
                kept.append(b)
        for b in kept:
            sch.reverse_compute_inline(b.rv)
        m = int(sch.get(sch.get_loops(cols)[1]).extent)
        n, h, w, k = sch.get_loops(out)
        K = int(sch.get(k).extent)
        lanes = largest_divisor(K, vector_lanes(target))
        h_o, r = sch.split(h, factors=[None, m])
        w_o, s = sch.split(w, factors=[None, m])
        k_o, k_v = sch.split(k, factors=[K // lanes, lanes])
        sch.reorder(n, h_o, w_o, k_o, r, s, k_v)
        sch.parallel(sch.fuse(n, h_o, w_o))
        _in_registers(sch, cols, k_o, [r, s], k_v, depth=2)
        return True


def _in_registers(sch: s_tir.Schedule, stage, at, unrolled: list, vector, depth: int) -> None:
    """Unroll the transform axes and vectorize the channels of the final stage; compute the first
    (separable) half, `stage`, per tile under loop `at`, unrolled too, so it stays in registers."""
    for lp in unrolled:
        sch.unroll(lp)
    sch.vectorize(vector)
    sch.compute_at(stage, at, preserve_unit_loops=True)
    sch.set_scope(stage, 0, "local")
    *rest, inner = sch.get_loops(stage)[depth:]
    sch.vectorize(inner)
    for lp in rest:
        sch.unroll(lp)
