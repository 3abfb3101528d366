// rlr_kernels._C_cuda: the CUDA kernels of both ops (the "cuda" backend of rlr_kernels).
// This file owns everything torch: argument checks (csrc/checks.h, shared with the CPU module),
// allocation, the current stream. The kernels in *.cu see raw pointers only (launch.h), which keeps
// their compile time to seconds.
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

#include "../checks.h"
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

// After the checks of csrc/checks.h: the sizes as the kernels' ints.
Dims make_dims(const at::Tensor& q, int64_t copies, int64_t height, int64_t width, int64_t window) {
  Dims dims;
  dims.B = to_int(q.size(0), "B"), dims.R = to_int(copies, "R"), dims.H = to_int(q.size(1), "H");
  dims.h = to_int(height, "height"), dims.w = to_int(width, "width"), dims.d = to_int(q.size(3), "d");
  dims.window = to_int(window, "window");
  dims.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dims.d)));
  check_grid(dims);
  return dims;
}

void raise_on_error(const std::string& err) { TORCH_CHECK(err.empty(), "rlr_kernels cuda: ", err); }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::tuple<at::Tensor, at::Tensor> local_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 int64_t height, int64_t width, int64_t window) {
  rlr::checks::check_local(q, k, v, height, width, window, at::kCUDA);
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
  rlr::checks::check_local(q, k, v, height, width, window, at::kCUDA);
  // out is unused by these kernels, but part of the contract: misuse is caught.
  rlr::checks::check_backward(q, out, lse, grad_out, {q.size(0), k.size(0), q.size(1), q.size(2)}, at::kCUDA);
  const Dims dims = make_dims(q, k.size(0), height, width, window);
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
  rlr::checks::check_masked(q, k, v, height, width, window, at::kCUDA);
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
  rlr::checks::check_masked(q, k, v, height, width, window, at::kCUDA);
  rlr::checks::check_backward(q, out, lse, grad_out, {q.size(0), q.size(1), q.size(2)}, at::kCUDA);
  const Dims dims = make_dims(q, 1, height, width, window);
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
