"""Pipeline schedules through pyruntime._C: generation, validation, simulation, CSV files and
pictures. The exhaustive checks live in csrc/tests/test_schedule.cpp; these cover the
bindings and the Python layer."""
import dataclasses
import json
import pickle

import pytest

from pyruntime.parallel.pipeline import (Action, schedule_names, Costs, build_schedule, insert_communication,
                                         live_peaks, load_schedule_csv, plan_and_draw, save_schedule_csv, simulate)

RANKS = (2, 3, 4, 8)


def microbatch_counts(name, pp):
    """Accepted counts among m == pp, m not a multiple of pp, and a larger one."""
    counts = [pp, pp + 1, 3 * pp]
    if name == "interleaved":
        return [m for m in counts if m % pp == 0]
    return counts


def test_bindings_round_trip():
    import torch  # noqa: F401  (pyruntime._C links against libc10)
    from pyruntime import _C

    a = _C.PipelineAction("recv_f", 3, chunk=1, peer=0)
    assert (a.kind, a.microbatch, a.chunk, a.peer, a.stage, a.is_comm) == ("RECV_F", 3, 1, 0, -1, True)
    assert pickle.loads(pickle.dumps(a)) == a
    assert schedule_names() == ("naive", "gpipe", "1f1b", "interleaved", "zb") == tuple(_C.schedule_names())
    raw = _C.generate_schedule("1f1b", 2, 4)
    result = _C.validate_schedule(raw, 2, 4)
    assert result.makespan == pytest.approx(3 * (4 + 2 - 1))
    assert {e.kind for e in result.events} == {"F", "B", "SEND_F", "RECV_F", "SEND_B", "RECV_B"}
    with pytest.raises(ValueError, match="unknown pipeline action kind 'X'"):
        _C.PipelineAction("X", 0)

    actions = build_schedule("zb", 3, 5)
    assert all(isinstance(x, Action) and x.stage == rank for rank, xs in enumerate(actions) for x in xs)
    compute = build_schedule("zb", 3, 5, communication=False)
    assert not any(x.is_comm for xs in compute for x in xs)
    assert insert_communication(compute, 3, 5) == actions


@pytest.mark.parametrize("name", ["naive", "gpipe", "1f1b", "interleaved", "zb"])
@pytest.mark.parametrize("pp", RANKS)
def test_every_schedule_validates(name, pp):
    v = 2 if name == "interleaved" else 1
    for m in microbatch_counts(name, pp):
        result = simulate(name, pp, m, v)
        work = 3.0 * m  # default costs: F + B = 1 + 2, zb's F + B + W = 1 + 1 + 1
        assert result.busy == pytest.approx((work,) * pp)
        assert 0 <= result.bubble_fraction < 1
        assert len(result.events) == sum(len(xs) for xs in build_schedule(name, pp, m, v))


@pytest.mark.parametrize("pp", RANKS)
def test_closed_form_bubbles_and_memory(pp):
    for m in (pp, pp + 1, 3 * pp):
        expected = (pp - 1) / (m + pp - 1)
        gpipe, one = simulate("gpipe", pp, m), simulate("1f1b", pp, m)
        assert gpipe.bubble_fractions == pytest.approx((expected,) * pp)
        assert one.bubble_fractions == pytest.approx((expected,) * pp)
        assert simulate("zb", pp, m).bubble_fraction < one.bubble_fraction
        assert max(one.peak_activations) <= pp and one.peak_activations[0] == pp
        assert gpipe.peak_activations == (m,) * pp
    for v in (2, 4):
        m = 2 * pp
        result = simulate("interleaved", pp, m, v)
        assert result.bubble_fraction == pytest.approx((pp - 1) / (v * m + pp - 1))


def test_costs_and_latency():
    base = simulate("1f1b", 4, 8)
    slow = simulate("1f1b", 4, 8, costs=Costs(comm_latency=0.5))
    assert slow.makespan > base.makespan
    doubled = simulate("1f1b", 4, 8, costs=Costs(forward=2.0, backward=4.0))
    assert doubled.makespan == pytest.approx(2 * base.makespan)


@pytest.mark.parametrize("call, message", [
    (lambda: build_schedule("1f1b", 4, 3), r"'1f1b' needs microbatches >= pp \(got microbatches=3, pp=4"),
    (lambda: build_schedule("zb", 8, 7), "'zb' needs microbatches >= pp"),
    (lambda: build_schedule("interleaved", 4, 6, 2), "needs microbatches divisible by pp"),
    (lambda: build_schedule("interleaved", 4, 8, 1), "needs virtual_stages >= 2"),
    (lambda: build_schedule("gpipe", 4, 8, 2), "virtual_stages must be 1"),
    (lambda: build_schedule("gpipe", 0, 8), r"pp must be >= 1 \(got 0\)"),
    (lambda: build_schedule("gpipe", 2, 0), r"microbatches must be >= 1 \(got 0\)"),
    (lambda: build_schedule("dualpipe", 4, 8), "unknown pipeline schedule 'dualpipe'"),
    (lambda: simulate("1f1b", 2, 2, costs=Costs(forward=-1.0)), "costs must be >= 0"),
])
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_csv_round_trip(tmp_path):
    path = tmp_path / "interleaved.csv"
    actions = build_schedule("interleaved", 2, 4, 2)
    save_schedule_csv(actions, path)
    assert load_schedule_csv(path, 2, 2) == actions


