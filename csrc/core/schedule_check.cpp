// Structural validation of a schedule: fields, message matching, data dependencies and
// completeness. Everything except deadlock, which needs the timed run (schedule_sim.cpp).
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "core/schedule.h"
#include "core/schedule_detail.h"

namespace pyruntime::schedule_detail {

namespace {

[[noreturn]] void reject(int rank, int index, const Action& a, const std::string& why) {
  throw std::invalid_argument(where(rank, index, a) + ": " + why);
}

bool is_send(ActionKind k) { return k == ActionKind::SEND_F || k == ActionKind::SEND_B; }

const char* counterpart(ActionKind k) {
  switch (k) {
    case ActionKind::SEND_F: return "RECV_F";
    case ActionKind::RECV_F: return "SEND_F";
    case ActionKind::SEND_B: return "RECV_B";
    default: return "SEND_B";
  }
}

// Pairs the sends from `from` to `to` with the receives on `to` from `from`: first as
// multisets (a message nobody receives, or a receive nobody sends), then in FIFO order.
void match_link(const Schedule& s, int from, int to, CheckedSchedule& out) {
  std::vector<int> sends, recvs;  // action indices, in posting order
  for (int i = 0; i < static_cast<int>(s[from].size()); ++i) {
    if (is_send(s[from][i].kind) && s[from][i].peer == to) sends.push_back(i);
  }
  for (int i = 0; i < static_cast<int>(s[to].size()); ++i) {
    if (is_comm(s[to][i].kind) && !is_send(s[to][i].kind) && s[to][i].peer == from) recvs.push_back(i);
  }
  std::map<MessageKey, int> balance;  // sends minus receives per message
  for (int i : sends) ++balance[message_key(s[from][i])];
  for (int i : recvs) --balance[message_key(s[to][i])];
  for (int i : sends) {
    const Action& a = s[from][i];
    if (balance[message_key(a)] > 0) {
      reject(from, i, a, std::string("no matching ") + counterpart(a.kind) + " on rank " + std::to_string(to));
    }
  }
  for (int i : recvs) {
    const Action& a = s[to][i];
    if (balance[message_key(a)] < 0) {
      reject(to, i, a, std::string("no matching ") + counterpart(a.kind) + " on rank " + std::to_string(from));
    }
  }
  for (size_t k = 0; k < sends.size(); ++k) {
    const Action& send = s[from][sends[k]];
    const Action& recv = s[to][recvs[k]];
    if (!(message_key(send) == message_key(recv))) {
      reject(to, recvs[k], recv,
             "out of order: messages from rank " + std::to_string(from) + " are matched first-in-first-out and " +
                 "this receive would get " + where(from, sends[k], send) + "; post receives in the sender's order");
    }
    out.match[from][sends[k]] = {to, recvs[k]};
    out.match[to][recvs[k]] = {from, sends[k]};
  }
}

// Where each (chunk, micro-batch) of one rank stands while walking its list in order.
struct Progress {
  int f = -1, b = -1, w = -1, recv_f = -1, recv_b = -1, send_f = -1, send_b = -1;  // action index or -1
};

class DependencyWalk {
 public:
  DependencyWalk(const PipelineShape& shape, int rank)
      : shape_(shape), rank_(rank), state_(shape.virtual_stages, std::vector<Progress>(shape.microbatches)) {}

  void step(int index, const Action& a) {
    Progress& p = state_[a.chunk][a.microbatch];
    const int last = shape_.num_stages() - 1;
    switch (a.kind) {
      case ActionKind::F:
        once(p.f, index, a);
        if (a.stage > 0) need_input(index, a, true);
        break;
      case ActionKind::B:
        once(p.b, index, a);
        need(p.f, index, a, "F");
        if (a.stage < last) need_input(index, a, false);
        break;
      case ActionKind::W: once(p.w, index, a); need(p.b, index, a, "B"); break;
      case ActionKind::SEND_F: once(p.send_f, index, a); need(p.f, index, a, "F"); break;
      case ActionKind::SEND_B: once(p.send_b, index, a); need(p.b, index, a, "B"); break;
      case ActionKind::RECV_F: once(p.recv_f, index, a); break;
      case ActionKind::RECV_B: once(p.recv_b, index, a); break;
    }
  }

