// Action vocabulary shared by the schedule generators and the simulator, and the per-action
// field checks of schedule_detail.h.
#include "core/schedule.h"

#include <algorithm>
#include <cctype>
#include <sstream>
#include <stdexcept>
#include <string>

#include "core/schedule_detail.h"

namespace pyruntime {

namespace {
constexpr ActionKind kAllKinds[] = {ActionKind::F,      ActionKind::B,      ActionKind::W,     ActionKind::SEND_F,
                                    ActionKind::RECV_F, ActionKind::SEND_B, ActionKind::RECV_B};
}  // namespace

bool operator==(const Action& a, const Action& b) {
  return a.kind == b.kind && a.microbatch == b.microbatch && a.chunk == b.chunk && a.peer == b.peer &&
         a.stage == b.stage;
}

const char* kind_name(ActionKind kind) {
  switch (kind) {
    case ActionKind::F: return "F";
    case ActionKind::B: return "B";
    case ActionKind::W: return "W";
    case ActionKind::SEND_F: return "SEND_F";
    case ActionKind::RECV_F: return "RECV_F";
    case ActionKind::SEND_B: return "SEND_B";
    case ActionKind::RECV_B: return "RECV_B";
  }
  return "?";
}

ActionKind parse_kind(const std::string& name) {
  std::string upper = name;
  std::transform(upper.begin(), upper.end(), upper.begin(), [](unsigned char c) { return std::toupper(c); });
  for (ActionKind kind : kAllKinds) {
    if (upper == kind_name(kind)) return kind;
  }
  throw std::invalid_argument("unknown pipeline action kind '" + name +
                              "'; expected one of F, B, W, SEND_F, RECV_F, SEND_B, RECV_B");
}

bool is_comm(ActionKind kind) {
  return kind != ActionKind::F && kind != ActionKind::B && kind != ActionKind::W;
}

std::string describe(const Action& action) {
  std::ostringstream os;
  os << kind_name(action.kind) << "(mb=" << action.microbatch << ", chunk=" << action.chunk << ")";
  if (action.kind == ActionKind::SEND_F || action.kind == ActionKind::SEND_B) os << " to rank " << action.peer;
  if (action.kind == ActionKind::RECV_F || action.kind == ActionKind::RECV_B) os << " from rank " << action.peer;
  return os.str();
}

void check_shape(const PipelineShape& shape) {
  if (shape.pp < 1) throw std::invalid_argument("pp must be >= 1 (got " + std::to_string(shape.pp) + ")");
  if (shape.microbatches < 1) {
    throw std::invalid_argument("microbatches must be >= 1 (got " + std::to_string(shape.microbatches) + ")");
  }
  if (shape.virtual_stages < 1) {
    throw std::invalid_argument("virtual_stages must be >= 1 (got " + std::to_string(shape.virtual_stages) + ")");
  }
}

LivePeaks live_peaks(const Schedule& schedule) {
  bool split_backward = false;
  for (const RankActions& actions : schedule) {
    for (const Action& a : actions) split_backward |= a.kind == ActionKind::W;
  }
  LivePeaks out;
  for (const RankActions& actions : schedule) {
    int live = 0, pending_w = 0, peak_live = 0, peak_w = 0;
    for (const Action& a : actions) {
      live += a.kind == ActionKind::F ? 1 : a.kind == ActionKind::B ? -1 : 0;
      if (split_backward) pending_w += a.kind == ActionKind::B ? 1 : a.kind == ActionKind::W ? -1 : 0;
      peak_live = std::max(peak_live, live);
      peak_w = std::max(peak_w, pending_w);
    }
    out.activations.push_back(peak_live);
    out.pending_weight_grads.push_back(peak_w);
  }
  return out;
}

double SimResult::mean_bubble_fraction() const {
  if (bubble_fraction.empty()) return 0.0;
  double sum = 0.0;
  for (double b : bubble_fraction) sum += b;
  return sum / static_cast<double>(bubble_fraction.size());
}

namespace schedule_detail {

std::string where(int rank, int index, const Action& action) {
  return "rank " + std::to_string(rank) + " action #" + std::to_string(index) + " " + describe(action);
}

namespace {

// The stage a comm action talks to: the next stage for activations sent / gradients
// received, the previous one for activations received / gradients sent.
int neighbour_stage(const Action& a) {
  const bool next = a.kind == ActionKind::SEND_F || a.kind == ActionKind::RECV_B;
  return next ? a.stage + 1 : a.stage - 1;
}

}  // namespace

Action checked_fields(const PipelineShape& shape, int rank, int index, const Action& action) {
  auto fail = [&](const std::string& why) { throw std::invalid_argument(where(rank, index, action) + ": " + why); };
  if (action.microbatch < 0 || action.microbatch >= shape.microbatches) {
    fail("micro-batch out of range [0, " + std::to_string(shape.microbatches) + ")");
  }
  if (action.chunk < 0 || action.chunk >= shape.virtual_stages) {
    fail("chunk out of range [0, " + std::to_string(shape.virtual_stages) + ")");
  }
  Action out = action;
  out.stage = shape.stage(rank, action.chunk);
  if (action.stage >= 0 && action.stage != out.stage) {
    fail("stage " + std::to_string(action.stage) + " does not match chunk " + std::to_string(action.chunk) +
         " on rank " + std::to_string(rank) + " (stage " + std::to_string(out.stage) + ")");
  }
  if (!is_comm(action.kind)) {
    if (action.peer != -1) fail("a compute action has no peer (got peer " + std::to_string(action.peer) + ")");
    return out;
  }
  const int other = neighbour_stage(out);
  if (other < 0 || other >= shape.num_stages()) {
    fail("stage " + std::to_string(out.stage) + " has no " + (other < 0 ? "previous" : "next") + " stage");
  }
  if (shape.rank_of(other) == rank) {
    fail("stages " + std::to_string(out.stage) + " and " + std::to_string(other) +
         " are both on this rank: no message is needed");
  }
  if (action.peer != shape.rank_of(other)) {
    fail("peer must be rank " + std::to_string(shape.rank_of(other)) + ", which holds stage " +
         std::to_string(other));
  }
  return out;
}

MessageKey message_key(const Action& a) {
  const bool is_send = a.kind == ActionKind::SEND_F || a.kind == ActionKind::SEND_B;
  const bool forward = a.kind == ActionKind::SEND_F || a.kind == ActionKind::RECV_F;
  if (is_send) return {forward, a.microbatch, a.stage};
  return {forward, a.microbatch, forward ? a.stage - 1 : a.stage + 1};
}

}  // namespace schedule_detail

}  // namespace pyruntime