COMPUTE_ONLY = """\
# 1F1B on 2 ranks, 2 micro-batches: compute only, messages are added
rank,kind,microbatch
0,F,0
0,F,1
1,F,0
1,b,0
1,F,1
1,B,1
0,B,0
0,B,1
"""


def test_csv_compute_only_gets_messages(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text(COMPUTE_ONLY)
    actions = load_schedule_csv(path, pp=2)
    assert actions == build_schedule("1f1b", 2, 2)
    assert simulate(actions, 2, 2).bubble_fraction == pytest.approx(1 / 3)


def test_csv_dropped_receive_names_the_line(tmp_path):
    path = tmp_path / "broken.csv"
    save_schedule_csv(build_schedule("1f1b", 2, 2), path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(line for line in lines if line != "1,RECV_F,1,0,0") + "\n")
    send_line = lines.index("0,SEND_F,1,0,1") + 1
    with pytest.raises(ValueError, match=rf"broken.csv:{send_line}: rank 0 action #3 SEND_F\(mb=1, chunk=0\) "
                                         r"to rank 1: no matching RECV_F on rank 1"):
        load_schedule_csv(path, 2)


def test_csv_deadlock_and_bad_lines(tmp_path):
    path = tmp_path / "hang.csv"
    # Rank 0 waits for B(0)'s gradient before F(1); rank 1 wants F(1) before running B(0).
    path.write_text("0,F,0\n0,B,0\n0,F,1\n0,B,1\n1,F,0\n1,F,1\n1,B,0\n1,B,1\n")
    with pytest.raises(ValueError, match=r"hang.csv(:\d+)?: deadlock: rank 0 action #\d+ RECV_B\(mb=0"):
        load_schedule_csv(path, 2)
    path.write_text("0,F,0\n0,F\n")
    with pytest.raises(ValueError, match=r"hang.csv:2: expected 'rank,kind,microbatch\[,chunk\[,peer\]\]'"):
        load_schedule_csv(path, 2)
    path.write_text("0,F,0\n3,F,0\n")
    with pytest.raises(ValueError, match=r"hang.csv:2: rank 3 out of range for pp=2"):
        load_schedule_csv(path, 2)
    path.write_text("0,F,0\n0,FWD,1\n")
    with pytest.raises(ValueError, match=r"hang.csv:2: unknown action kind 'FWD'"):
        load_schedule_csv(path, 2)


def test_png_and_trace(tmp_path):
    png, trace = tmp_path / "zb.png", tmp_path / "zb.json"
    result = plan_and_draw("zb", 2, 3, png=png, trace=trace)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = json.loads(trace.read_text())["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == len(result.events)
    assert {e["pid"] for e in complete} == {0, 1}
    first = min((e for e in complete if e["cat"] == "compute" and e["pid"] == 0), key=lambda e: e["ts"])
    assert (first["name"], first["ts"], first["dur"]) == ("F0", 0.0, 1000.0)


@pytest.mark.parametrize("name,pp,mb,v", [("1f1b", 4, 7, 1), ("zb", 3, 5, 1), ("interleaved", 2, 4, 2),
                                          ("gpipe", 3, 4, 1)])
def test_simulate_without_events_is_the_same_run(name, pp, mb, v):
    """events=False (the planner's search) runs generate + simulate in one C++ call and returns
    no events; every other figure is the full simulation's."""
    costs = Costs(forward=1.3, backward=2.9, backward_input=1.2, backward_weight=1.7, comm_latency=0.4)
    full, lean = simulate(name, pp, mb, v, costs), simulate(name, pp, mb, v, costs, events=False)
    assert full.events and not lean.events
    assert dataclasses.replace(full, events=()) == lean


@pytest.mark.parametrize("name", ["naive", "gpipe", "1f1b", "zb", "interleaved"])
def test_live_peaks_from_the_order_equal_the_simulated_ones(name):
    """The planner reads activation peaks without simulating (live_peaks): for every schedule,
    at several pp / micro-batch / virtual-stage counts and costs, they are the simulator's."""
    costs = Costs(forward=1.3, backward=2.9, backward_input=1.2, backward_weight=1.7, comm_latency=0.4)
    tried = 0
    for pp in (1, 2, 3, 4):
        for mb in (1, 2, 3, 4, 5, 8, 12):
            for v in ((2, 3) if name == "interleaved" else (1,)):
                try:
                    sim = simulate(name, pp, mb, v, costs, events=False)
                except ValueError:  # a shape the schedule refuses
                    with pytest.raises(ValueError):
                        live_peaks(name, pp, mb, v)
                    continue
                assert live_peaks(name, pp, mb, v) == (sim.peak_activations, sim.peak_pending_weight_grads)
                tried += 1
    assert tried >= 8
