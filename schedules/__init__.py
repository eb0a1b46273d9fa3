"""Our default schedules: DLight-style rules (match a PrimFunc, return a Schedule) for the heavy
operators, used untuned (`ScheduleUntuned`) and as MetaSchedule design spaces (`tunable=True`)."""

from schedules.apply import ScheduleUntuned, default_rules, first_match, schedule_func

__all__ = ["ScheduleUntuned", "default_rules", "first_match", "schedule_func"]
