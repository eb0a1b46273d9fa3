"""Default schedules for every kernel that has no tuning record (the `--trials 0` path).

`ScheduleUntuned` is DLight's ApplyDefaultSchedule plus one step DLight does not need on GPU:
kernels with `layout_free_buffers` get MetaSchedule's RewriteLayout postproc, so the weights are
prepacked into the order our micro-kernels read them, exactly as a tuned record would have them.
"""

from __future__ import annotations

import logging

import tvm
from tvm import tirx
from tvm.ir import IRModule
from tvm.s_tir import dlight

from schedules.cpu import cpu_rules

log = logging.getLogger(__name__)


def default_rules(target) -> list:
    """The rule list for `target`, most specific first (like MetaSchedule's own rule lists)."""
    if target.kind.name == "llvm":
        return cpu_rules()
    if target.kind.name == "cuda":
        g = dlight.gpu
        return [g.Matmul(), g.GEMV(), g.Reduction(), g.GeneralReduction(), g.Fallback()]
    return []


def schedule_func(func: tirx.PrimFunc, target, rules: list, tunable: bool = False):
    """(rule name, Schedule) from the first rule that matches, or None."""
    from tvm.s_tir import meta_schedule as ms

    for rule in rules:
        try:
            sch = rule.apply(func, target, tunable)
        except (RuntimeError, ValueError) as exc:   # TVM errors are RuntimeErrors: a shape the rule cannot handle
            log.warning("rule %s failed on %s: %s", type(rule).__name__, func.attrs.get("global_symbol", "?") if func.attrs else "?", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            continue
        if sch is None:
            continue
        if isinstance(sch, list):
            sch = sch[0]
        if func.attrs and "layout_free_buffers" in func.attrs and target.kind.name == "llvm":
            ms.postproc.RewriteLayout().apply(sch)
        return getattr(rule, "name", type(rule).__name__), sch
    return None


@tvm.transform.module_pass(opt_level=0, name="ScheduleUntuned")
class ScheduleUntuned:
    """Schedule every PrimFunc that is not yet scheduled (no tuning record) with the default rules."""

    def __init__(self, target=None) -> None:
        self.target = target
        self.applied: dict[str, str] = {}          # kernel name -> rule name, for the run log

    def transform_module(self, mod: IRModule, _ctx) -> IRModule:
        target = self.target or tvm.target.Target.current(allow_none=False)
        rules = default_rules(target)
        updated = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or (func.attrs and func.attrs.get("tirx.is_scheduled")):
                continue
            found = schedule_func(func, target, rules)
            if found is None:
                continue
            name, sch = found
            self.applied[gv.name_hint] = name
            updated[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for gv, func in updated.items():
            mod[gv] = func
        return mod
