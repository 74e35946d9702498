// insert_communication: turns compute-only action lists into executable ones by adding the
// SEND/RECV actions at deadlock-free places.
#include <algorithm>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/schedule.h"
#include "core/schedule_detail.h"

namespace pyruntime {

namespace {

using schedule_detail::MessageKey;
constexpr double kInf = std::numeric_limits<double>::infinity();

Action comm_action(ActionKind kind, const PipelineShape& shape, int microbatch, int stage, int peer) {
  Action a;
  a.kind = kind;
  a.microbatch = microbatch;
  a.chunk = shape.chunk_of(stage);
  a.stage = stage;
  a.peer = peer;
  return a;
}

// The message a compute action on `rank` produces for another rank, if any.
bool produced_message(const PipelineShape& shape, int rank, const Action& a, Action* send) {
  const int last = shape.num_stages() - 1;
  if (a.kind == ActionKind::F && a.stage < last && shape.rank_of(a.stage + 1) != rank) {
    *send = comm_action(ActionKind::SEND_F, shape, a.microbatch, a.stage, shape.rank_of(a.stage + 1));
    return true;
  }
  if (a.kind == ActionKind::B && a.stage > 0 && shape.rank_of(a.stage - 1) != rank) {
    *send = comm_action(ActionKind::SEND_B, shape, a.microbatch, a.stage, shape.rank_of(a.stage - 1));
    return true;
  }
  return false;
}

// The message a compute action on `rank` must have received before it runs, if any.
bool needed_message(const PipelineShape& shape, int rank, const Action& a, Action* recv) {
  const int last = shape.num_stages() - 1;
  if (a.kind == ActionKind::F && a.stage > 0 && shape.rank_of(a.stage - 1) != rank) {
    *recv = comm_action(ActionKind::RECV_F, shape, a.microbatch, a.stage, shape.rank_of(a.stage - 1));
    return true;
  }
  if (a.kind == ActionKind::B && a.stage < last && shape.rank_of(a.stage + 1) != rank) {
    *recv = comm_action(ActionKind::RECV_B, shape, a.microbatch, a.stage, shape.rank_of(a.stage + 1));
    return true;
  }
  return false;
}

// A tensor crossing a stage boundary between two ranks.
struct Message {
  Action recv;             // the RECV_* on the receiving rank (peer = sender)
  int from = -1;
  int to = -1;
  int producer = -1;       // index of the producing compute on `from`; -1: nobody produces it
  int consumer = -1;       // index of the consuming compute on `to`; -1: nobody consumes it
  double produced = kInf;  // ideal end of the producer
  double needed = kInf;    // ideal start of the consumer
  int send_gap = 0;        // sent just before compute #send_gap of `from` (== size: at the end)
  int recv_gap = 0;        // received just before compute #recv_gap of `to`
};

class CommInserter {
 public:
  CommInserter(const Schedule& compute_only, const PipelineShape& shape) : shape_(shape), compute_(compute_only) {
    for (int rank = 0; rank < shape.pp; ++rank) {
      for (int i = 0; i < static_cast<int>(compute_[rank].size()); ++i) {
        Action& a = compute_[rank][i];
        if (is_comm(a.kind)) {
          throw std::invalid_argument(schedule_detail::where(rank, i, a) +
                                      ": insert_communication takes compute actions (F, B, W) only");
        }
        a = schedule_detail::checked_fields(shape, rank, i, a);
        split_backward_ |= a.kind == ActionKind::W;
        index_.emplace(Slot{a.kind, a.stage, a.microbatch}, i);
      }
    }
  }

  Schedule run() {
    simulate_ideal();
    collect_messages();
    place_messages();
    return emit();
  }

 private:
  using Slot = std::tuple<ActionKind, int, int>;  // (kind, stage, micro-batch)

  double cost(ActionKind kind) const {
    const Costs c;
    const double per_rank = kind == ActionKind::F   ? c.forward
                            : kind == ActionKind::W ? c.backward_weight
                                                    : (split_backward_ ? c.backward_input : c.backward);
    return per_rank / shape_.virtual_stages;
  }

