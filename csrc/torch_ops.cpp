// torch.library ops of pyruntime (torch.ops.pyruntime.*): schemas, CPU and Meta kernels. Each
// .cpp that includes torch headers costs most of a minute to compile, so there are few: this
// one (flat pack/unpack; their CUDA kernels live in csrc/cuda/flat_pack.cu) and
// adamw_cpu.cpp (the host AdamW, a TORCH_LIBRARY_FRAGMENT of the same library).
//
//   flat_pack(tensors, offsets, total_numel) -> flat     flat[offsets[i] : +numel_i] = tensors[i]
//   flat_unpack(flat, outs, offsets)                     outs[i] = flat[offsets[i] : +numel_i]
//
// Tensors are viewed as 1-D in row-major order; any dtype works because elements are moved
// as bytes. Offsets usually come from the layout planner (pyruntime.ops.flat.plan_flat_layout).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace pyruntime {

// Argument checks shared by the CPU, Meta and CUDA kernels (flat_pack.cu declares them).
// Sizes are read as SymInts so the Meta kernels also work while tracing with dynamic shapes.
void check_flat_pack_args(at::TensorList tensors, at::IntArrayRef offsets, int64_t total_numel) {
  // The dispatcher already refuses an empty list (no tensor to dispatch on); this guards
  // tensors[0] for direct C++ callers.
  TORCH_CHECK(!tensors.empty(), "flat_pack: needs at least one tensor (the buffer takes its dtype and device)");
  TORCH_CHECK(offsets.size() == tensors.size(), "flat_pack: got ", tensors.size(), " tensors but ",
              offsets.size(), " offsets");
  TORCH_CHECK(total_numel >= 0, "flat_pack: total_numel must be >= 0, got ", total_numel);
  const at::Tensor& first = tensors[0];
  c10::SymInt previous_end = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.layout() == at::kStrided, "flat_pack: tensors[", i, "] must be a dense (strided) tensor");
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), "flat_pack: tensors[", i, "] has dtype ",
                t.scalar_type(), " but tensors[0] has ", first.scalar_type(), "; all must match");
    TORCH_CHECK(t.device() == first.device(), "flat_pack: tensors[", i, "] is on ", t.device(),
                " but tensors[0] is on ", first.device());
    TORCH_CHECK(offsets[i] >= 0, "flat_pack: offsets[", i, "] must be >= 0, got ", offsets[i]);
    // Disjoint, ascending regions: each output byte has exactly one writer, so the parallel
    // copy is deterministic, and the gaps to zero are the spaces between neighbours.
    TORCH_SYM_CHECK(previous_end.sym_le(offsets[i]), "flat_pack: tensors[", i, "] at offset ", offsets[i],
                    " overlaps the previous tensor, which ends at ", previous_end,
                    "; regions must be disjoint and in ascending order");
    previous_end = t.sym_numel() + offsets[i];
    TORCH_SYM_CHECK(previous_end.sym_le(total_numel), "flat_pack: tensors[", i, "] (offset ", offsets[i],
                    ", numel ", t.sym_numel(), ") ends past total_numel ", total_numel);
  }
}

void check_flat_unpack_args(const at::Tensor& flat, at::TensorList outs, at::IntArrayRef offsets) {
  TORCH_CHECK(flat.dim() == 1, "flat_unpack: flat must be 1-D, got shape ", flat.sym_sizes());
  TORCH_CHECK(flat.layout() == at::kStrided, "flat_unpack: flat must be a dense (strided) tensor");
  TORCH_CHECK(offsets.size() == outs.size(), "flat_unpack: got ", outs.size(), " outs but ", offsets.size(),
              " offsets");
  for (size_t i = 0; i < outs.size(); ++i) {
    const at::Tensor& out = outs[i];
    TORCH_CHECK(out.layout() == at::kStrided, "flat_unpack: outs[", i, "] must be a dense (strided) tensor");
    TORCH_CHECK(out.scalar_type() == flat.scalar_type(), "flat_unpack: outs[", i, "] has dtype ",
                out.scalar_type(), " but flat has ", flat.scalar_type());
    TORCH_CHECK(out.device() == flat.device(), "flat_unpack: outs[", i, "] is on ", out.device(),
                " but flat is on ", flat.device());
    TORCH_CHECK(offsets[i] >= 0, "flat_unpack: offsets[", i, "] must be >= 0, got ", offsets[i]);
    TORCH_SYM_CHECK((out.sym_numel() + offsets[i]).sym_le(flat.sym_numel()), "flat_unpack: outs[", i,
                    "] (offset ", offsets[i], ", numel ", out.sym_numel(), ") ends past the end of flat (numel ",
                    flat.sym_numel(), ")");
  }
}

