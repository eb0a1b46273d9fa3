"""Tile-size knobs that are either fixed (the untuned default) or sampled (a MetaSchedule design space).

A rule asks for a split with a heuristic default; with `tunable=True` the split is a
`sample_perfect_tile` whose decision starts at that default, so the search mutates around our
micro-kernel instead of searching from scratch, and the untuned schedule is one point of the space.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in divisors(n) if d <= at_most)


@dataclass
class Knobs:
    sch: s_tir.Schedule
    tunable: bool

    def split2(self, loop, extent: int, inner: int, max_inner: int) -> list:
        """Split `loop` (of constant `extent`) into [outer, inner]; `inner` must divide `extent`."""
        inner = min(inner, max_inner)
        if self.tunable and extent > 1:
            factors = self.sch.sample_perfect_tile(loop, n=2, max_innermost_factor=max_inner,
                                                   decision=[extent // inner, inner])
            return self.sch.split(loop, factors=factors, preserve_unit_iters=True)
        return self.sch.split(loop, factors=[extent // inner, inner], preserve_unit_iters=True)