  // Ideal start times: every rank runs its list in order with the default Costs and free,
  // instant messages. Actions that can never start (infeasible orders, which the validator
  // then rejects by name) start at infinity. A dependency nobody computes counts as met.
  void simulate_ideal() {
    const int last = shape_.num_stages() - 1;
    std::vector<int> pc(shape_.pp, 0);
    std::vector<double> clock(shape_.pp, 0.0);
    std::map<Slot, double> finished;
    auto ready = [&](ActionKind kind, int stage, int mb, double* t) {
      if (index_.count({kind, stage, mb}) == 0) return true;
      auto it = finished.find({kind, stage, mb});
      if (it != finished.end()) *t = std::max(*t, it->second);
      return it != finished.end();
    };
    start_.assign(shape_.pp, {});
    end_.assign(shape_.pp, {});
    for (int r = 0; r < shape_.pp; ++r) {
      start_[r].assign(compute_[r].size(), kInf);
      end_[r].assign(compute_[r].size(), kInf);
    }
    for (bool progress = true; progress;) {
      progress = false;
      for (int r = 0; r < shape_.pp; ++r) {
        for (; pc[r] < static_cast<int>(compute_[r].size()); ++pc[r], progress = true) {
          const Action& a = compute_[r][pc[r]];
          double t = clock[r];
          bool ok = true;
          if (a.kind == ActionKind::F && a.stage > 0) ok &= ready(ActionKind::F, a.stage - 1, a.microbatch, &t);
          if (a.kind == ActionKind::B) ok &= ready(ActionKind::F, a.stage, a.microbatch, &t);
          if (a.kind == ActionKind::B && a.stage < last) ok &= ready(ActionKind::B, a.stage + 1, a.microbatch, &t);
          if (a.kind == ActionKind::W) ok &= ready(ActionKind::B, a.stage, a.microbatch, &t);
          if (!ok) break;
          start_[r][pc[r]] = t;
          end_[r][pc[r]] = clock[r] = finished[{a.kind, a.stage, a.microbatch}] = t + cost(a.kind);
        }
      }
    }
  }

  // Every message between ranks, from its producer (or, when nobody produces it, from the
  // consumer that needs it, so the validator can name the unmatched receive).
  void collect_messages() {
    for (int r = 0; r < shape_.pp; ++r) {
      const auto& list = compute_[r];
      for (int i = 0; i < static_cast<int>(list.size()); ++i) {
        const Action& a = list[i];
        Action send, recv;
        if (produced_message(shape_, r, a, &send)) {
          Message m;
          const bool forward = a.kind == ActionKind::F;
          const int stage = forward ? a.stage + 1 : a.stage - 1;
          m.recv = comm_action(forward ? ActionKind::RECV_F : ActionKind::RECV_B, shape_, a.microbatch, stage, r);
          m.from = r;
          m.to = send.peer;
          m.producer = i;
          m.produced = end_[r][i];
          auto it = index_.find({a.kind, stage, a.microbatch});
          if (it != index_.end()) {
            m.consumer = it->second;
            m.needed = start_[m.to][m.consumer];
          }
          messages_.push_back(m);
        }
        const bool forward = a.kind == ActionKind::F;
        const int source = forward ? a.stage - 1 : a.stage + 1;
        if (needed_message(shape_, r, a, &recv) && index_.count({a.kind, source, a.microbatch}) == 0) {
          Message m;
          m.recv = recv;
          m.from = recv.peer;
          m.to = r;
          m.consumer = i;
          messages_.push_back(m);
        }
      }
    }
  }

  // Gap g of a rank is the point before its compute #g (g == size: after the last one). In
  // the ideal run the rank enters it when compute #g-1 ends and leaves it when #g starts.
  double enters(int r, int g) const { return g == 0 ? 0.0 : end_[r][g - 1]; }
  double leaves(int r, int g) const { return g < static_cast<int>(start_[r].size()) ? start_[r][g] : kInf; }

  // The first gap of rank r left at or after time t. Leave times rise along a rank.
  int gap_at(int r, double t) const {
    return static_cast<int>(std::lower_bound(start_[r].begin(), start_[r].end(), t - kEps) - start_[r].begin());
  }

  bool idle_at(int r, double t) const { return enters(r, gap_at(r, t)) <= t + kEps; }

