// rlr_kernels._C_cuda: the CUDA kernels of both ops (the "cuda" backend of rlr_kernels).
// This file owns everything torch: argument checks, allocation, the current stream. The kernels
// in *.cu see raw pointers only (launch.h), which keeps their compile time to seconds.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/python.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>

#include "launch.h"

namespace {

using rlr::cuda::DType;
using rlr::cuda::Dims;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_NOT_IMPLEMENTED(false, "rlr_kernels cuda backend: dtype ", t.scalar_type(),
                                  " is not supported (float32, float16, bfloat16); use backend='reference' for it");
  }
}

void check_input(const at::Tensor& t, const char* name, int64_t rank, const at::Tensor& q) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == q.device(), name, " is on ", t.device(), " but q is on ", q.device());
  TORCH_CHECK(t.dim() == rank, name, " must have rank ", rank, ", got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " has dtype ", t.scalar_type(), " but q has ",
              q.scalar_type());
  TORCH_CHECK(t.numel() > 0, name, " is empty");
}

int to_int(int64_t x, const char* what) {
  TORCH_CHECK(x >= 0 && x <= std::numeric_limits<int>::max(), what, " = ", x, " is out of range");
  return static_cast<int>(x);
}

// The kernels put the batch on gridDim.z and the heads (times R in the local dk/dv pass) on
// gridDim.y, whose CUDA limit is 65535: past it a launch would fail with "invalid configuration".
void check_grid(const Dims& dims) {
  constexpr int kMaxGridYZ = 65535;
  TORCH_CHECK(dims.B <= kMaxGridYZ, "rlr_kernels cuda backend: batch B=", dims.B, " exceeds the CUDA grid limit ",
              kMaxGridYZ, "; split the batch or use backend='triton'");
  TORCH_CHECK(static_cast<int64_t>(dims.R) * dims.H <= kMaxGridYZ, "rlr_kernels cuda backend: R*H=", dims.R, "*",
              dims.H, " exceeds the CUDA grid limit ", kMaxGridYZ, "; use backend='triton'");
}

Dims make_dims(const at::Tensor& q, int64_t copies, int64_t height, int64_t width, int64_t window) {
  TORCH_CHECK(height >= 1 && width >= 1 && height * width == q.size(2), "grid ", height, "x", width,
              " does not match L=", q.size(2));
  TORCH_CHECK(window >= 1 && window % 2 == 1, "window must be a positive odd int, got ", window);
  Dims dims;
  dims.B = to_int(q.size(0), "B"), dims.R = to_int(copies, "R"), dims.H = to_int(q.size(1), "H");
  dims.h = to_int(height, "height"), dims.w = to_int(width, "width"), dims.d = to_int(q.size(3), "d");
  dims.window = to_int(window, "window");
  dims.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dims.d)));
  check_grid(dims);
  return dims;
}

// lse comes from the forward: float32 by contract, on q's device, one value per query row (and copy).
void check_lse(const at::Tensor& lse, const at::Tensor& q, at::IntArrayRef sizes) {
  TORCH_CHECK(lse.defined(), "lse is undefined");
  TORCH_CHECK(lse.device() == q.device(), "lse is on ", lse.device(), " but q is on ", q.device());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32 (the forward's output), got ",
              lse.scalar_type());
  TORCH_CHECK(lse.is_contiguous(), "lse must be contiguous");
  TORCH_CHECK(lse.sizes() == sizes, "lse must have shape ", sizes, ", got ", lse.sizes());
}

void raise_on_error(const std::string& err) { TORCH_CHECK(err.empty(), "rlr_kernels cuda: ", err); }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_local(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_input(q, "q", 4, q);
  check_input(k, "k", 4, q);
  check_input(v, "v", 4, q);
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(1) == q.size(1) && k.size(2) == q.size(2) && k.size(3) == q.size(3),
              "k must have shape (R, H, L, d) matching q ", q.sizes(), ", got ", k.sizes());
}

