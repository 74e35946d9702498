// torch.ops.pyruntime.adamw_step: one AdamW step over flat fp32 buffers on the host (CPU), the
// optimizer of `train --offload optimizer` and of pyruntime.ops.adamw_step on CPU tensors.
//
//   adamw_step(params!, grads, exp_avg!, exp_avg_sq!, param_copy!?, decay_segments, decay_factor,
//              beta1, beta2, eps, step_size, bias_correction2_sqrt) -> ()
//
// Per element, the arithmetic of torch.optim.AdamW (decoupled weight decay, bias correction),
// in fp32, rounding for rounding as torch's foreach path runs it with its AVX2/AVX-512 kernels
// (lerp_ and addcmul_ are fused multiply-adds there; mul_, div_, add_ and addcdiv_ are not),
// so the moments are the same to the last bit; the parameters too except where torch's sqrt
// (MKL's, not correctly rounded) is 1 ulp off ours. Contraction is off in this loop
// (fp-contract=off): the compiler fuses nothing the code does not ask for.
//   p = p * decay_factor                      only inside decay_segments (matrices, not norms)
//   m = fma(1 - beta1, g - m, m)                               lerp_
//   v = fma((1 - beta2) * g, g, v * beta2)                     mul_, addcmul_
//   p = p + (step_size * m) / (sqrt(v) / bias_correction2_sqrt + eps)   addcdiv_
//   param_copy = p                            optional, fp32 or bf16 (the device's copy)
// The step-dependent scalars come from the caller (computed in fp64, as torch does).
//
// Memory: one pass, 28 bytes per parameter with fp32 gradients (read p g m v, write p m v),
// +2 or +4 with a copy. The loop is written for the compiler's vectoriser (no branches, no
// aliasing: __restrict) and compiled three times on x86-64 GCC (x86-64-v4 = AVX-512,
// v3 = AVX2 + FMA, baseline SSE2, where fma is a libm call) with the CPU picked at load time (target_clones); the work is split over ATen's OpenMP
// threads in chunks of kChunk elements, each inside one decay run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// x86-64-v4 (AVX-512 F/BW/DQ/VL) and v3 (AVX2 + FMA), not bare "avx512f" / "fma": the
// parameter copy's and bf16/fp16 gradients' 16-bit lanes need AVX-512 BW / AVX2 integer ops,
// without which GCC left those variants scalar (measured: the step with a bf16 copy ran 5.5x
// slower than without one at 100M parameters).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11
#define PYRUNTIME_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PYRUNTIME_SIMD_CLONES __attribute__((target_clones("avx512f", "fma", "default")))
#else
#define PYRUNTIME_SIMD_CLONES
#endif

