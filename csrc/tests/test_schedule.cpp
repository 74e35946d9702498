// Unit tests of the pipeline schedules (csrc/core/schedule.h): every generator passes the
// validator, simulated bubbles and activation peaks match their closed forms, and corrupted
// schedules are rejected with a message naming the offending action.
#include <cmath>
#include <ostream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "core/schedule.h"
#include "tests/check.h"

using pyruntime::Action;
using pyruntime::ActionKind;
using pyruntime::Costs;
using pyruntime::PipelineShape;
using pyruntime::Schedule;
using pyruntime::SimResult;

namespace pyruntime {
std::ostream& operator<<(std::ostream& os, const Action& a) { return os << describe(a); }
}  // namespace pyruntime

namespace {

const int kRanks[] = {2, 3, 4, 8};

// The micro-batch counts a schedule accepts for pp ranks, among m == pp, m not a multiple
// of pp, and larger ones.
std::vector<int> microbatch_counts(const std::string& name, int pp) {
  std::vector<int> out;
  for (int m : {1, pp, pp + 1, 2 * pp, 3 * pp + 1, 4 * pp}) {
    const bool needs_full = name == "1f1b" || name == "zb" || name == "interleaved";
    if (needs_full && m < pp) continue;
    if (name == "interleaved" && m % pp != 0) continue;
    out.push_back(m);
  }
  return out;
}

SimResult simulate(const std::string& name, int pp, int m, int v = 1, Costs costs = {}) {
  return pyruntime::simulate_schedule(pyruntime::generate_schedule(name, pp, m, v), {pp, m, v}, costs);
}

bool near(double a, double b) { return std::fabs(a - b) < 1e-9; }

Action act(ActionKind kind, int mb, int chunk = 0, int peer = -1) {
  Action a;
  a.kind = kind;
  a.microbatch = mb;
  a.chunk = chunk;
  a.peer = peer;
  return a;
}

// Index of the first action of `kind` and micro-batch `mb` on one rank's list.
int find(const pyruntime::RankActions& actions, ActionKind kind, int mb) {
  for (int i = 0; i < static_cast<int>(actions.size()); ++i) {
    if (actions[i].kind == kind && actions[i].microbatch == mb) return i;
  }
  return -1;
}

}  // namespace

TEST(every_schedule_validates) {
  for (const std::string& name : pyruntime::schedule_names()) {
    for (int pp : kRanks) {
      const std::vector<int> chunk_counts = name == "interleaved" ? std::vector<int>{2, 3} : std::vector<int>{1};
      for (int v : chunk_counts) {
        for (int m : microbatch_counts(name, pp)) {
          const SimResult r = simulate(name, pp, m, v);
          const int per_rank = (name == "zb" ? 3 : 2) * m * v;
          int compute = 0;
          for (const auto& e : r.events) compute += pyruntime::is_comm(e.action.kind) ? 0 : 1;
          CHECK_EQ(compute, per_rank * pp);
          CHECK(r.makespan > 0);
        }
      }
    }
  }
}

TEST(single_rank_needs_no_messages) {
  for (const std::string& name : pyruntime::schedule_names()) {
    const int v = name == "interleaved" ? 3 : 1;
    const Schedule s = pyruntime::generate_schedule(name, 1, 4, v);
    for (const Action& a : s[0]) CHECK(!pyruntime::is_comm(a.kind));
    CHECK_EQ(simulate(name, 1, 4, v).mean_bubble_fraction(), 0.0);
  }
}

TEST(gpipe_and_1f1b_bubble_closed_form) {
  for (const char* name : {"gpipe", "1f1b"}) {
    for (int pp : kRanks) {
      for (int m : microbatch_counts(name, pp)) {
        const SimResult r = simulate(name, pp, m);
        const double expected = double(pp - 1) / (m + pp - 1);
        for (double b : r.bubble_fraction) CHECK(near(b, expected));
        CHECK(near(r.makespan, 3.0 * (m + pp - 1)));
      }
    }
  }
}

