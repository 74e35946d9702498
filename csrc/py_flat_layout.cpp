// Python bindings of the flat-buffer layout planner (csrc/core/flat_layout.h). Pieces and
// buckets cross as plain tuples; pyruntime/ops/flat.py turns them into named tuples, so the
// Python-facing types live in one place. std::invalid_argument surfaces as ValueError
// (pybind11's default translation).
#include <pybind11/stl.h>

#include <tuple>
#include <vector>

#include "bindings.h"
#include "core/flat_layout.h"

namespace py = pybind11;

namespace pyruntime {
namespace {

using PieceTuple = std::tuple<int64_t, int64_t, int64_t, int64_t>;
using BucketTuple = std::tuple<int64_t, int64_t, int64_t>;

std::vector<PieceTuple> pieces_as_tuples(const FlatLayout& layout, int64_t rank) {
  std::vector<PieceTuple> out;
  for (const ShardPiece& p : layout.pieces(rank)) {
    out.emplace_back(p.tensor_index, p.tensor_offset, p.shard_offset, p.numel);
  }
  return out;
}

std::vector<BucketTuple> buckets_as_tuples(const std::vector<int64_t>& numels, int64_t bucket_bytes,
                                           int64_t element_size, int64_t align) {
  std::vector<BucketTuple> out;
  for (const Bucket& b : plan_buckets(numels, bucket_bytes, element_size, align)) {
    out.emplace_back(b.begin, b.end, b.numel);
  }
  return out;
}

}  // namespace

void bind_flat_layout(py::module_& m) {
  py::class_<FlatLayout>(m, "FlatLayout",
                         "Offsets of tensors in one flat buffer, padded into equal per-rank shards.")
      .def(py::init<std::vector<int64_t>, int64_t, int64_t>(), py::arg("numels"), py::arg("world_size") = 1,
           py::arg("align") = 16)
      .def_property_readonly("numels", &FlatLayout::numels)
      .def_property_readonly("offsets", &FlatLayout::offsets)
      .def_property_readonly("num_tensors", &FlatLayout::num_tensors)
      .def_property_readonly("world_size", &FlatLayout::world_size)
      .def_property_readonly("align", &FlatLayout::align)
      .def_property_readonly("total_numel", &FlatLayout::total_numel)
      .def_property_readonly("shard_numel", &FlatLayout::shard_numel)
      .def("shard_range", &FlatLayout::shard_range, py::arg("rank"), "(begin, end) of rank's shard in the buffer.")
      .def("pieces", &pieces_as_tuples, py::arg("rank"),
           "(tensor_index, tensor_offset, shard_offset, numel) of each tensor slice in rank's shard.");
  m.def("plan_buckets", &buckets_as_tuples, py::arg("numels"), py::arg("bucket_bytes"), py::arg("element_size"),
        py::arg("align") = 1, "(begin, end, numel) of each bucket of consecutive tensors.");
}

}  // namespace pyruntime
