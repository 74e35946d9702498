// CUDA kernels of torch.ops.pyruntime.flat_pack / flat_unpack (schemas and CPU/Meta kernels:
// csrc/torch_ops.cpp). Compiled only when torch has CUDA (setup.py).
//
// Both ops become one list of byte-copy descriptors (src, dst, nbytes) and one kernel launch.
// A descriptor with src == nullptr zero-fills dst, which is how flat_pack's padding is
// written without a separate memset pass. Descriptors are split into fixed-size chunks; each
// block takes chunks grid-stride and finds its descriptor by binary search over the chunk
// prefix sums, so one huge tensor and thousands of tiny ones both spread over all blocks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace pyruntime {

// Defined in csrc/torch_ops.cpp, so CPU, Meta and CUDA kernels accept exactly the same inputs.
void check_flat_pack_args(at::TensorList tensors, at::IntArrayRef offsets, int64_t total_numel);
void check_flat_unpack_args(const at::Tensor& flat, at::TensorList outs, at::IntArrayRef offsets);
void check_flat_unpack_memory(const at::Tensor& flat, at::TensorList outs);

namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkBytes = 64 * 1024;  // a multiple of 16, so chunk starts keep alignment
constexpr int kBlocksPerSM = 4;

struct CopyDesc {
  const char* src;  // nullptr: zero-fill dst
  char* dst;
  int64_t nbytes;
  int64_t first_chunk;  // prefix sum of the chunk counts of the descriptors before this one
};