TEST(naive_keeps_one_stage_busy) {
  for (int pp : kRanks) {
    const SimResult r = simulate("naive", pp, 3);
    for (double b : r.bubble_fraction) CHECK(near(b, double(pp - 1) / pp));
  }
}

// Per-chunk costs are the rank's costs divided by v, so the bubble shrinks by v.
TEST(interleaved_bubble_closed_form) {
  for (int pp : kRanks) {
    for (int v : {2, 3, 4}) {
      for (int m : {pp, 2 * pp, 3 * pp}) {
        const SimResult r = simulate("interleaved", pp, m, v);
        const double expected = double(pp - 1) / (v * m + pp - 1);
        for (double b : r.bubble_fraction) CHECK(near(b, expected));
      }
    }
  }
}

// With F = B = W = 1 ZB-H1 leaves (pp-1)*F idle per rank instead of 1F1B's (pp-1)*(F+B+W).
TEST(zero_bubble_beats_1f1b) {
  for (int pp : kRanks) {
    for (int m : microbatch_counts("zb", pp)) {
      const SimResult zb = simulate("zb", pp, m);
      const SimResult base = simulate("1f1b", pp, m);
      CHECK(zb.mean_bubble_fraction() < base.mean_bubble_fraction());
      CHECK(near(zb.makespan, 3.0 * m + pp - 1));
      for (double b : zb.bubble_fraction) CHECK(near(b, double(pp - 1) / (3 * m + pp - 1)));
    }
  }
}

TEST(activation_peaks) {
  for (int pp : kRanks) {
    for (int m : microbatch_counts("1f1b", pp)) {
      const SimResult one = simulate("1f1b", pp, m);
      const SimResult zb = simulate("zb", pp, m);
      const SimResult gpipe = simulate("gpipe", pp, m);
      for (int r = 0; r < pp; ++r) {
        CHECK(one.peak_activations[r] <= pp);
        CHECK_EQ(one.peak_activations[r], pp - r);
        CHECK_EQ(zb.peak_activations[r], one.peak_activations[r]);
        CHECK_EQ(zb.peak_pending_weight_grads[r], r + 1);
        CHECK_EQ(one.peak_pending_weight_grads[r], 0);
        CHECK_EQ(gpipe.peak_activations[r], m);
      }
      CHECK_EQ(one.peak_activations[0], pp);
    }
    const SimResult naive = simulate("naive", pp, 5);
    CHECK_EQ(naive.peak_activations[0], 1);
  }
  // The same peaks from the compute order alone (what the planner reads), for every schedule.
  for (const std::string& name : pyruntime::schedule_names()) {
    for (int pp : kRanks) {
      const int v = name == "interleaved" ? 2 : 1, m = name == "naive" ? 3 : 2 * pp;
      const SimResult r = simulate(name, pp, m, v, Costs{1.3, 2.9, 1.2, 1.7, 0.4});
      const pyruntime::LivePeaks peaks = pyruntime::live_peaks(pyruntime::generate_compute_order(name, {pp, m, v}));
      CHECK(peaks.activations == r.peak_activations);
      CHECK(peaks.pending_weight_grads == r.peak_pending_weight_grads);
    }
  }
}

TEST(comm_latency_delays_the_pipeline) {
  Costs costs;
  costs.comm_latency = 0.5;
  const SimResult slow = simulate("1f1b", 4, 8, 1, costs);
  const SimResult fast = simulate("1f1b", 4, 8);
  CHECK(slow.makespan > fast.makespan);
  for (const auto& e : slow.events) {
    if (pyruntime::is_comm(e.action.kind)) CHECK(e.end - e.start >= 0.5 - 1e-12);
  }
}

