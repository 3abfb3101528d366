// The four CPU kernels of rlr_kernels' fused-backend contract (see rlr_kernels/dispatch.py).
//
// All tensors are contiguous CPU tensors of one floating dtype (float16, bfloat16, float32 or
// float64); half types compute in float32, float64 in float64. `lse` is always float32.
//
//   local_forward(q (B,H,L,d), k (R,H,L,d), v (R,H,L,d), h, w, window) -> out (B,H,L,d), lse (B,R,H,L)
//   local_backward(q, k, v, out, lse, grad_out, h, w, window)          -> dq, dk, dv (dk, dv batch-summed)
//   masked_forward(q (B,H,L,d), k (H,L,d), v (B,H,L,d), h, w, window) -> out (B,H,L,d), lse (B,H,L)
//   masked_backward(q, k, v, out, lse, grad_out, h, w, window)        -> dq, dk, dv (dk batch-summed)
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <string>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "vec.h"

namespace rlr::cpu {

std::tuple<at::Tensor, at::Tensor> local_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 int64_t height, int64_t width, int64_t window);
std::tuple<at::Tensor, at::Tensor, at::Tensor> local_backward(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& out,
                                                              const at::Tensor& lse, const at::Tensor& grad_out,
                                                              int64_t height, int64_t width, int64_t window);
std::tuple<at::Tensor, at::Tensor> masked_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  int64_t height, int64_t width, int64_t window);
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_backward(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const at::Tensor& out,
                                                               const at::Tensor& lse, const at::Tensor& grad_out,
                                                               int64_t height, int64_t width, int64_t window);

// Whether masked_forward / masked_backward take the AMX path for bfloat16 inputs on this CPU
// (L and d multiples of 16; RLR_CPU_AMX=0 in the environment turns it off).
bool masked_amx_available();
// "flash" where float32 masked attention runs on ATen's CPU flash attention (CPUs without AVX-512), else
// "kernel"; RLR_CPU_MASKED=kernel|flash overrides.
std::string masked_float32_path();
// The flash path's (L, L) window masks, kept for the whole process (at most 4, 128 MiB): (masks, bytes) held now,
// and a way to drop them (for tests and measurements).
std::tuple<int64_t, int64_t> masked_flash_mask_cache();
void masked_flash_mask_cache_clear();

// Scratch reused from call to call by the calling thread (the kernels' tasks use it only during
// the call; kTag keeps the ops' buffers apart): allocating laid-out keys / values and gradient
// accumulators afresh on every call costs page faults that take about as long as the kernels
// themselves at the paper shapes.
template <typename T, int kTag>
T* reusable_buffer(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) {
    buffer.clear();
    buffer.shrink_to_fit();
    buffer.resize(n);
  }
  return buffer.data();
}

// at::parallel_for whose workers flush subnormals while they run a kernel (see FlushDenormals).
template <typename F>
void parallel_for_flushed(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    FlushDenormals flush;
    f(b, e);
  });
}

inline at::ScalarType compute_dtype(const at::Tensor& q) {
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "rlr_kernels cpp backend: unsupported dtype ", t, " (float16/bfloat16/float32/float64 only)");
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace rlr::cpu
