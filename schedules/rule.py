"""The rule interface: DLight's ScheduleRule (apply(func, target, tunable) -> Schedule | None)."""

from __future__ import annotations

from tvm.s_tir.dlight.base import ScheduleRule


class CPURule(ScheduleRule):
    name = "cpu_rule"

    def is_target_available(self, target) -> bool:
        return target.kind.name == "llvm"