// Messages meet where both ranks are free in the ideal timeline: rank 1 takes F(1)'s
// activation between F(0) and B(0), just as rank 0 finishes F(1) (t=2); rank 0 batches that
// send with the receive of B(0)'s gradient (Megatron's send_forward_recv_backward).
TEST(one_f_one_b_message_placement) {
  const Schedule s = pyruntime::generate_schedule("1f1b", 2, 2);
  const std::vector<Action> rank0 = {act(ActionKind::F, 0),           act(ActionKind::SEND_F, 0, 0, 1),
                                     act(ActionKind::F, 1),           act(ActionKind::SEND_F, 1, 0, 1),
                                     act(ActionKind::RECV_B, 0, 0, 1), act(ActionKind::B, 0),
                                     act(ActionKind::RECV_B, 1, 0, 1), act(ActionKind::B, 1)};
  const std::vector<Action> rank1 = {act(ActionKind::RECV_F, 0, 0, 0), act(ActionKind::F, 0),
                                     act(ActionKind::RECV_F, 1, 0, 0), act(ActionKind::B, 0),
                                     act(ActionKind::SEND_B, 0, 0, 0), act(ActionKind::F, 1),
                                     act(ActionKind::B, 1),           act(ActionKind::SEND_B, 1, 0, 0)};
  const std::vector<std::vector<Action>> expected = {rank0, rank1};
  CHECK_EQ(s.size(), expected.size());
  for (size_t r = 0; r < s.size() && r < expected.size(); ++r) {
    CHECK_EQ(s[r].size(), expected[r].size());
    for (size_t i = 0; i < s[r].size() && i < expected[r].size(); ++i) {
      Action want = expected[r][i];
      want.stage = static_cast<int>(r);
      CHECK_EQ(s[r][i], want);
    }
  }
}

// A compute waits only for the batch that received its own input: on 1F1B pp=2 m=2 with
// messages taking 0.5, rank 1 posts F(1)'s receive at t=2.5 (it completes at 3.0) and runs
// B(0), which needs nothing received, at once; F(1) later finds its activation there.
TEST(compute_waits_only_for_its_own_receive) {
  Costs costs;
  costs.comm_latency = 0.5;
  const SimResult r = simulate("1f1b", 2, 2, 1, costs);
  double b0_start = -1, f1_start = -1, recv_f1_end = -1;
  for (const auto& e : r.events) {
    if (e.rank != 1) continue;
    if (e.action.kind == ActionKind::B && e.action.microbatch == 0) b0_start = e.start;
    if (e.action.kind == ActionKind::F && e.action.microbatch == 1) f1_start = e.start;
    if (e.action.kind == ActionKind::RECV_F && e.action.microbatch == 1) recv_f1_end = e.end;
  }
  CHECK(near(b0_start, 2.5));
  CHECK(near(recv_f1_end, 3.0));
  CHECK(near(f1_start, 4.5));  // after B(0), its activation long there
}

// Messages are planned with the default costs; other costs only move times (whether a
// schedule can hang depends on posting order alone), and every rank stays busy for exactly
// its share of the work.
TEST(schedules_run_under_other_costs) {
  const Costs skewed{3.0, 0.5, 0.25, 4.0, 0.7};
  for (const std::string& name : pyruntime::schedule_names()) {
    for (int pp : kRanks) {
      const int v = name == "interleaved" ? 2 : 1, m = 2 * pp;
      const SimResult r = simulate(name, pp, m, v, skewed);
      const double work = name == "zb" ? m * (3.0 + 0.25 + 4.0) : m * (3.0 + 0.5);
      for (double busy : r.busy) CHECK(near(busy, work));
      CHECK(r.makespan >= work);
    }
  }
}

TEST(insert_communication_matches_generator) {
  for (const char* name : {"1f1b", "interleaved", "zb"}) {
    const PipelineShape shape{2, 4, std::string(name) == "interleaved" ? 2 : 1};
    const Schedule compute = pyruntime::generate_compute_order(name, shape);
    const Schedule full = pyruntime::insert_communication(compute, shape);
    const Schedule expected = pyruntime::generate_schedule(name, shape.pp, shape.microbatches, shape.virtual_stages);
    CHECK_EQ(full.size(), expected.size());
    for (size_t r = 0; r < full.size(); ++r) CHECK(full[r] == expected[r]);
  }
}

