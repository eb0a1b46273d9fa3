"""The rule interface: DLight's ScheduleRule (apply(func, target, tunable) -> Schedule | None),
split so that the same code can schedule a fresh Schedule (untuned build) or the Schedule that a
MetaSchedule space generator hands in (its sampling instructions become the search space)."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule


class CPURule(ScheduleRule):
    name = "cpu_rule"

    def is_target_available(self, target) -> bool:
        return target.kind.name == "llvm"

    def apply(self, func: tirx.PrimFunc, target, tunable: bool):
        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        return sch if self.schedule(sch, target, tunable) else None

    def schedule(self, sch: s_tir.Schedule, target, tunable: bool) -> bool:
        """Schedule `sch` in place and return True, or return False (untouched) if it does not match."""
        raise NotImplementedError