// Index of the descriptor owning `chunk`: the last one whose first_chunk <= chunk. Every
// descriptor is non-empty, so first_chunk is strictly increasing.
__device__ int64_t find_desc(const CopyDesc* descs, int64_t n, int64_t chunk) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    int64_t mid = lo + (hi - lo + 1) / 2;
    if (descs[mid].first_chunk <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Bytes [begin, end) of one descriptor in units of V (src and dst V-aligned, begin a multiple
// of sizeof(V)), then the tail that does not fill a whole V byte by byte.
template <typename V>
__device__ void copy_range(const char* src, char* dst, int64_t begin, int64_t end) {
  constexpr int64_t kUnit = sizeof(V);
  const int64_t body_end = begin + (end - begin) / kUnit * kUnit;
  for (int64_t b = begin + threadIdx.x * kUnit; b < body_end; b += blockDim.x * kUnit) {
    *reinterpret_cast<V*>(dst + b) = src ? *reinterpret_cast<const V*>(src + b) : V{};
  }
  for (int64_t b = body_end + threadIdx.x; b < end; b += blockDim.x) {
    dst[b] = src ? src[b] : char(0);
  }
}

__global__ void multi_tensor_copy_kernel(const CopyDesc* descs, int64_t n, int64_t total_chunks) {
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const CopyDesc d = descs[find_desc(descs, n, chunk)];
    const int64_t begin = (chunk - d.first_chunk) * kChunkBytes;
    const int64_t end = min(begin + kChunkBytes, d.nbytes);
    // The widest unit both pointers are aligned to; 16 bytes gives 128-bit loads and stores.
    const auto addresses = reinterpret_cast<uintptr_t>(d.src) | reinterpret_cast<uintptr_t>(d.dst);
    if (addresses % 16 == 0) {
      copy_range<uint4>(d.src, d.dst, begin, end);
    } else if (addresses % 8 == 0) {
      copy_range<uint2>(d.src, d.dst, begin, end);
    } else if (addresses % 4 == 0) {
      copy_range<uint32_t>(d.src, d.dst, begin, end);
    } else if (addresses % 2 == 0) {
      copy_range<uint16_t>(d.src, d.dst, begin, end);
    } else {
      copy_range<uint8_t>(d.src, d.dst, begin, end);
    }
  }
}

// Runs all copies on the current stream of `device` in one launch.
void launch_copies(std::vector<CopyDesc> descs, const at::Device& device) {
  descs.erase(std::remove_if(descs.begin(), descs.end(), [](const CopyDesc& d) { return d.nbytes == 0; }),
              descs.end());
  int64_t total_chunks = 0;
  for (CopyDesc& d : descs) {
    d.first_chunk = total_chunks;
    total_chunks += (d.nbytes + kChunkBytes - 1) / kChunkBytes;
  }
  if (total_chunks == 0) return;
  // The descriptors go through pinned memory with an asynchronous copy on the current stream;
  // the caching host allocator records that use and does not recycle the buffer before the
  // copy has run.
  const auto bytes = static_cast<int64_t>(descs.size() * sizeof(CopyDesc));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.mutable_data_ptr(), descs.data(), static_cast<size_t>(bytes));
  at::Tensor on_device = host.to(device, /*non_blocking=*/true);

  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(total_chunks, int64_t{sms} * kBlocksPerSM));
  multi_tensor_copy_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream(device.index())>>>(
      reinterpret_cast<const CopyDesc*>(on_device.const_data_ptr()), static_cast<int64_t>(descs.size()),
      total_chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor flat_pack_cuda(at::TensorList tensors, at::IntArrayRef offsets, int64_t total_numel) {
  check_flat_pack_args(tensors, offsets, total_numel);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  at::Tensor flat = at::empty({total_numel}, tensors[0].options());
  const int64_t elem = flat.element_size();
  char* base = static_cast<char*>(flat.mutable_data_ptr());
  // Non-contiguous inputs are gathered by ATen first. The temporaries are freed when this
  // function returns, but the caching allocator only hands their memory to work queued
  // after the kernel on this stream.
  std::vector<at::Tensor> sources;
  std::vector<CopyDesc> descs;
  int64_t cursor = 0;  // regions are ascending and disjoint (checked): gaps lie between them
  for (size_t i = 0; i < tensors.size(); ++i) {
    sources.push_back(tensors[i].contiguous());
    descs.push_back({nullptr, base + cursor * elem, (offsets[i] - cursor) * elem, 0});
    descs.push_back({static_cast<const char*>(sources.back().const_data_ptr()), base + offsets[i] * elem,
                     sources.back().numel() * elem, 0});
    cursor = offsets[i] + sources.back().numel();
  }
  descs.push_back({nullptr, base + cursor * elem, (total_numel - cursor) * elem, 0});
  launch_copies(std::move(descs), flat.device());
  return flat;
}

void flat_unpack_cuda(const at::Tensor& flat, at::TensorList outs, at::IntArrayRef offsets) {
  check_flat_unpack_args(flat, outs, offsets);
  check_flat_unpack_memory(flat, outs);
  const c10::cuda::CUDAGuard guard(flat.device());
  const at::Tensor source = flat.contiguous();
  const int64_t elem = source.element_size();
  const char* base = static_cast<const char*>(source.const_data_ptr());
  // A non-contiguous out receives its slice through a contiguous staging tensor, scattered
  // into place by ATen's copy_ after the kernel (same stream, so in order).
  std::vector<at::Tensor> targets;
  std::vector<CopyDesc> descs;
  for (size_t i = 0; i < outs.size(); ++i) {
    targets.push_back(outs[i].is_contiguous() ? outs[i] : at::empty(outs[i].sizes(), outs[i].options()));
    descs.push_back({base + offsets[i] * elem, static_cast<char*>(targets.back().mutable_data_ptr()),
                     targets.back().numel() * elem, 0});
  }
  launch_copies(std::move(descs), flat.device());
  for (size_t i = 0; i < outs.size(); ++i) {
    if (!targets[i].is_same(outs[i])) outs[i].copy_(targets[i]);
  }
}

}  // namespace
}  // namespace pyruntime

TORCH_LIBRARY_IMPL(pyruntime, CUDA, m) {
  m.impl("flat_pack", &pyruntime::flat_pack_cuda);
  m.impl("flat_unpack", &pyruntime::flat_unpack_cuda);
}