TEST(bad_generator_arguments) {
  using std::invalid_argument;
  CHECK_THROWS_WITH(pyruntime::generate_schedule("1f1b", 0, 4), invalid_argument, "pp must be >= 1 (got 0)");
  CHECK_THROWS_WITH(pyruntime::generate_schedule("gpipe", 2, 0), invalid_argument, "microbatches must be >= 1 (got 0)");
  CHECK_THROWS_WITH(pyruntime::generate_schedule("1f1b", 4, 3), invalid_argument,
                    "'1f1b' needs microbatches >= pp (got microbatches=3, pp=4");
  CHECK_THROWS_WITH(pyruntime::generate_schedule("zb", 4, 2), invalid_argument, "needs microbatches >= pp");
  CHECK_THROWS_WITH(pyruntime::generate_schedule("interleaved", 4, 8, 1), invalid_argument,
                    "needs virtual_stages >= 2");
  CHECK_THROWS_WITH(pyruntime::generate_schedule("interleaved", 4, 6, 2), invalid_argument,
                    "needs microbatches divisible by pp (got microbatches=6, pp=4, virtual_stages=2)");
  CHECK_THROWS_WITH(pyruntime::generate_schedule("gpipe", 4, 6, 2), invalid_argument, "virtual_stages must be 1");
  CHECK_THROWS_WITH(pyruntime::generate_schedule("pipedream", 4, 6), invalid_argument,
                    "unknown pipeline schedule 'pipedream'");
  CHECK_THROWS_WITH(simulate("1f1b", 2, 2, 1, Costs{-1.0, 2.0, 1.0, 1.0, 0.0}), invalid_argument,
                    "costs must be >= 0");
}

TEST(dropped_receive_names_the_unmatched_send) {
  Schedule s = pyruntime::generate_schedule("1f1b", 4, 8);
  const int i = find(s[2], ActionKind::RECV_F, 3);
  s[2].erase(s[2].begin() + i);
  CHECK_THROWS_WITH(pyruntime::simulate_schedule(s, {4, 8, 1}), std::invalid_argument,
                    "SEND_F(mb=3, chunk=0) to rank 2: no matching RECV_F on rank 2");
}

TEST(dropped_send_names_the_unmatched_receive) {
  Schedule s = pyruntime::generate_schedule("1f1b", 4, 8);
  const int send = find(s[1], ActionKind::SEND_F, 3);
  const int recv = find(s[2], ActionKind::RECV_F, 3);
  s[1].erase(s[1].begin() + send);
  CHECK_THROWS_WITH(pyruntime::simulate_schedule(s, {4, 8, 1}), std::invalid_argument,
                    "rank 2 action #" + std::to_string(recv) +
                        " RECV_F(mb=3, chunk=0) from rank 1: no matching SEND_F on rank 1");
}

TEST(duplicate_forward_is_rejected) {
  Schedule s = pyruntime::generate_schedule("gpipe", 2, 4);
  const int f = find(s[0], ActionKind::F, 1);
  s[0].insert(s[0].begin() + f + 1, s[0][f]);
  CHECK_THROWS_WITH(pyruntime::simulate_schedule(s, {2, 4, 1}), std::invalid_argument,
                    "rank 0 action #" + std::to_string(f + 1) + " F(mb=1, chunk=0): duplicate of action #" +
                        std::to_string(f));
}

