// Internals shared by the schedule sources (not part of the public API in schedule.h).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "core/schedule.h"

namespace pyruntime::schedule_detail {

// "rank 2 action #7 RECV_F(mb=3, chunk=0) from rank 1": the prefix of every rejection.
std::string where(int rank, int index, const Action& action);

// Checks microbatch/chunk ranges and, for comm actions, that the neighbouring stage exists,
// lives on another rank and that peer names that rank. Returns `action` with stage filled.
Action checked_fields(const PipelineShape& shape, int rank, int index, const Action& action);

// A message crossing one stage boundary: identical for the SEND and its matching RECV.
struct MessageKey {
  bool forward;     // activation (F) or gradient (B)
  int microbatch;
  int from_stage;   // the stage that produced the tensor
  bool operator==(const MessageKey& o) const {
    return forward == o.forward && microbatch == o.microbatch && from_stage == o.from_stage;
  }
  bool operator<(const MessageKey& o) const {
    if (forward != o.forward) return forward < o.forward;
    if (microbatch != o.microbatch) return microbatch < o.microbatch;
    return from_stage < o.from_stage;
  }
};

// Key of a comm action whose stage is filled in (see checked_fields).
MessageKey message_key(const Action& action);

// The structurally valid schedule the simulator runs: stages filled in, every comm action
// paired with its counterpart (match[rank][index] = {peer rank, peer index}; {-1, -1} for
// compute actions).
struct CheckedSchedule {
  Schedule actions;
  std::vector<std::vector<std::pair<int, int>>> match;
  bool split_backward = false;
};

// Every check except deadlock (that needs the timed run); throws std::invalid_argument.
CheckedSchedule check_structure(const Schedule& schedule, const PipelineShape& shape);

}  // namespace pyruntime::schedule_detail
