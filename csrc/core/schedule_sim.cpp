// Timed simulation of a structurally valid schedule (schedule_check.cpp) under the executor
// convention of schedule.h. Each rank has a program (its action list, run in order on the
// compute stream) and a comm stream that runs its batches one after another. Compute actions
// run back to back; reaching a batch hands it to the comm stream without waiting; an F or B
// that consumes a received tensor waits for the batch that received it. A batch starts (is
// posted) when handed over and the previous batch finished, and completes once every op's
// counterpart has started too, comm_latency after the later of the two. No progress with
// work left is a deadlock.
#include <algorithm>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "core/schedule.h"
#include "core/schedule_detail.h"

namespace pyruntime {

namespace {

using schedule_detail::CheckedSchedule;
using schedule_detail::where;

void check_costs(const Costs& c) {
  if (c.forward < 0 || c.backward < 0 || c.backward_input < 0 || c.backward_weight < 0 || c.comm_latency < 0) {
    throw std::invalid_argument("costs must be >= 0 (got forward=" + std::to_string(c.forward) +
                                ", backward=" + std::to_string(c.backward) + ", backward_input=" +
                                std::to_string(c.backward_input) + ", backward_weight=" +
                                std::to_string(c.backward_weight) + ", comm_latency=" + std::to_string(c.comm_latency) + ")");
  }
}

class Simulator {
 public:
  Simulator(const CheckedSchedule& s, const PipelineShape& shape, const Costs& costs)
      : s_(s), shape_(shape), costs_(costs), ranks_(shape.pp) {
    for (int r = 0; r < shape.pp; ++r) {
      const RankActions& actions = s.actions[r];
      RankState& st = ranks_[r];
      st.segment_of.assign(actions.size(), -1);
      for (int i = 0; i < static_cast<int>(actions.size()); ++i) {
        const bool comm = is_comm(actions[i].kind);
        if (!(comm && i > 0 && is_comm(actions[i - 1].kind))) st.segments.push_back({i, i + 1, comm});
        st.segments.back().end = i + 1;
        st.segment_of[i] = static_cast<int>(st.segments.size()) - 1;
      }
      // The batch holding each compute's receive: the latest RECV_F / RECV_B of its (chunk,
      // micro-batch) before it (the structure check put it there and bounded both indices),
      // found in one forward pass (a backward search per action was quadratic in the
      // micro-batches: seconds per schedule in the planner's search at large global batches).
      st.consumes.assign(actions.size(), -1);
      const size_t cells = static_cast<size_t>(shape.virtual_stages) * shape.microbatches;
      std::vector<int> latest_recv_f(cells, -1), latest_recv_b(cells, -1);
      for (int i = 0; i < static_cast<int>(actions.size()); ++i) {
        const Action& a = actions[i];
        const size_t cell = static_cast<size_t>(a.chunk) * shape.microbatches + a.microbatch;
        if (a.kind == ActionKind::RECV_F) latest_recv_f[cell] = st.segment_of[i];
        if (a.kind == ActionKind::RECV_B) latest_recv_b[cell] = st.segment_of[i];
        if (a.kind == ActionKind::F) st.consumes[i] = latest_recv_f[cell];
        if (a.kind == ActionKind::B) st.consumes[i] = latest_recv_b[cell];
      }
      st.enqueued.assign(st.segments.size(), -1.0);
      st.posted.assign(st.segments.size(), -1.0);
      st.done.assign(st.segments.size(), -1.0);
      timed_.emplace_back(actions.size());
    }
  }

  SimResult run() {
    for (bool progress = true; progress;) {
      progress = false;
      for (int r = 0; r < shape_.pp; ++r) progress |= advance_cpu(r);
      for (int r = 0; r < shape_.pp; ++r) progress |= advance_stream(r);
    }
    for (const RankState& st : ranks_) {
      if (st.pc < static_cast<int>(st.segments.size()) || st.head < static_cast<int>(st.queue.size())) {
        report_deadlock();
      }
    }
    return result();
  }

 private:
  // One compute action, or a maximal run of comm actions posted together: [begin, end).
  struct Segment {
    int begin;
    int end;
    bool batch;
  };

  struct RankState {
    std::vector<Segment> segments;
    std::vector<int> segment_of;  // action index -> segment
    std::vector<int> consumes;    // compute action index -> batch receiving its input; -1 = none
    int pc = 0;                   // next segment the rank's program reaches
    double cpu = 0.0;             // when its compute stream is free
    std::vector<int> queue;       // batches handed to the comm stream, in order
    int head = 0;                 // first batch in `queue` not completed
    double stream = 0.0;          // when the comm stream finished its last batch
    std::vector<double> enqueued, posted, done;  // per segment; -1 = not yet
  };

  double duration(ActionKind kind) const {
    const double v = shape_.virtual_stages;
    if (kind == ActionKind::F) return costs_.forward / v;
    if (kind == ActionKind::W) return costs_.backward_weight / v;
    return (s_.split_backward ? costs_.backward_input : costs_.backward) / v;
  }