TEST(missing_and_misplaced_actions) {
  Schedule s = pyruntime::generate_schedule("zb", 2, 2);
  s[1].erase(s[1].begin() + find(s[1], ActionKind::W, 1));
  CHECK_THROWS_WITH(pyruntime::simulate_schedule(s, {2, 2, 1}), std::invalid_argument,
                    "rank 1 (stage 1): W(mb=1, chunk=0) is missing");
  Schedule t = pyruntime::generate_schedule("gpipe", 2, 2);
  std::swap(t[0][find(t[0], ActionKind::RECV_B, 0)], t[0][find(t[0], ActionKind::B, 0)]);
  CHECK_THROWS_WITH(pyruntime::simulate_schedule(t, {2, 2, 1}), std::invalid_argument,
                    "B(mb=0, chunk=0): its output gradient is not received: needs RECV_B(mb=0, chunk=0) from rank 1");
  Schedule u = pyruntime::generate_schedule("gpipe", 2, 2);
  u[1][0].peer = 3;
  CHECK_THROWS_WITH(pyruntime::simulate_schedule(u, {2, 2, 1}), std::invalid_argument,
                    "rank 1 action #0 RECV_F(mb=0, chunk=0) from rank 3: peer must be rank 0");
  CHECK_THROWS_WITH(pyruntime::simulate_schedule(u, {3, 2, 1}), std::invalid_argument, "2 rank lists but pp=3");
}

TEST(receives_out_of_fifo_order_are_rejected) {
  Schedule s = pyruntime::generate_schedule("gpipe", 2, 3);
  const int a = find(s[1], ActionKind::RECV_F, 0), b = find(s[1], ActionKind::RECV_F, 1);
  std::swap(s[1][a], s[1][b]);
  CHECK_THROWS_WITH(pyruntime::simulate_schedule(s, {2, 3, 1}), std::invalid_argument,
                    "rank 1 action #0 RECV_F(mb=1, chunk=0) from rank 0: out of order");
}

// Swapping F(1) and B(0) on rank 0 of GPipe makes it wait for B(0)'s gradient before
// sending F(1), while rank 1 waits for F(1) before it runs B(0): each list is fine on its
// own (rank 0 now runs the naive order), together they hang.
TEST(swap_creates_deadlock) {
  const PipelineShape shape{2, 2, 1};
  Schedule compute = pyruntime::generate_compute_order("gpipe", shape);
  std::swap(compute[0][1], compute[0][2]);
  const Schedule s = pyruntime::insert_communication(compute, shape);
  CHECK_THROWS_WITH(pyruntime::simulate_schedule(s, shape), std::invalid_argument,
                    "deadlock: rank 0 action #2 RECV_B(mb=0, chunk=0) from rank 1 (posted at t=1) waits for "
                    "rank 1 action #5 SEND_B(mb=0, chunk=0) to rank 0, but rank 1 is stuck at action #2 "
                    "RECV_F(mb=1, chunk=0) from rank 0");
}

// Swapping any two compute actions of one rank and re-deriving the messages gives a valid
// schedule or a one-line rejection naming a rank; some swaps must hang and be caught as such.
TEST(swapped_compute_actions_are_caught) {
  const PipelineShape shape{3, 4, 1};
  const Schedule base = pyruntime::generate_compute_order("1f1b", shape);
  int deadlocks = 0, accepted = 0;
  for (int r = 0; r < shape.pp; ++r) {
    for (size_t i = 0; i < base[r].size(); ++i) {
      for (size_t j = i + 1; j < base[r].size(); ++j) {
        Schedule s = base;
        std::swap(s[r][i], s[r][j]);
        try {
          pyruntime::simulate_schedule(pyruntime::insert_communication(s, shape), shape);
          ++accepted;
        } catch (const std::invalid_argument& e) {
          const std::string msg = e.what();
          CHECK(msg.find("rank ") != std::string::npos && msg.find('\n') == std::string::npos);
          deadlocks += msg.rfind("deadlock: ", 0) == 0 ? 1 : 0;
        }
      }
    }
  }
  CHECK(deadlocks > 0);
  CHECK(accepted > 0);
}

int main() { return pyruntime_test::run_all(); }