namespace pyruntime {
namespace {

// 64K elements: 1.75 MiB of traffic per chunk, enough to amortise a task and small enough
// that the last chunks spread over the threads.
constexpr int64_t kChunk = 1 << 16;
// Below this many elements one thread does it all: waking the pool costs more.
constexpr int64_t kParallelMin = 1 << 15;

// fp32 copies of the fp64 host scalars, rounded once, as torch's CPU kernels round theirs;
// one_minus_beta* are computed in fp64 first (torch's lerp_ / addcmul_ get them so).
struct Scalars {
  float decay_factor, beta2, eps, step_size, bias_correction2_sqrt, one_minus_beta1, one_minus_beta2;
};

// fp32 -> bf16, round to nearest even, NaN kept quiet; branch-free so the loop vectorises
// (c10::BFloat16's constructor branches on isnan).
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
}

inline float load(const float* g, int64_t i) { return g[i]; }
inline float load(const c10::BFloat16* g, int64_t i) { return static_cast<float>(g[i]); }
inline float load(const c10::Half* g, int64_t i) { return static_cast<float>(g[i]); }

enum class Copy { kNone, kFloat, kBFloat16 };

#define PYRUNTIME_NO_CONTRACT __attribute__((optimize("fp-contract=off")))

template <typename G, Copy C>
__attribute__((always_inline)) PYRUNTIME_NO_CONTRACT inline void adamw_run(float* __restrict p, const G* __restrict g,
                                                     float* __restrict m, float* __restrict v,
                                                     void* __restrict copy, int64_t n, Scalars s,
                                                     float decay) {
  const float a1 = s.one_minus_beta1, a2 = s.one_minus_beta2;
  float* __restrict copy_f = static_cast<float*>(copy);
  uint16_t* __restrict copy_b = static_cast<uint16_t*>(copy);
  for (int64_t i = 0; i < n; ++i) {
    const float gi = load(g, i);
    const float mi = std::fma(a1, gi - m[i], m[i]);
    const float vi = std::fma(a2 * gi, gi, v[i] * s.beta2);
    const float denom = std::sqrt(vi) / s.bias_correction2_sqrt + s.eps;
    const float decayed = p[i] * decay;
    const float pi = decayed + s.step_size * mi / denom;
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if constexpr (C == Copy::kFloat) copy_f[i] = pi;
    if constexpr (C == Copy::kBFloat16) copy_b[i] = bf16_bits(pi);
  }
}

using RunFn = void (*)(float*, const void*, float*, float*, void*, int64_t, Scalars, float);

// One non-template entry per (gradient dtype, copy) pair: target_clones needs a plain function.
#define PYRUNTIME_ADAMW_RUN(NAME, G, C)                                                         \
  PYRUNTIME_SIMD_CLONES PYRUNTIME_NO_CONTRACT void NAME(float* p, const void* g, float* m, float* v, void* copy,     \
                                  int64_t n, Scalars s, float decay) {                          \
    adamw_run<G, C>(p, static_cast<const G*>(g), m, v, copy, n, s, decay);                      \
  }
PYRUNTIME_ADAMW_RUN(run_f32, float, Copy::kNone)
PYRUNTIME_ADAMW_RUN(run_f32_f32, float, Copy::kFloat)
PYRUNTIME_ADAMW_RUN(run_f32_bf16, float, Copy::kBFloat16)
PYRUNTIME_ADAMW_RUN(run_bf16, c10::BFloat16, Copy::kNone)
PYRUNTIME_ADAMW_RUN(run_bf16_f32, c10::BFloat16, Copy::kFloat)
PYRUNTIME_ADAMW_RUN(run_bf16_bf16, c10::BFloat16, Copy::kBFloat16)
PYRUNTIME_ADAMW_RUN(run_f16, c10::Half, Copy::kNone)
PYRUNTIME_ADAMW_RUN(run_f16_f32, c10::Half, Copy::kFloat)
PYRUNTIME_ADAMW_RUN(run_f16_bf16, c10::Half, Copy::kBFloat16)
#undef PYRUNTIME_ADAMW_RUN

RunFn pick_run(at::ScalarType grad, Copy copy) {
  static const RunFn table[3][3] = {{run_f32, run_f32_f32, run_f32_bf16},
                                    {run_bf16, run_bf16_f32, run_bf16_bf16},
                                    {run_f16, run_f16_f32, run_f16_bf16}};
  const int row = grad == at::kFloat ? 0 : grad == at::kBFloat16 ? 1 : 2;
  return table[row][static_cast<int>(copy)];
}

void check_buffer(const char* name, const at::Tensor& t, const c10::SymInt& n, bool fp32) {
  TORCH_CHECK(t.device().is_cpu() || t.device().is_meta(), "adamw_step: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_SYM_CHECK(t.sym_numel().sym_eq(n), "adamw_step: ", name, " must have ", n, " elements, got shape ",
                  t.sym_sizes());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), "adamw_step: ", name,
              " must be a contiguous 1-D tensor of ", n, " elements, got shape ", t.sym_sizes());
  if (fp32) TORCH_CHECK(t.scalar_type() == at::kFloat, "adamw_step: ", name, " must be float32, got ", t.scalar_type());
}

void check_args(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg,
                const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& copy, at::IntArrayRef segments) {
  TORCH_CHECK(params.dim() == 1, "adamw_step: params must be 1-D, got shape ", params.sym_sizes());
  const c10::SymInt n = params.sym_numel();
  check_buffer("params", params, n, true);
  check_buffer("exp_avg", exp_avg, n, true);
  check_buffer("exp_avg_sq", exp_avg_sq, n, true);
  check_buffer("grads", grads, n, false);
  const auto g = grads.scalar_type();
  TORCH_CHECK(g == at::kFloat || g == at::kBFloat16 || g == at::kHalf,
              "adamw_step: grads must be float32, bfloat16 or float16, got ", g);
  if (copy.has_value()) {
    check_buffer("param_copy", *copy, n, false);
    TORCH_CHECK(copy->scalar_type() == at::kFloat || copy->scalar_type() == at::kBFloat16,
                "adamw_step: param_copy must be float32 or bfloat16, got ", copy->scalar_type());
  }
  TORCH_CHECK(segments.size() % 2 == 0, "adamw_step: decay_segments holds [begin, end) pairs, got ",
              segments.size(), " numbers");
  int64_t previous_end = 0;
  for (size_t i = 0; i < segments.size(); i += 2) {
    TORCH_SYM_CHECK(n.sym_ge(segments[i + 1]), "adamw_step: decay segment [", segments[i], ", ",
                    segments[i + 1], ") ends past the buffer's ", n, " elements");
    TORCH_CHECK(previous_end <= segments[i] && segments[i] <= segments[i + 1],
                "adamw_step: decay segment [", segments[i], ", ", segments[i + 1],
                ") must be sorted and disjoint, after the previous one's end ", previous_end);
    previous_end = segments[i + 1];
  }
}

