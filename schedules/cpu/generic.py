"""The rest of a CNN/transformer: channels-last window reductions (pooling, global mean) and
injective kernels (layout transposes, elementwise, padding). Memory-bound; the goal is every core
busy and full-width vector loads and stores."""

from __future__ import annotations

from tvm import s_tir

from schedules.analysis import block_facts, vector_lanes
from schedules.common import extents, schedule_injective
from schedules.knobs import largest_divisor
from schedules.rule import CPURule


class ChannelsLastReduction(CPURule):
    """A reduction whose output's innermost axis is spatial and is also the reduced input's innermost
    axis (NHWC pooling, mean over H and W): the reduction loops move above that axis, which is
    vectorized, so each step loads a full vector of channels."""

    name = "channels_last_reduction"

    def schedule(self, sch: s_tir.Schedule, target, tunable: bool) -> bool:
        blocks = block_facts(sch)
        if not blocks:
            return False
        reductions = [b for b in blocks if b.is_reduction]
        if len(reductions) != 1:
            return False
        anchor = reductions[0]
        kinds = anchor.kinds
        n_spatial = len(kinds.rstrip("R"))
        if set(kinds[:n_spatial]) != {"S"} or set(kinds[n_spatial:]) != {"R"}:
            return False
        inner = anchor.block.iter_vars[n_spatial - 1].var
        out = anchor.block.writes[0].region
        # Every read runs along the channel axis too; a read whose last index is something else
        # (a matmul's A[m, k]) would make the vector loads strided.
        tensors = [r for r in anchor.block.reads if len(r.region) == len(out)]
        if not out[-1].min.same_as(inner) or not tensors or \
                not all(r.region[-1].min.same_as(inner) for r in tensors):
            return False
        lanes_max = vector_lanes(target)
        loops = sch.get_loops(anchor.rv)
        spatial, reduce = loops[:n_spatial], loops[n_spatial:]
        (c,) = extents(sch, [spatial[-1]])
        lanes = largest_divisor(c, lanes_max)
        c_o, c_v = sch.split(spatial[-1], factors=[c // lanes, lanes])
        sch.reorder(*spatial[:-1], c_o, *reduce, c_v)
        sch.parallel(sch.fuse(*spatial[:-1], c_o))
        sch.vectorize(c_v)
        for b in blocks:
            if b is anchor:
                continue
            try:
                # A pool's padding reads through a bounds check instead of a padded copy: the
                # copy is a workspace as large as the input (0.8-3 MB at a ResNet stem), allocated,
                # written and read again on every call.
                sch.compute_inline(b.rv)
            except Exception:  # noqa: BLE001  (not inlinable: an epilogue, or feeds two consumers)
                schedule_injective(sch, b.rv, lanes_max)
        return True


class Injective(CPURule):
    """Spatial-only kernels: fuse, parallelize, vectorize the innermost axis."""

    name = "injective"

    def schedule(self, sch: s_tir.Schedule, target, tunable: bool) -> bool:
        blocks = block_facts(sch)
        if not blocks or not all(b.is_spatial for b in blocks):
            return False
        lanes = vector_lanes(target)
        for b in blocks[:-1]:
            try:
                sch.compute_inline(b.rv)
            except Exception:  # noqa: BLE001  (not inlinable, e.g. it feeds two consumers: keep it)
                schedule_injective(sch, b.rv, lanes)
        schedule_injective(sch, blocks[-1].rv, lanes)
        return True