void check_masked(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t height, int64_t width,
                  int64_t window) {
  check_input(q, "q", 4, q);
  check_input(k, "k", 3, q);
  check_input(v, "v", 4, q);
  TORCH_CHECK(k.size(0) == q.size(1) && k.size(1) == q.size(2) && k.size(2) == q.size(3),
              "k must have shape (H, L, d) matching q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == q.sizes(), "v must have the shape of q ", q.sizes(), ", got ", v.sizes());
  const int64_t half = window / 2;
  TORCH_CHECK(half < height / 2 || half < width / 2, "window ", window, " covers the whole ", height, "x", width,
              " grid for the centre query, which then has no key outside its window");
}

// out and grad_out of a backward call: q's device, dtype and shape.
void check_like_q(const at::Tensor& t, const char* name, const at::Tensor& q) {
  check_input(t, name, 4, q);
  TORCH_CHECK(t.sizes() == q.sizes(), name, " must have the shape of q ", q.sizes(), ", got ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor> local_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 int64_t height, int64_t width, int64_t window) {
  check_local(q, k, v);
  const Dims dims = make_dims(q, k.size(0), height, width, window);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty_like(q);
  auto lse = at::empty({q.size(0), k.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  raise_on_error(rlr::cuda::local_forward(dtype_of(q), dims, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                          out.data_ptr(), lse.data_ptr<float>(), current_stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_backward(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& out,
                                                              const at::Tensor& lse, const at::Tensor& grad_out,
                                                              int64_t height, int64_t width, int64_t window) {
  check_local(q, k, v);
  check_like_q(out, "out", q);  // unused by these kernels, but part of the contract: misuse is caught
  check_like_q(grad_out, "grad_out", q);
  const Dims dims = make_dims(q, k.size(0), height, width, window);
  check_lse(lse, q, {q.size(0), k.size(0), q.size(1), q.size(2)});
  const c10::cuda::CUDAGuard guard(q.device());
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  auto D = at::empty_like(lse);
  raise_on_error(rlr::cuda::local_backward(dtype_of(q), dims, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                           lse.data_ptr<float>(), grad_out.data_ptr(), dq.data_ptr(), dk.data_ptr(),
                                           dv.data_ptr(), D.data_ptr<float>(), current_stream()));
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> masked_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  int64_t height, int64_t width, int64_t window) {
  check_masked(q, k, v, height, width, window);
  const Dims dims = make_dims(q, 1, height, width, window);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty_like(q);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  raise_on_error(rlr::cuda::masked_forward(dtype_of(q), dims, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                           out.data_ptr(), lse.data_ptr<float>(), current_stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_backward(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const at::Tensor& out,
                                                               const at::Tensor& lse, const at::Tensor& grad_out,
                                                               int64_t height, int64_t width, int64_t window) {
  check_masked(q, k, v, height, width, window);
  check_like_q(out, "out", q);
  check_like_q(grad_out, "grad_out", q);
  const Dims dims = make_dims(q, 1, height, width, window);
  check_lse(lse, q, {q.size(0), q.size(1), q.size(2)});
  const c10::cuda::CUDAGuard guard(q.device());
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  auto D = at::empty_like(lse);
  auto dk_partial = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  raise_on_error(rlr::cuda::masked_backward(dtype_of(q), dims, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                            out.data_ptr(), lse.data_ptr<float>(), grad_out.data_ptr(), dq.data_ptr(),
                                            dk.data_ptr(), dv.data_ptr(), D.data_ptr<float>(),
                                            dk_partial.data_ptr<float>(), current_stream()));
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlr_kernels CUDA kernels: local reference attention and masked key attention";
  m.def("local_forward", &local_forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("height"),
        py::arg("width"), py::arg("window"));
  m.def("local_backward", &local_backward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("grad_out"), py::arg("height"), py::arg("width"), py::arg("window"));
  m.def("masked_forward", &masked_forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("height"),
        py::arg("width"), py::arg("window"));
  m.def("masked_backward", &masked_backward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("grad_out"), py::arg("height"), py::arg("width"), py::arg("window"));
}