  // Runs rank r's program until it ends or reaches a compute whose received input is not
  // there yet.
  bool advance_cpu(int r) {
    RankState& st = ranks_[r];
    bool moved = false;
    while (st.pc < static_cast<int>(st.segments.size())) {
      const Segment& seg = st.segments[st.pc];
      if (!seg.batch) {
        const int needs = st.consumes[seg.begin];
        if (needs >= 0) {
          if (st.done[needs] < 0) return moved;
          st.cpu = std::max(st.cpu, st.done[needs]);
        }
        const double start = st.cpu;
        st.cpu += duration(s_.actions[r][seg.begin].kind);
        timed_[r][seg.begin] = {r, seg.begin, s_.actions[r][seg.begin], start, st.cpu};
      } else {
        if (st.enqueued[st.pc] < 0) {
          st.enqueued[st.pc] = st.cpu;
          st.queue.push_back(st.pc);
          advance_stream(r);
          moved = true;
        }
      }
      ++st.pc;
      moved = true;
    }
    return moved;
  }

  // Post time of the batch holding the counterpart of comm action (r, i); -1 if not posted.
  double peer_posted(int r, int i) const {
    const auto [q, j] = s_.match[r][i];
    return ranks_[q].posted[ranks_[q].segment_of[j]];
  }

  // Starts and completes batches on rank r's comm stream, one after another.
  bool advance_stream(int r) {
    RankState& st = ranks_[r];
    bool moved = false;
    while (st.head < static_cast<int>(st.queue.size())) {
      const int id = st.queue[st.head];
      if (st.posted[id] < 0) {
        st.posted[id] = std::max(st.enqueued[id], st.stream);
        moved = true;
      }
      const Segment& seg = st.segments[id];
      for (int i = seg.begin; i < seg.end; ++i) {
        if (peer_posted(r, i) < 0) return moved;
      }
      double end = st.posted[id];
      for (int i = seg.begin; i < seg.end; ++i) {
        const double done = std::max(st.posted[id], peer_posted(r, i)) + costs_.comm_latency;
        timed_[r][i] = {r, i, s_.actions[r][i], st.posted[id], done};
        end = std::max(end, done);
      }
      st.done[id] = st.stream = end;
      ++st.head;
      moved = true;
    }
    return moved;
  }

  // The first op of rank r's current batch whose counterpart has not started; -1 if none.
  int waiting_op(int r) const {
    const RankState& st = ranks_[r];
    if (st.head >= static_cast<int>(st.queue.size())) return -1;
    const Segment& seg = st.segments[st.queue[st.head]];
    for (int i = seg.begin; i < seg.end; ++i) {
      if (peer_posted(r, i) < 0) return i;
    }
    return -1;
  }

  // "action #2 RECV_F(mb=1, chunk=0) from rank 0": the op rank q's comm stream waits on, else
  // the action its program is at.
  std::string stuck_at(int q) const {
    const RankState& st = ranks_[q];
    const int op = waiting_op(q);
    const int at = op >= 0 ? op : st.segments[std::min(st.pc, static_cast<int>(st.segments.size()) - 1)].begin;
    return "action #" + std::to_string(at) + " " + describe(s_.actions[q][at]);
  }

  // Names, for every rank whose comm stream is stuck, the op it waits on and where that
  // op's rank is stuck itself.
  [[noreturn]] void report_deadlock() const {
    std::string msg = "deadlock: ";
    for (int r = 0; r < shape_.pp; ++r) {
      const int i = waiting_op(r);
      if (i < 0) continue;
      const auto [q, j] = s_.match[r][i];
      std::ostringstream posted;
      posted << ranks_[r].posted[ranks_[r].queue[ranks_[r].head]];
      msg += (msg.size() > 10 ? "; " : "") + where(r, i, s_.actions[r][i]) + " (posted at t=" + posted.str() +
             ") waits for " + where(q, j, s_.actions[q][j]) + ", but rank " + std::to_string(q) + " is stuck at " +
             stuck_at(q);
    }
    throw std::invalid_argument(msg);
  }

  SimResult result() const {
    SimResult out;
    out.split_backward = s_.split_backward;
    for (const RankState& st : ranks_) out.makespan = std::max({out.makespan, st.cpu, st.stream});
    for (int r = 0; r < shape_.pp; ++r) {
      double busy = 0.0;
      for (const TimedAction& t : timed_[r]) {
        if (!is_comm(t.action.kind)) busy += t.end - t.start;
        out.events.push_back(t);
      }
      out.busy.push_back(busy);
      out.bubble_fraction.push_back(out.makespan > 0 ? (out.makespan - busy) / out.makespan : 0.0);
    }
    LivePeaks peaks = live_peaks(s_.actions);
    out.peak_activations = std::move(peaks.activations);
    out.peak_pending_weight_grads = std::move(peaks.pending_weight_grads);
    return out;
  }

  const CheckedSchedule& s_;
  const PipelineShape& shape_;
  const Costs& costs_;
  std::vector<RankState> ranks_;
  std::vector<std::vector<TimedAction>> timed_;  // [rank][action index]
};

}  // namespace

SimResult simulate_schedule(const Schedule& schedule, const PipelineShape& shape, const Costs& costs) {
  check_costs(costs);
  const CheckedSchedule checked = schedule_detail::check_structure(schedule, shape);
  return Simulator(checked, shape, costs).run();
}

}  // namespace pyruntime
