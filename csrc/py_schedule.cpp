// Python bindings of the pipeline schedules (csrc/core/schedule.h). Actions cross as
// PipelineAction objects with the kind as a string ("F", "SEND_B", ...);
// pyruntime/parallel/pipeline/schedule.py wraps them in frozen dataclasses, so the
// Python-facing types live in one place. std::invalid_argument surfaces as ValueError
// (pybind11's default translation).
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings.h"
#include "core/schedule.h"

namespace py = pybind11;

namespace pyruntime {
namespace {

Action make_action(const std::string& kind, int microbatch, int chunk, int peer, int stage) {
  Action a;
  a.kind = parse_kind(kind);
  a.microbatch = microbatch;
  a.chunk = chunk;
  a.peer = peer;
  a.stage = stage;
  return a;
}

void bind_action(py::module_& m) {
  py::class_<Action>(m, "PipelineAction",
                     "One step of one rank: compute (F, B, W) or message (SEND_F, RECV_F, SEND_B, RECV_B).")
      .def(py::init(&make_action), py::arg("kind"), py::arg("microbatch"), py::arg("chunk") = 0,
           py::arg("peer") = -1, py::arg("stage") = -1)
      .def_property(
          "kind", [](const Action& a) { return std::string(kind_name(a.kind)); },
          [](Action& a, const std::string& k) { a.kind = parse_kind(k); })
      .def_readwrite("microbatch", &Action::microbatch)
      .def_readwrite("chunk", &Action::chunk)
      .def_readwrite("peer", &Action::peer, "the other rank of a SEND_*/RECV_*; -1 for compute")
      .def_readwrite("stage", &Action::stage, "global stage chunk*pp + rank; -1 when not filled in")
      .def_property_readonly("is_comm", [](const Action& a) { return is_comm(a.kind); })
      .def("__eq__", [](const Action& a, const Action& b) { return a == b; })
      .def("__repr__", [](const Action& a) { return "PipelineAction(" + describe(a) + ")"; })
      .def(py::pickle(
          [](const Action& a) {
            return py::make_tuple(std::string(kind_name(a.kind)), a.microbatch, a.chunk, a.peer, a.stage);
          },
          [](const py::tuple& t) {
            return make_action(t[0].cast<std::string>(), t[1].cast<int>(), t[2].cast<int>(), t[3].cast<int>(),
                               t[4].cast<int>());
          }));
}

void bind_result(py::module_& m) {
  py::class_<TimedAction>(m, "TimedAction", "One action of a simulated run with its start and end time.")
      .def_readonly("rank", &TimedAction::rank)
      .def_readonly("index", &TimedAction::index, "position in the rank's action list")
      .def_readonly("action", &TimedAction::action)
      .def_property_readonly("kind", [](const TimedAction& t) { return std::string(kind_name(t.action.kind)); })
      .def_property_readonly("microbatch", [](const TimedAction& t) { return t.action.microbatch; })
      .def_property_readonly("chunk", [](const TimedAction& t) { return t.action.chunk; })
      .def_property_readonly("peer", [](const TimedAction& t) { return t.action.peer; })
      .def_property_readonly("stage", [](const TimedAction& t) { return t.action.stage; })
      .def_readonly("start", &TimedAction::start)
      .def_readonly("end", &TimedAction::end);
  py::class_<SimResult>(m, "SimResult", "Makespan, bubbles, activation peaks and timed actions of a schedule.")
      .def_readonly("makespan", &SimResult::makespan)
      .def_readonly("busy", &SimResult::busy, "per rank: total compute time")
      .def_readonly("bubble_fraction", &SimResult::bubble_fraction, "per rank: (makespan - busy) / makespan")
      .def_readonly("peak_activations", &SimResult::peak_activations,
                    "per rank: most (chunk, micro-batch) pairs with F done and B not")
      .def_readonly("peak_pending_weight_grads", &SimResult::peak_pending_weight_grads,
                    "per rank: most (chunk, micro-batch) pairs with B done and W not")
      .def_readonly("split_backward", &SimResult::split_backward)
      .def_readonly("events", &SimResult::events)
      .def_property_readonly("mean_bubble_fraction", &SimResult::mean_bubble_fraction);
}

SimResult validate(const Schedule& actions, int pp, int microbatches, int virtual_stages, double forward,
                   double backward, double backward_input, double backward_weight, double comm_latency) {
  const Costs costs{forward, backward, backward_input, backward_weight, comm_latency};
  return simulate_schedule(actions, PipelineShape{pp, microbatches, virtual_stages}, costs);
}

}  // namespace

void bind_schedule(py::module_& m) {
  bind_action(m);
  bind_result(m);
  m.def("schedule_names", &schedule_names, "Names accepted by generate_schedule.");
  m.def(
      "generate_schedule",
      [](const std::string& name, int pp, int microbatches, int virtual_stages) {
        return generate_schedule(name, pp, microbatches, virtual_stages);
      },
      py::arg("name"), py::arg("pp"), py::arg("microbatches"), py::arg("virtual_stages") = 1,
      py::call_guard<py::gil_scoped_release>(), "Per-rank action lists, messages included.");
  m.def(
      "generate_compute_order",
      [](const std::string& name, int pp, int microbatches, int virtual_stages) {
        return generate_compute_order(name, PipelineShape{pp, microbatches, virtual_stages});
      },
      py::arg("name"), py::arg("pp"), py::arg("microbatches"), py::arg("virtual_stages") = 1,
      py::call_guard<py::gil_scoped_release>(), "Per-rank F/B/W order, without messages.");
  m.def(
      "live_peaks",
      [](const std::string& name, int pp, int microbatches, int virtual_stages) {
        const LivePeaks p = live_peaks(generate_compute_order(name, PipelineShape{pp, microbatches, virtual_stages}));
        return std::make_pair(p.activations, p.pending_weight_grads);
      },
      py::arg("name"), py::arg("pp"), py::arg("microbatches"), py::arg("virtual_stages") = 1,
      py::call_guard<py::gil_scoped_release>(),
      "Per-rank peaks of live activations and of pending weight gradients of a named schedule, from its "
      "compute order alone (what simulate reports, without messages or timing).");
  m.def(
      "insert_communication",
      [](const Schedule& compute_only, int pp, int microbatches, int virtual_stages) {
        return insert_communication(compute_only, PipelineShape{pp, microbatches, virtual_stages});
      },
      py::arg("actions"), py::arg("pp"), py::arg("microbatches"), py::arg("virtual_stages") = 1,
      py::call_guard<py::gil_scoped_release>(), "Adds deadlock-free SEND/RECV actions to compute-only lists.");
  m.def(
      "simulate_named",
      [](const std::string& name, int pp, int microbatches, int virtual_stages, double forward, double backward,
         double backward_input, double backward_weight, double comm_latency) {
        SimResult r = validate(generate_schedule(name, pp, microbatches, virtual_stages), pp, microbatches,
                               virtual_stages, forward, backward, backward_input, backward_weight, comm_latency);
        r.events.clear();  // the planner's search asks thousands of these: no per-action objects for Python
        return r;
      },
      py::arg("name"), py::arg("pp"), py::arg("microbatches"), py::arg("virtual_stages") = 1,
      py::arg("forward") = 1.0, py::arg("backward") = 2.0, py::arg("backward_input") = 1.0,
      py::arg("backward_weight") = 1.0, py::arg("comm_latency") = 0.0, py::call_guard<py::gil_scoped_release>(),
      "generate_schedule + validate_schedule in one call, without the timed events (events is empty).");
  m.def("validate_schedule", &validate, py::arg("actions"), py::arg("pp"), py::arg("microbatches"),
        py::arg("virtual_stages") = 1, py::arg("forward") = 1.0, py::arg("backward") = 2.0,
        py::arg("backward_input") = 1.0, py::arg("backward_weight") = 1.0, py::arg("comm_latency") = 0.0,
        py::call_guard<py::gil_scoped_release>(),
        "Checks and simulates per-rank action lists; raises ValueError naming the offending action.");
}

}  // namespace pyruntime
