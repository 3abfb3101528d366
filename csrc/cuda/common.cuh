// Device helpers shared by the CUDA kernels: dtype conversion, shared-memory row tiles, launch
// plumbing. Everything accumulates in float32. Shared-memory rows are padded to d + 1 floats so
// that threads reading "their" row at the same channel hit different banks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "launch.h"

namespace rlr::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Rows first .. first+count-1 of a (rows, d) matrix `src` into shared memory (stride d + 1), as
// float. Rows outside [lo, hi) are zero. The whole block cooperates; consecutive threads read
// consecutive elements (coalesced).
template <typename T>
__device__ __forceinline__ void load_rows(float* dst, const T* src, int first, int count, int lo, int hi, int d) {
  for (int idx = threadIdx.x; idx < count * d; idx += blockDim.x) {
    const int r = idx / d, c = idx - r * d, row = first + r;
    dst[r * (d + 1) + c] = (row >= lo && row < hi) ? to_float(src[static_cast<long>(row) * d + c]) : 0.f;
  }
}

// One thread's own row (d values) of a (rows, d) matrix into its shared-memory row.
template <typename T>
__device__ __forceinline__ void load_own_row(float* dst, const T* src, bool valid, int d) {
  for (int c = 0; c < d; ++c) dst[c] = valid ? to_float(src[c]) : 0.f;
}

template <typename T>
__device__ __forceinline__ void store_own_row(T* dst, const float* src, float scale, int d) {
  for (int c = 0; c < d; ++c) dst[c] = from_float<T>(src[c] * scale);
}

__device__ __forceinline__ float dot(const float* a, const float* b, int d) {
  float s = 0.f;
  for (int c = 0; c < d; ++c) s = fmaf(a[c], b[c], s);
  return s;
}

__device__ __forceinline__ void axpy(float* y, float alpha, const float* x, int d) {
  for (int c = 0; c < d; ++c) y[c] = fmaf(alpha, x[c], y[c]);
}

__device__ __forceinline__ void fill(float* y, float value, int d) {
  for (int c = 0; c < d; ++c) y[c] = value;
}

// Raises the kernel's dynamic shared-memory limit when it needs more than the default 48 KB.
template <typename Kernel>
std::string prepare_smem(Kernel kernel, size_t bytes, const char* name) {
  if (bytes <= 48 * 1024) return {};
  int device = 0, limit = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return std::string(name) + ": " + cudaGetErrorString(err);
  if (bytes > static_cast<size_t>(limit))
    return std::string(name) + ": needs " + std::to_string(bytes) + " bytes of shared memory per block, the device "
           "allows " + std::to_string(limit) + " (head dim too large for the cuda backend)";
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  return err == cudaSuccess ? std::string() : std::string(name) + ": " + cudaGetErrorString(err);
}

inline std::string launch_status(const char* name) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(name) + ": " + cudaGetErrorString(err);
}

inline unsigned ceil_div(int a, int b) { return static_cast<unsigned>((a + b - 1) / b); }

// Calls f(static_cast<T*>(nullptr)) with T the element type of `dtype`.
template <typename F>
std::string dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(static_cast<float*>(nullptr));
    case DType::kFloat16: return f(static_cast<__half*>(nullptr));
    case DType::kBFloat16: return f(static_cast<__nv_bfloat16*>(nullptr));
  }
  return "unknown dtype";
}

}  // namespace rlr::cuda
