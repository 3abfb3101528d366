// Argument checks of the compiled kernels' entry points, shared by the CPU module (rlr_kernels._C,
// csrc/cpu) and the CUDA module (rlr_kernels._C_cuda, csrc/cuda/bindings.cpp). The Python API
// validates first (rlr_kernels/validate.py), so these only fire on direct misuse of a compiled
// module: a clear error naming the argument instead of an out-of-bounds read.
//
// `device` is the device type the module computes on (CPU or CUDA); every tensor must be on it,
// and on q's device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include "window.h"

namespace rlr::checks {

inline void check_input(const at::Tensor& t, const char* name, int64_t rank, const at::Tensor& q,
                        c10::DeviceType device) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(t.device().type() == device, name, " must be a ", c10::DeviceTypeName(device), " tensor, got ",
              t.device());
  TORCH_CHECK(t.device() == q.device(), name, " is on ", t.device(), " but q is on ", q.device());
  TORCH_CHECK(t.dim() == rank, name, " must have rank ", rank, ", got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " has dtype ", t.scalar_type(), " but q has ",
              q.scalar_type());
  TORCH_CHECK(t.numel() > 0, name, " is empty");
}

// out and grad_out of a backward call: q's device, dtype and shape.
inline void check_like_q(const at::Tensor& t, const char* name, const at::Tensor& q, c10::DeviceType device) {
  check_input(t, name, 4, q, device);
  TORCH_CHECK(t.sizes() == q.sizes(), name, " must have the shape of q ", q.sizes(), ", got ", t.sizes());
}

// lse comes from the forward: float32 by contract, on q's device, one value per query row (and copy).
inline void check_lse(const at::Tensor& lse, const at::Tensor& q, at::IntArrayRef sizes) {
  TORCH_CHECK(lse.defined(), "lse is undefined");
  TORCH_CHECK(lse.device() == q.device(), "lse is on ", lse.device(), " but q is on ", q.device());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32 (the forward's output), got ",
              lse.scalar_type());
  TORCH_CHECK(lse.is_contiguous(), "lse must be contiguous");
  TORCH_CHECK(lse.sizes() == sizes, "lse must have shape ", sizes, ", got ", lse.sizes());
}

inline void check_grid(int64_t L, int64_t height, int64_t width, int64_t window) {
  TORCH_CHECK(height >= 1 && width >= 1 && height * width == L, "grid ", height, "x", width,
              " does not match L=", L);
  TORCH_CHECK(window::is_odd(window), "window must be a positive odd int, got ", window);
}

// Local op: q (B,H,L,d), k and v (R,H,L,d), and the grid.
inline void check_local(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t height,
                        int64_t width, int64_t window, c10::DeviceType device) {
  check_input(q, "q", 4, q, device);
  check_input(k, "k", 4, q, device);
  check_input(v, "v", 4, q, device);
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(1) == q.size(1) && k.size(2) == q.size(2) && k.size(3) == q.size(3), "k must have shape (R, ",
              q.size(1), ", ", q.size(2), ", ", q.size(3), ") matching q ", q.sizes(), ", got ", k.sizes());
  check_grid(q.size(2), height, width, window);
}

// Masked op: q (B,H,L,d), k (H,L,d), v (B,H,L,d), and a grid/window pair that leaves every query a key.
inline void check_masked(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t height,
                         int64_t width, int64_t window, c10::DeviceType device) {
  check_input(q, "q", 4, q, device);
  check_input(k, "k", 3, q, device);
  check_input(v, "v", 4, q, device);
  TORCH_CHECK(k.size(0) == q.size(1) && k.size(1) == q.size(2) && k.size(2) == q.size(3), "k must have shape (",
              q.size(1), ", ", q.size(2), ", ", q.size(3), ") matching q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == q.sizes(), "v must have the shape of q ", q.sizes(), ", got ", v.sizes());
  check_grid(q.size(2), height, width, window);
  TORCH_CHECK(window::leaves_keys_outside(height, width, window), "window ", window, " covers the whole ", height,
              "x", width, " grid for the centre query, which then has no key outside its window");
}

// The backward's extra inputs: out and grad_out like q, lse of the given shape.
inline void check_backward(const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse,
                           const at::Tensor& grad_out, at::IntArrayRef lse_sizes, c10::DeviceType device) {
  check_like_q(out, "out", q, device);
  check_like_q(grad_out, "grad_out", q, device);
  check_lse(lse, q, lse_sizes);
}

}  // namespace rlr::checks