// Writing into memory that flat or another element of the same out also occupies would make
// the result depend on copy order. (Overlap between different outs is not checked: that
// costs a pairwise comparison per call.)
void check_flat_unpack_memory(const at::Tensor& flat, at::TensorList outs) {
  for (size_t i = 0; i < outs.size(); ++i) {
    TORCH_CHECK(at::has_internal_overlap(outs[i]) != at::MemOverlap::Yes, "flat_unpack: outs[", i,
                "] has elements sharing memory (e.g. an expanded tensor); it cannot be written to");
    auto status = at::get_overlap_status(outs[i], flat);
    TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial,
                "flat_unpack: outs[", i, "] shares memory with flat");
  }
}

namespace {

// Below this many bytes a copy is done on the calling thread: waking the pool costs more.
constexpr int64_t kParallelMinBytes = 256 * 1024;
// Contiguous tensors are split into chunks of this size so one huge tensor (an embedding)
// does not leave the other threads idle.
constexpr int64_t kChunkBytes = 1 << 20;

enum class Direction { kToFlat, kFromFlat };

void move_bytes(char* flat, char* tensor, int64_t nbytes, Direction dir) {
  if (dir == Direction::kToFlat) {
    std::memcpy(flat, tensor, static_cast<size_t>(nbytes));
  } else {
    std::memcpy(tensor, flat, static_cast<size_t>(nbytes));
  }
}

// Copies between a strided tensor's memory and a dense run of its elements in row-major
// order, one memcpy per innermost contiguous row (or per element when the last dim is
// strided). The multi-index advances like an odometer.
void strided_copy(char* flat, char* tensor, const at::Tensor& t, int64_t elem, Direction dir) {
  const int64_t ndim = t.dim();
  if (ndim == 0) return move_bytes(flat, tensor, elem, dir);
  at::IntArrayRef sizes = t.sizes(), strides = t.strides();
  const bool rows = strides[ndim - 1] == 1;
  const int64_t run = rows ? sizes[ndim - 1] : 1;  // elements per memcpy
  const int64_t outer = rows ? ndim - 1 : ndim;     // dims the odometer walks
  std::vector<int64_t> index(static_cast<size_t>(outer), 0);
  int64_t position = 0;  // element offset of the current run in `tensor`
  for (int64_t done = 0; done < t.numel(); done += run) {
    move_bytes(flat + done * elem, tensor + position * elem, run * elem, dir);
    for (int64_t d = outer - 1; d >= 0; --d) {
      if (++index[d] < sizes[d]) {
        position += strides[d];
        break;
      }
      position -= strides[d] * (sizes[d] - 1);
      index[d] = 0;
    }
  }
}

// One unit of parallel work: bytes [begin, end) of tensors[tensor] (the whole tensor when it
// is not contiguous).
struct CopyTask {
  size_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<CopyTask> plan_tasks(at::TensorList tensors, int64_t elem) {
  std::vector<CopyTask> tasks;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t nbytes = tensors[i].numel() * elem;
    const int64_t step = tensors[i].is_contiguous() ? kChunkBytes : std::max<int64_t>(nbytes, 1);
    for (int64_t b = 0; b < nbytes; b += step) tasks.push_back({i, b, std::min(b + step, nbytes)});
  }
  return tasks;
}

// Moves every tensor to/from its region of `flat_base`. Data pointers are read before the
// parallel region: data_ptr() may materialise a copy-on-write tensor, which must not race.
// The side that is only read (tensors when packing, flat when unpacking) is passed as char*
// too so both directions share one code path; it is never written.
void copy_all(at::TensorList tensors, std::vector<char*> data, char* flat_base, at::IntArrayRef offsets,
              int64_t elem, Direction dir) {
  std::vector<CopyTask> tasks = plan_tasks(tensors, elem);
  std::vector<uint8_t> contiguous(tensors.size());
  int64_t total_bytes = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    contiguous[i] = tensors[i].is_contiguous();
    total_bytes += tensors[i].numel() * elem;
  }
  auto body = [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const CopyTask& task = tasks[static_cast<size_t>(k)];
      char* flat = flat_base + offsets[task.tensor] * elem;
      if (contiguous[task.tensor]) {
        move_bytes(flat + task.begin, data[task.tensor] + task.begin, task.end - task.begin, dir);
      } else {
        strided_copy(flat, data[task.tensor], tensors[task.tensor], elem, dir);
      }
    }
  };
  const auto n = static_cast<int64_t>(tasks.size());
  if (total_bytes < kParallelMinBytes) {
    body(0, n);
  } else {
    at::parallel_for(0, n, 1, body);
  }
}