  // Every (chunk, micro-batch) ran F and B once, and W once iff the schedule splits B.
  void check_complete(bool split_backward) const {
    for (int c = 0; c < shape_.virtual_stages; ++c) {
      for (int mb = 0; mb < shape_.microbatches; ++mb) {
        const Progress& p = state_[c][mb];
        const char* missing = p.f < 0 ? "F" : p.b < 0 ? "B" : (split_backward && p.w < 0) ? "W" : nullptr;
        if (missing == nullptr) continue;
        throw std::invalid_argument("rank " + std::to_string(rank_) + " (stage " + std::to_string(shape_.stage(rank_, c)) +
                                    "): " + missing + "(mb=" + std::to_string(mb) + ", chunk=" + std::to_string(c) +
                                    ") is missing; every stage runs F and B once per micro-batch" +
                                    (split_backward ? ", and W too because the schedule has W actions" : ""));
      }
    }
  }

 private:
  void once(int& slot, int index, const Action& a) {
    if (slot >= 0) reject(rank_, index, a, "duplicate of action #" + std::to_string(slot));
    slot = index;
  }

  // `a` needs `what` of the same micro-batch on chunk `chunk` (default: its own) done earlier.
  void need(int done, int index, const Action& a, const char* what, int chunk = -1) {
    if (done >= 0) return;
    reject(rank_, index, a, std::string("needs ") + what + "(mb=" + std::to_string(a.microbatch) +
                                ", chunk=" + std::to_string(chunk < 0 ? a.chunk : chunk) + ") earlier on this rank");
  }

  // The activation (forward) or output gradient (backward) coming from the neighbouring
  // stage: a receive when that stage is on another rank, its F/B when it is on this one.
  void need_input(int index, const Action& a, bool forward) {
    const int other = forward ? a.stage - 1 : a.stage + 1;
    const Progress& p = state_[a.chunk][a.microbatch];
    if (shape_.rank_of(other) != rank_) {
      if ((forward ? p.recv_f : p.recv_b) >= 0) return;
      reject(rank_, index, a, std::string("its ") + (forward ? "input activation" : "output gradient") +
                                  " is not received: needs " + (forward ? "RECV_F" : "RECV_B") + "(mb=" +
                                  std::to_string(a.microbatch) + ", chunk=" + std::to_string(a.chunk) +
                                  ") from rank " + std::to_string(shape_.rank_of(other)) + " earlier");
    }
    const Progress& local = state_[shape_.chunk_of(other)][a.microbatch];
    need(forward ? local.f : local.b, index, a, forward ? "F" : "B", shape_.chunk_of(other));
  }

  const PipelineShape& shape_;
  int rank_;
  std::vector<std::vector<Progress>> state_;  // [chunk][micro-batch]
};

}  // namespace

CheckedSchedule check_structure(const Schedule& schedule, const PipelineShape& shape) {
  check_shape(shape);
  if (static_cast<int>(schedule.size()) != shape.pp) {
    throw std::invalid_argument("schedule has " + std::to_string(schedule.size()) + " rank lists but pp=" +
                                std::to_string(shape.pp));
  }
  CheckedSchedule out;
  out.actions = schedule;
  out.match.resize(shape.pp);
  for (int rank = 0; rank < shape.pp; ++rank) {
    out.match[rank].assign(schedule[rank].size(), {-1, -1});
    for (int i = 0; i < static_cast<int>(schedule[rank].size()); ++i) {
      out.actions[rank][i] = checked_fields(shape, rank, i, schedule[rank][i]);
      out.split_backward |= schedule[rank][i].kind == ActionKind::W;
    }
  }
  for (int from = 0; from < shape.pp; ++from) {
    for (int to = 0; to < shape.pp; ++to) {
      if (from != to) match_link(out.actions, from, to, out);
    }
  }
  for (int rank = 0; rank < shape.pp; ++rank) {
    DependencyWalk walk(shape, rank);
    for (int i = 0; i < static_cast<int>(out.actions[rank].size()); ++i) walk.step(i, out.actions[rank][i]);
    walk.check_complete(out.split_backward);
  }
  return out;
}

}  // namespace pyruntime::schedule_detail
