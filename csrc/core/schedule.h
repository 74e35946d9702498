// Pipeline-parallel schedules: per-rank ordered action lists, their generators and a
// validator/simulator that proves a list can run (matched messages, satisfied data
// dependencies, no deadlock) and predicts its makespan, bubbles and activation memory.
// Plain C++17, no torch: unit-tested in csrc/tests/test_schedule.cpp, bound to Python in
// csrc/py_schedule.cpp.
//
// Placement (Megatron interleaved): with pp ranks and v virtual chunks per rank the model has
// pp*v stages and chunk c of rank r is global stage s = c*pp + r. Stage 0 holds the embedding,
// stage pp*v-1 the loss.
//
// Executor convention (what the simulator models, and what makes generated schedules
// deadlock-free on NCCL):
//  * A maximal run of consecutive SEND_*/RECV_* actions between two compute actions is ONE
//    communication batch: the executor posts all of its ops together, in list order, as one
//    batch_isend_irecv (one NCCL group). Megatron's send_forward_recv_backward is the batch
//    [SEND_F, RECV_B].
//  * Posting a batch never blocks the program. An F or B that consumes a received tensor
//    (F its activation, B its output gradient) first waits for the whole batch that received
//    it (NCCL completes a group as a unit); other computes run on while the batch is in
//    flight (Megatron and torch.distributed.pipelining also wait at the consumer). Sends are
//    waited for at the end of the step. Waiting later than the batch's position only moves
//    events earlier, so every argument for deadlock-freedom made for "wait at the batch"
//    carries over.
//  * A rank's batches run one after another (NCCL serialises them on the communicator's
//    stream): a batch starts when the rank reaches it and its previous batch has completed.
//  * A started batch completes once, for each of its ops, the peer has started the batch
//    holding the matching op (rendezvous: a send needs its receive posted and vice versa);
//    an op ends comm_latency after the later of the two starts. Buffered sends only finish
//    sooner, so a schedule that passes here cannot hang on a real backend.
//  * Messages between one ordered pair of ranks are matched first-in-first-out (NCCL ignores
//    tags): the k-th send from rank a to rank b pairs with the k-th receive on b from a.
//    The validator therefore requires both sides to list them in the same order.
#pragma once

#include <string>
#include <vector>

namespace pyruntime {

// F: forward of one micro-batch through one stage. B: its backward; the full backward when
// the schedule has no W actions, only the input-gradient part when it has (zero bubble).
// W: the weight-gradient part. SEND_F/RECV_F carry activations to the next stage,
// SEND_B/RECV_B gradients to the previous stage.
enum class ActionKind { F, B, W, SEND_F, RECV_F, SEND_B, RECV_B };

struct Action {
  ActionKind kind = ActionKind::F;
  int microbatch = 0;
  int chunk = 0;   // virtual chunk on this rank (0 when not interleaved)
  int peer = -1;   // the other rank of a SEND_*/RECV_*; -1 for compute actions
  int stage = -1;  // global stage chunk*pp + rank when known; -1 = derive it
};

bool operator==(const Action& a, const Action& b);

const char* kind_name(ActionKind kind);
// "F", "b", "send_f", ... (case-insensitive); throws std::invalid_argument otherwise.
ActionKind parse_kind(const std::string& name);
bool is_comm(ActionKind kind);
// "F(mb=3, chunk=0)", "RECV_F(mb=3, chunk=0) from rank 1", "SEND_B(mb=0, chunk=1) to rank 2".
std::string describe(const Action& action);

using RankActions = std::vector<Action>;
using Schedule = std::vector<RankActions>;  // [rank][position]

struct PipelineShape {
  int pp = 1;
  int microbatches = 1;
  int virtual_stages = 1;