struct Task {
  int64_t begin, end;
  bool decays;
};

// The buffer cut into chunks of at most kChunk elements, each wholly inside or outside a
// decay segment, so every chunk runs with one scalar decay factor.
std::vector<Task> plan_tasks(int64_t n, at::IntArrayRef segments) {
  std::vector<Task> tasks;
  auto add_run = [&](int64_t begin, int64_t end, bool decays) {
    for (int64_t b = begin; b < end; b += kChunk) tasks.push_back({b, std::min(b + kChunk, end), decays});
  };
  int64_t cursor = 0;
  for (size_t i = 0; i < segments.size(); i += 2) {
    add_run(cursor, segments[i], false);
    add_run(segments[i], segments[i + 1], true);
    cursor = segments[i + 1];
  }
  add_run(cursor, n, false);
  return tasks;
}

void adamw_step_cpu(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg,
                    const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& param_copy,
                    at::IntArrayRef decay_segments, double decay_factor, double beta1, double beta2, double eps,
                    double step_size, double bias_correction2_sqrt) {
  check_args(params, grads, exp_avg, exp_avg_sq, param_copy, decay_segments);
  const int64_t n = params.numel();
  const Copy copy = !param_copy.has_value()                        ? Copy::kNone
                    : param_copy->scalar_type() == at::kBFloat16 ? Copy::kBFloat16
                                                                 : Copy::kFloat;
  const Scalars s{static_cast<float>(decay_factor), static_cast<float>(beta2), static_cast<float>(eps),
                  static_cast<float>(step_size), static_cast<float>(bias_correction2_sqrt),
                  static_cast<float>(1.0 - beta1), static_cast<float>(1.0 - beta2)};
  const RunFn run = pick_run(grads.scalar_type(), copy);
  float* p = params.mutable_data_ptr<float>();
  float* m = exp_avg.mutable_data_ptr<float>();
  float* v = exp_avg_sq.mutable_data_ptr<float>();
  const char* g = static_cast<const char*>(grads.const_data_ptr());
  char* c = copy == Copy::kNone ? nullptr : static_cast<char*>(param_copy->mutable_data_ptr());
  const int64_t g_elem = grads.element_size(), c_elem = copy == Copy::kNone ? 0 : param_copy->element_size();
  const std::vector<Task> tasks = plan_tasks(n, decay_segments);
  auto body = [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Task& t = tasks[static_cast<size_t>(k)];
      run(p + t.begin, g + t.begin * g_elem, m + t.begin, v + t.begin, c ? c + t.begin * c_elem : nullptr,
          t.end - t.begin, s, t.decays ? s.decay_factor : 1.0f);
    }
  };
  const auto num_tasks = static_cast<int64_t>(tasks.size());
  if (n < kParallelMin) {
    body(0, num_tasks);
  } else {
    at::parallel_for(0, num_tasks, 1, body);
  }
}

// Meta kernel: the checks only (the op writes in place and returns nothing).
void adamw_step_meta(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& param_copy,
                     at::IntArrayRef decay_segments, double, double, double, double, double, double) {
  check_args(params, grads, exp_avg, exp_avg_sq, param_copy, decay_segments);
}

}  // namespace
}  // namespace pyruntime

// A fragment of the library that torch_ops.cpp defines (TORCH_LIBRARY may appear only once).
TORCH_LIBRARY_FRAGMENT(pyruntime, m) {
  m.def(
      "adamw_step(Tensor(a!) params, Tensor grads, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!)? param_copy, int[] decay_segments, float decay_factor, float beta1, float beta2, "
      "float eps, float step_size, float bias_correction2_sqrt) -> ()");
}

TORCH_LIBRARY_IMPL(pyruntime, CPU, m) { m.impl("adamw_step", &pyruntime::adamw_step_cpu); }

TORCH_LIBRARY_IMPL(pyruntime, Meta, m) { m.impl("adamw_step", &pyruntime::adamw_step_meta); }
