"""Pictures of pipeline schedules: Chrome/Perfetto traces and Gantt-chart PNGs.

    result = plan_and_draw("interleaved", pp=4, microbatches=8, virtual_stages=2,
                           png="interleaved.png", trace="interleaved.json")

Both writers take timed events: objects with rank, kind, microbatch, chunk, start and end
(TimedEvent from the simulator, or the same fields recorded by the executor). Simulated times
are in cost units (F = 1 by default); executor times are seconds, so pass us_per_unit=1e6 to
write_chrome_trace and unit="s" to draw_timeline.

matplotlib (the "plots" extra) is imported only by draw_timeline, through its object API with
the Agg canvas: no pyplot, no global backend switch.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence, Union

from pyruntime.parallel.pipeline.schedule import COMPUTE_KINDS, Costs, Schedule, SimResult, TimedEvent, simulate

# Blue / green / orange: distinct in colour and in lightness, so they survive grayscale.
COLORS = {"F": "#3A6FB0", "B": "#4E9A4E", "W": "#E08A2E"}


def write_chrome_trace(events: Iterable[TimedEvent], path: str | os.PathLike, *, us_per_unit: float = 1000.0,
                       name: str = "pipeline") -> None:
    """Chrome trace JSON (open in https://ui.perfetto.dev or chrome://tracing): one process per
    pipeline stage (an event's rank) with a "compute" and a "comm" thread, one complete ("ph":
    "X") event per action. us_per_unit maps event times to microseconds (default: one cost unit shows as 1 ms)."""
    events = list(events)
    trace: list[dict] = []
    for rank in sorted({e.rank for e in events}):
        trace.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"{name} stage {rank}"}})
        trace.append({"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}})
        for tid, thread in enumerate(("compute", "comm")):
            trace.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": thread}})
    for e in events:
        compute = e.kind in COMPUTE_KINDS
        args = {"microbatch": e.microbatch, "chunk": e.chunk}
        if not compute:
            args["peer"] = getattr(e, "peer", -1)
        trace.append({
            "name": f"{e.kind}{e.microbatch}" + (f".{e.chunk}" if e.chunk else ""),
            "cat": "compute" if compute else "comm",
            "ph": "X",
            "ts": e.start * us_per_unit,
            "dur": max(e.end - e.start, 0.0) * us_per_unit,
            "pid": e.rank,
            "tid": 0 if compute else 1,
            "args": args,
        })
    with open(path, "w") as f:
        json.dump({"traceEvents": trace, "displayTimeUnit": "ms"}, f)


def _shade(hex_color: str, chunk: int, chunks: int) -> tuple[float, float, float]:
    # Later chunks lighter (mixed towards white), so interleaved chunks tell apart.
    rgb = [int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    t = 0.55 * chunk / (chunks - 1) if chunks > 1 else 0.0
    return tuple(c + (1 - c) * t for c in rgb)


def _text_color(rgb: Sequence[float]) -> str:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return "black" if luminance > 0.6 else "white"


def draw_timeline(events: Iterable[TimedEvent], path: str | os.PathLike, *, pp: int | None = None,
                  title: str = "", unit: str = "F = 1", global_ranks: Sequence[int] | None = None) -> None:
    """Gantt chart PNG in the style of the classic pipeline diagrams: one row per pipeline stage
    (an event's `rank` is its stage, stage 0 on top), F / B / W boxes in blue / green / orange
    (later chunks lighter) with the micro-batch number inside; idle time (bubbles, waiting for
    messages) stays white. global_ranks[s], when given, is the process that ran stage s: rows
    then read "stage s (rank r)" (in a dp x pp x tp run stage 1 is rarely global rank 1)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    boxes = [e for e in events if e.kind in COMPUTE_KINDS]
    if not boxes:
        raise ValueError("draw_timeline: no compute events (F, B, W) to draw")
    pp = pp or 1 + max(e.rank for e in boxes)
    chunks = 1 + max(e.chunk for e in boxes)
    span = max(e.end for e in boxes)
    width = min(max(8.0, 0.3 * span * max(1, chunks // 2)), 40.0)
    fig = Figure(figsize=(width, 0.55 * pp + 1.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    inches_per_unit = 0.85 * width / span
    for e in boxes:
        color = _shade(COLORS[e.kind], e.chunk, chunks)
        ax.broken_barh([(e.start, e.end - e.start)], (e.rank - 0.4, 0.8), facecolors=[color],
                       edgecolor="white", linewidth=0.8)
        label = str(e.microbatch)
        # Font size that fits the label in the box; skip labels that would be unreadable.
        size = min(9.0, (e.end - e.start) * inches_per_unit * 72 / (0.7 * len(label) + 0.4))
        if size >= 4.5:
            ax.text((e.start + e.end) / 2, e.rank, label, ha="center", va="center", fontsize=size,
                    color=_text_color(color))
    ax.set_yticks(range(pp), stage_labels(pp, global_ranks))
    ax.set_ylim(pp - 0.5, -0.5)
    ax.set_xlim(0, span)
    ax.set_xlabel(f"time ({unit})")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    kinds = [k for k in COMPUTE_KINDS if any(e.kind == k for e in boxes)]
    handles = [Patch(color=COLORS[k], label={"F": "F forward", "B": "B backward", "W": "W weight grad"}[k])
               for k in kinds]
    if chunks > 1:
        handles.append(Patch(color=_shade("#808080", chunks - 1, chunks), label="lighter: later chunk"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16 - 0.1 / pp), ncol=len(handles),
              frameon=False, fontsize=9)
    if title:
        ax.set_title(title, fontsize=11)
    fig.savefig(path, bbox_inches="tight")


def stage_labels(pp: int, global_ranks: Sequence[int] | None = None) -> list[str]:
    if global_ranks is None:
        return [f"stage {s}" for s in range(pp)]
    if len(global_ranks) != pp:
        raise ValueError(f"draw_timeline: {len(global_ranks)} global ranks for {pp} stages")
    return [f"stage {s} (rank {r})" for s, r in enumerate(global_ranks)]


def first_pipeline_ranks(dims) -> list[int]:
    """Global rank of each stage of the (dp, tp) = (0, 0) pipeline, the one gather_timeline
    records (dims: a ParallelDims, of which only sizes and coords() are read)."""
    return [next(r for r in range(dims.world_size) if dims.coords(r) == {"dp": 0, "pp": s, "tp": 0})
            for s in range(dims.pp)]


def plan_and_draw(schedule: Union[str, Schedule], pp: int, microbatches: int, virtual_stages: int = 1,
                  png: str | os.PathLike | None = None, trace: str | os.PathLike | None = None,
                  costs: Costs | None = None) -> SimResult:
    """Simulates a named schedule (or per-rank action lists) and writes its Gantt chart PNG
    and/or Chrome trace. Raises ValueError as simulate() does."""
    result = simulate(schedule, pp, microbatches, virtual_stages, costs)
    if png is not None:
        title = (f"{result.schedule}: pp={pp}, microbatches={microbatches}, virtual_stages={virtual_stages}, "
                 f"bubble {result.bubble_fraction:.1%}")
        draw_timeline(result.events, png, pp=pp, title=title)
    if trace is not None:
        write_chrome_trace(result.events, trace, name=result.schedule)
    return result