  int num_stages() const { return pp * virtual_stages; }
  int stage(int rank, int chunk) const { return chunk * pp + rank; }
  int rank_of(int stage) const { return stage % pp; }
  int chunk_of(int stage) const { return stage / pp; }
};

// Throws std::invalid_argument unless pp, microbatches and virtual_stages are all >= 1.
void check_shape(const PipelineShape& shape);

// ---- generators (schedule_gen.cpp) -------------------------------------------------------

// "naive", "gpipe", "1f1b", "interleaved", "zb".
const std::vector<std::string>& schedule_names();

// The compute actions (F, B, W) of every rank in execution order, without communication.
// Throws std::invalid_argument (one line, naming the numbers) for pp < 1, microbatches < 1,
// 1f1b/zb/interleaved with microbatches < pp, interleaved with virtual_stages < 2 or
// microbatches % pp != 0, virtual_stages != 1 for the others, and unknown names.
Schedule generate_compute_order(const std::string& name, const PipelineShape& shape);

// Per rank, walking its list in order: the most (chunk, micro-batch) pairs whose F has run
// and whose B has not (the activations it holds), and, when the schedule has W actions, the
// most whose B has run and W not (stashed weight gradients; 0 without W). They depend on the
// order alone, never on timing or messages: the simulator reports these, and the planner
// reads them from a compute order without inserting messages or simulating (schedule.cpp).
struct LivePeaks {
  std::vector<int> activations;
  std::vector<int> pending_weight_grads;
};
LivePeaks live_peaks(const Schedule& schedule);

// generate_compute_order followed by insert_communication: ready to execute.
Schedule generate_schedule(const std::string& name, int pp, int microbatches, int virtual_stages = 1);

// Adds SEND/RECV actions to compute-only lists (schedule_comm.cpp). Plans an ideal run (the
// default Costs, free messages), then gives each message a meeting time between the end of
// its producer and the start of its consumer, preferably one where both ranks sit between
// two computes: the send goes into the sender's gap at that time, the receive into the
// receiver's. Such placements cannot deadlock, whatever the real costs (proof in
// schedule_comm.cpp), and keep first-in-first-out order on every link; for the built-in
// schedules at the planned costs they reproduce the ideal run's makespan (the closed forms
// in the tests). Stage boundaries inside one rank
// (pp == 1) need no messages. Fills Action::stage of every action. Lists that cannot run
// (e.g. two ranks each waiting for the other) still get messages; the validator names the
// deadlock.
Schedule insert_communication(const Schedule& compute_only, const PipelineShape& shape);

// ---- validator / simulator (schedule_check.cpp, schedule_sim.cpp) -------------------------

// Time of one micro-batch through a rank's whole share of the model (all of its chunks):
// one action on one chunk costs the value divided by virtual_stages, so schedules with
// different v are compared on the same model. comm_latency is per message and not divided.
struct Costs {
  double forward = 1.0;
  double backward = 2.0;         // B of a schedule without W (input + weight gradients)
  double backward_input = 1.0;   // B of a schedule with W (zero bubble)
  double backward_weight = 1.0;  // W
  double comm_latency = 0.0;
};

struct TimedAction {
  int rank = 0;
  int index = 0;  // position in the rank's action list
  Action action;  // with stage filled in
  double start = 0.0;  // comm: when its batch started on the comm stream
  double end = 0.0;    // comm: when this op completed
};

struct SimResult {
  double makespan = 0.0;
  std::vector<double> busy;              // per rank: total compute time
  std::vector<double> bubble_fraction;   // per rank: (makespan - busy) / makespan
  std::vector<int> peak_activations;     // per rank: max live (chunk, micro-batch) pairs, F done and B not
  std::vector<int> peak_pending_weight_grads;  // per rank: max B done and W not (0 without W)
  bool split_backward = false;           // the schedule has W actions
  std::vector<TimedAction> events;       // every action of every rank, rank-major

  // Mean of the per-rank bubble fractions: 1 - total busy / (pp * makespan).
  double mean_bubble_fraction() const;
};

// Checks `schedule` (one list per rank; schedule.size() must equal shape.pp) and simulates it.
// Throws std::invalid_argument with one line naming the rank, the action's position and the
// action, e.g. "rank 2 action #7 RECV_F(mb=3, chunk=0) from rank 1: no matching SEND_F on
// rank 1", for: out-of-range fields, a comm action whose peer is not the rank of the
// neighbouring stage, unmatched or out-of-order messages, an F/B/W/SEND before the data it
// needs, duplicates, a (stage, micro-batch) missing its F or B (or W when any W exists),
// and deadlock (work left but no batch can start or complete; every waiting op is named).
SimResult simulate_schedule(const Schedule& schedule, const PipelineShape& shape, const Costs& costs = {});

}  // namespace pyruntime