// Zeroes the padding of a packed buffer: the gaps between consecutive (ascending) regions
// and the tail. The data regions are overwritten anyway, so zeroing them would be wasted.
void zero_gaps(char* flat_base, at::TensorList tensors, at::IntArrayRef offsets, int64_t total_numel,
               int64_t elem) {
  int64_t cursor = 0;
  for (size_t i = 0; i <= tensors.size(); ++i) {
    const int64_t next = i < tensors.size() ? offsets[i] : total_numel;
    if (next > cursor) std::memset(flat_base + cursor * elem, 0, static_cast<size_t>((next - cursor) * elem));
    if (i < tensors.size()) cursor = next + tensors[i].numel();
  }
}

at::Tensor flat_pack_cpu(at::TensorList tensors, at::IntArrayRef offsets, int64_t total_numel) {
  check_flat_pack_args(tensors, offsets, total_numel);
  at::Tensor flat = at::empty({total_numel}, tensors[0].options());
  const int64_t elem = flat.element_size();
  char* flat_base = static_cast<char*>(flat.mutable_data_ptr());
  zero_gaps(flat_base, tensors, offsets, total_numel, elem);
  std::vector<char*> data;
  for (const at::Tensor& t : tensors) data.push_back(static_cast<char*>(const_cast<void*>(t.const_data_ptr())));
  copy_all(tensors, std::move(data), flat_base, offsets, elem, Direction::kToFlat);
  return flat;
}

void flat_unpack_cpu(const at::Tensor& flat, at::TensorList outs, at::IntArrayRef offsets) {
  check_flat_unpack_args(flat, outs, offsets);
  check_flat_unpack_memory(flat, outs);
  const at::Tensor source = flat.contiguous();
  std::vector<char*> data;
  for (const at::Tensor& out : outs) data.push_back(static_cast<char*>(out.mutable_data_ptr()));
  char* flat_base = static_cast<char*>(const_cast<void*>(source.const_data_ptr()));
  copy_all(outs, std::move(data), flat_base, offsets, source.element_size(), Direction::kFromFlat);
}

// Meta kernels: shapes and checks only, for FakeTensor / torch.compile tracing.
at::Tensor flat_pack_meta(at::TensorList tensors, at::IntArrayRef offsets, int64_t total_numel) {
  check_flat_pack_args(tensors, offsets, total_numel);
  return at::empty({total_numel}, tensors[0].options());
}

void flat_unpack_meta(const at::Tensor& flat, at::TensorList outs, at::IntArrayRef offsets) {
  check_flat_unpack_args(flat, outs, offsets);
}

}  // namespace
}  // namespace pyruntime

TORCH_LIBRARY(pyruntime, m) {
  m.def("flat_pack(Tensor[] tensors, int[] offsets, int total_numel) -> Tensor");
  m.def("flat_unpack(Tensor flat, Tensor(a!)[] outs, int[] offsets) -> ()");
}

TORCH_LIBRARY_IMPL(pyruntime, CPU, m) {
  m.impl("flat_pack", &pyruntime::flat_pack_cpu);
  m.impl("flat_unpack", &pyruntime::flat_unpack_cpu);
}

TORCH_LIBRARY_IMPL(pyruntime, Meta, m) {
  m.impl("flat_pack", &pyruntime::flat_pack_meta);
  m.impl("flat_unpack", &pyruntime::flat_unpack_meta);
}
