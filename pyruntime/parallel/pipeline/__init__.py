"""Pipeline parallelism: schedules (who computes and communicates what, in which order),
their validation and simulation, and pictures of them. csrc/core/schedule.h states the
executor convention every schedule assumes."""
from pyruntime.parallel.pipeline.schedule import (Action, Costs, SimResult, TimedEvent, build_schedule,
                                                  insert_communication, live_peaks, load_schedule_csv,
                                                  save_schedule_csv, schedule_names, simulate)
from pyruntime.parallel.pipeline.timeline import draw_timeline, plan_and_draw, write_chrome_trace

__all__ = [
    "schedule_names", "Action", "Costs", "SimResult", "TimedEvent", "build_schedule", "draw_timeline",
    "insert_communication", "live_peaks", "load_schedule_csv", "plan_and_draw", "save_schedule_csv", "simulate",
    "write_chrome_trace",
]
