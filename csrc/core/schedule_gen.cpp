// Generators: the compute order (F, B, W) of every rank for each named schedule. Messages are
// added afterwards by insert_communication (schedule_comm.cpp), the same way for every
// schedule and for user-written ones.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "core/schedule.h"

namespace pyruntime {

namespace {

Action compute(ActionKind kind, int microbatch, int chunk = 0) {
  Action a;
  a.kind = kind;
  a.microbatch = microbatch;
  a.chunk = chunk;
  return a;
}

std::string numbers(const PipelineShape& s) {
  return "microbatches=" + std::to_string(s.microbatches) + ", pp=" + std::to_string(s.pp) +
         ", virtual_stages=" + std::to_string(s.virtual_stages);
}

void check_arguments(const std::string& name, const PipelineShape& shape) {
  const auto& names = schedule_names();
  if (std::find(names.begin(), names.end(), name) == names.end()) {
    throw std::invalid_argument("unknown pipeline schedule '" + name +
                                "'; expected one of naive, gpipe, 1f1b, interleaved, zb");
  }
  check_shape(shape);
  const std::string prefix = "schedule '" + name + "' ";
  if (name == "interleaved") {
    if (shape.virtual_stages < 2) {
      throw std::invalid_argument(prefix + "needs virtual_stages >= 2 (got " + numbers(shape) + ")");
    }
    if (shape.microbatches % shape.pp != 0) {
      throw std::invalid_argument(prefix + "needs microbatches divisible by pp (got " + numbers(shape) + ")");
    }
  } else if (shape.virtual_stages != 1) {
    throw std::invalid_argument(prefix + "places one chunk per rank: virtual_stages must be 1 (got " +
                                numbers(shape) + "); use 'interleaved'");
  }
  const bool one_f_one_b = name == "1f1b" || name == "zb" || name == "interleaved";
  if (one_f_one_b && shape.microbatches < shape.pp) {
    throw std::invalid_argument(prefix + "needs microbatches >= pp (got " + numbers(shape) + ")");
  }
}

// Model parallelism without pipelining: the next micro-batch enters only after the previous
// one's backward left stage 0, so at most one stage is ever busy.
RankActions naive_order(const PipelineShape& shape) {
  RankActions out;
  for (int mb = 0; mb < shape.microbatches; ++mb) {
    out.push_back(compute(ActionKind::F, mb));
    out.push_back(compute(ActionKind::B, mb));
  }
  return out;
}

// All forwards, then all backwards in the same micro-batch order (FIFO on every link).
RankActions gpipe_order(const PipelineShape& shape) {
  RankActions out;
  for (int mb = 0; mb < shape.microbatches; ++mb) out.push_back(compute(ActionKind::F, mb));
  for (int mb = 0; mb < shape.microbatches; ++mb) out.push_back(compute(ActionKind::B, mb));
  return out;
}

// 1F1B: pp-rank-1 warm-up forwards, then alternate one forward / one backward, then drain
// the remaining backwards. At most pp-rank micro-batches are ever alive on a rank.
//
// With split_backward (ZB-H1) the F/B order is unchanged, so activation memory is 1F1B's,
// and each W trails its B by `rank` backwards: the last stages, which start late, push their
// input gradients upstream without waiting for weight gradients, and the deferred Ws fill
// the cool-down. With equal F/B/W costs the bubble drops from (pp-1)(F+B+W) to (pp-1)F.
RankActions one_f_one_b_order(const PipelineShape& shape, int rank, bool split_backward) {
  const int m = shape.microbatches;
  const int warmup = std::min(shape.pp - rank - 1, m);
  const int weight_lag = rank;
  RankActions out;
  int next_f = 0, next_b = 0, next_w = 0;
  auto backward = [&] {
    out.push_back(compute(ActionKind::B, next_b++));
    if (split_backward && next_b - next_w > weight_lag) out.push_back(compute(ActionKind::W, next_w++));
  };
  while (next_f < warmup) out.push_back(compute(ActionKind::F, next_f++));
  while (next_f < m) {
    out.push_back(compute(ActionKind::F, next_f++));
    backward();
  }
  while (next_b < m) backward();
  while (split_backward && next_w < m) out.push_back(compute(ActionKind::W, next_w++));
  return out;
}

// Megatron interleaved 1F1B. Virtual micro-batch k runs chunk (k / pp) % v of micro-batch
// (k / (pp*v)) * pp + k % pp: groups of pp micro-batches sweep the chunks in turn (backward
// sweeps them in reverse). Every rank uses the same sequence, so each link stays FIFO.
// Warm-up is 2*(pp-rank-1) + (v-1)*pp virtual micro-batches, enough to keep rank 0 busy
// until the first gradient returns.
RankActions interleaved_order(const PipelineShape& shape, int rank) {
  const int p = shape.pp, v = shape.virtual_stages;
  const int total = shape.microbatches * v;
  const int warmup = std::min(2 * (p - rank - 1) + (v - 1) * p, total);
  auto mb_of = [&](int k) { return (k / (p * v)) * p + k % p; };
  auto forward = [&](int k) { return compute(ActionKind::F, mb_of(k), (k / p) % v); };
  auto backward = [&](int k) { return compute(ActionKind::B, mb_of(k), v - 1 - (k / p) % v); };
  RankActions out;
  for (int k = 0; k < warmup; ++k) out.push_back(forward(k));
  for (int k = 0; k < total - warmup; ++k) {
    out.push_back(forward(warmup + k));
    out.push_back(backward(k));
  }
  for (int k = total - warmup; k < total; ++k) out.push_back(backward(k));
  return out;
}

}  // namespace

const std::vector<std::string>& schedule_names() {
  static const std::vector<std::string> names = {"naive", "gpipe", "1f1b", "interleaved", "zb"};
  return names;
}

Schedule generate_compute_order(const std::string& name, const PipelineShape& shape) {
  check_arguments(name, shape);
  Schedule out(shape.pp);
  for (int rank = 0; rank < shape.pp; ++rank) {
    if (name == "naive") out[rank] = naive_order(shape);
    if (name == "gpipe") out[rank] = gpipe_order(shape);
    if (name == "1f1b") out[rank] = one_f_one_b_order(shape, rank, false);
    if (name == "zb") out[rank] = one_f_one_b_order(shape, rank, true);
    if (name == "interleaved") out[rank] = interleaved_order(shape, rank);
  }
  return out;
}

Schedule generate_schedule(const std::string& name, int pp, int microbatches, int virtual_stages) {
  const PipelineShape shape{pp, microbatches, virtual_stages};
  return insert_communication(generate_compute_order(name, shape), shape);
}

}  // namespace pyruntime