  // Each message gets a meeting time tau: the send goes into the sender's first gap left at
  // or after tau, the receive into the receiver's. Why this cannot deadlock: label every gap
  // with the ideal time the rank leaves it; labels rise along a rank. For a matched pair
  // (X on the sender, Y on the receiver) every gap before X or before Y is left before tau,
  // and X and Y are left at or after it, so each batch before either side has a smaller
  // label than the other side. By induction over labels every batch then gets posted and
  // completes. tau must lie between the end of the producer and the start of the consumer,
  // and rise with production order on each link (FIFO matching). Within that, the earliest
  // tau at which both ranks sit in a gap (idle or between two computes) makes neither side
  // wait for the other; without one, tau is the production time.
  void place_messages() {
    std::map<std::pair<int, int>, std::vector<Message*>> links;  // in production order
    for (Message& m : messages_) {
      if (m.producer < 0) {
        m.recv_gap = m.consumer;
      } else {
        links[{m.from, m.to}].push_back(&m);
      }
    }
    for (auto& [link, msgs] : links) {
      std::vector<double> latest(msgs.size());  // tau of message k must not pass any later consumer
      for (size_t k = msgs.size(); k-- > 0;) {
        latest[k] = k + 1 < msgs.size() ? std::min(msgs[k]->needed, latest[k + 1]) : msgs[k]->needed;
      }
      double tau = 0.0;
      for (size_t k = 0; k < msgs.size(); ++k) {
        Message& m = *msgs[k];
        tau = meeting_time(m.from, m.to, std::max(tau, m.produced), std::max(latest[k], m.produced));
        // The clamps only matter for tau = infinity (orders that cannot run): the messages
        // still go after their producer and before their consumer for the validator to judge.
        m.send_gap = std::max(gap_at(m.from, tau), m.producer + 1);
        m.recv_gap = m.consumer < 0 ? gap_at(m.to, tau) : std::min(gap_at(m.to, tau), m.consumer);
      }
    }
  }

  // The earliest time in [lo, hi] at which ranks a and b are both in a gap; lo if none is.
  double meeting_time(int a, int b, double lo, double hi) const {
    if (lo == kInf) return lo;
    std::vector<double> candidates = {lo};
    for (int r : {a, b}) {
      for (int g = gap_at(r, lo); g <= static_cast<int>(start_[r].size()) && enters(r, g) <= hi + kEps; ++g) {
        if (enters(r, g) > lo) candidates.push_back(enters(r, g));
      }
    }
    std::sort(candidates.begin(), candidates.end());
    for (double t : candidates) {
      if (idle_at(a, t) && idle_at(b, t)) return t;
    }
    return lo;
  }

  // Per rank and gap: the sends placed there (in production order), then the receives.
  Schedule emit() const {
    Schedule out(shape_.pp);
    std::vector<std::vector<std::vector<Action>>> sends(shape_.pp), receives(shape_.pp);  // [rank][gap]
    for (int r = 0; r < shape_.pp; ++r) {
      sends[r].resize(compute_[r].size() + 1);
      receives[r].resize(compute_[r].size() + 1);
    }
    for (const Message& m : messages_) {
      receives[m.to][m.recv_gap].push_back(m.recv);
      Action send;
      if (m.producer >= 0 && produced_message(shape_, m.from, compute_[m.from][m.producer], &send)) {
        sends[m.from][m.send_gap].push_back(send);
      }
    }
    for (int r = 0; r < shape_.pp; ++r) {
      for (size_t g = 0; g <= compute_[r].size(); ++g) {
        out[r].insert(out[r].end(), sends[r][g].begin(), sends[r][g].end());
        out[r].insert(out[r].end(), receives[r][g].begin(), receives[r][g].end());
        if (g < compute_[r].size()) out[r].push_back(compute_[r][g]);
      }
    }
    return out;
  }

  const PipelineShape& shape_;
  Schedule compute_;  // stages filled in
  bool split_backward_ = false;
  std::map<Slot, int> index_;               // compute slot -> index on its rank
  static constexpr double kEps = 1e-9;  // ideal times are sums of cost / v: compare with slack
  std::vector<std::vector<double>> start_, end_;  // [rank][compute index]: ideal times
  std::vector<Message> messages_;
};

}  // namespace

Schedule insert_communication(const Schedule& compute_only, const PipelineShape& shape) {
  check_shape(shape);
  if (static_cast<int>(compute_only.size()) != shape.pp) {
    throw std::invalid_argument("schedule has " + std::to_string(compute_only.size()) + " rank lists but pp=" +
                                std::to_string(shape.pp));
  }
  return CommInserter(compute_only, shape).run();
}

}  // namespace pyruntime
