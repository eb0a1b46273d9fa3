"""Our rules as MetaSchedule design spaces: the search mutates the micro-kernel's tile knobs
(sample_perfect_tile decisions that start at the untuned defaults) instead of exploring
MultiLevelTiling from scratch."""

from __future__ import annotations

from tvm.s_tir import meta_schedule as ms

from schedules.apply import default_rules, first_match
from schedules.rule import CPURule


def matching_rule(mod, target) -> CPURule | None:
    """The first of our rules that schedules this task's `main` (DLight's own rules excluded: they
    have no knobs to search)."""
    rules = [r for r in default_rules(target) if isinstance(r, CPURule)]
    found = first_match(mod["main"], target, rules, tunable=True, kernel="a tuning task")
    return found[0] if found else None


def rule_space(mod, target):
    """(rule name, ScheduleFn space generator) for a task our rules match, else None."""
    rule = matching_rule(mod, target)
    if rule is None:
        return None

    def sch_fn(sch) -> None:
        if not rule.schedule(sch, target, tunable=True):
            raise ValueError(f"rule {rule.name} no longer matches")

    postprocs = [ms.postproc.DisallowDynamicLoop()]
    if not getattr(rule, "rewrites_layout", False):
        postprocs.append(ms.postproc.RewriteLayout())
    mutators = {ms.mutator.MutateTileSize(): 1.0}
    return rule.name, ms.space_generator.ScheduleFn(sch_fn, sch_rules=[], postprocs=postprocs,
                                                    mutator_probs=mutators)


def default_candidate(ctx, space):
    """The design space at its default decisions with the postprocessors applied: the untuned
    schedule, measured first so a tuned kernel is never slower than the default."""
    from tvm import s_tir

    # Replayed from its trace onto the task, not `space.copy()`: copying a schedule that holds
    # tensorized blocks fails in 0.27 (unordered_map::at).
    sch = s_tir.Schedule(ctx.mod)
    space.trace.apply_to_schedule(sch, remove_postproc=True)
    sch.enter_postproc()          # as MetaSchedule does: replays of the trace drop what follows
    for postproc in ctx.space_generator.postprocs:
        if not postproc.apply(sch):
            return None
    return ms.MeasureCandidate(sch, ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True))
