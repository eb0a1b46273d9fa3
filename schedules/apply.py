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


def first_match(func: tirx.PrimFunc, target, rules: list, tunable: bool = False, kernel: str = "?"):
    """(rule, Schedule) from the first rule that schedules `func`, or None. A rule that fails on
    an odd shape (TVM's errors are RuntimeErrors) is logged and the next one tried."""
    for rule in rules:
        try:
            sch = rule.apply(func, target, tunable)
        except (RuntimeError, ValueError) as exc:
            log.warning("rule %s failed on %s: %s", type(rule).__name__, kernel,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            continue
        if sch is not None:
            return rule, sch[0] if isinstance(sch, list) else sch
    return None


def schedule_func(func: tirx.PrimFunc, target, rules: list, kernel: str = "?"):
    """(rule name, Schedule) from the first rule that matches, weights prepacked; or None."""
    from tvm.s_tir import meta_schedule as ms

    found = first_match(func, target, rules, kernel=kernel)
    if found is None:
        return None
    rule, sch = found
    if func.attrs and "layout_free_buffers" in func.attrs and target.kind.name == "llvm" \
            and not getattr(rule, "rewrites_layout", False):
        ms.postproc.RewriteLayout().apply(sch)
    return getattr(rule, "name", type(rule).__name__), sch


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
            found = schedule_func(func, target, rules, kernel=gv.name_hint)
            if found is None:
                continue
            name, sch = found
            self.applied[gv.name_hint] = name
            updated[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for gv, func in updated.items():
            mod[gv] = func
        return mod
