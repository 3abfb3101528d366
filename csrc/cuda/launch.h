// Host-side launchers of the CUDA kernels: raw device pointers and sizes only, so that the .cu
// files include nothing but the CUDA headers and compile in seconds (torch headers stay in
// bindings.cpp). Every launcher enqueues on `stream` and returns an error message, empty on success.
//
// Layouts (all contiguous, row-major; T = float, __half or __nv_bfloat16 as given by `dtype`):
//   local:  q (B,H,L,d)  k,v (R,H,L,d)  out (B,H,L,d)  lse, D (B,R,H,L) float
//   masked: q (B,H,L,d)  k (H,L,d)  v (B,H,L,d)  out (B,H,L,d)  lse, D (B,H,L) float
// `scale` is 1/sqrt(d). Gradients of the shared k (and v) are summed over the batch.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

namespace rlr::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

struct Dims {
  int B, R, H, h, w, d, window;  // R = 1 for the masked op
  float scale;
};

std::string local_forward(DType dtype, const Dims& dims, const void* q, const void* k, const void* v, void* out,
                          float* lse, cudaStream_t stream);

// D (B,R,H,L) is scratch written by the dq pass and read by the dk/dv pass.
std::string local_backward(DType dtype, const Dims& dims, const void* q, const void* k, const void* v,
                           const float* lse, const void* grad_out, void* dq, void* dk, void* dv, float* D,
                           cudaStream_t stream);

std::string masked_forward(DType dtype, const Dims& dims, const void* q, const void* k, const void* v, void* out,
                           float* lse, cudaStream_t stream);

// D (B,H,L) and dk_partial (B,H,L,d) float are scratch: per-sample dk, summed over b in a fixed order.
std::string masked_backward(DType dtype, const Dims& dims, const void* q, const void* k, const void* v,
                            const void* out, const float* lse, const void* grad_out, void* dq, void* dk, void* dv,
                            float* D, float* dk_partial, cudaStream_t stream);

}  // namespace rlr::cuda
