// CUDA on the CPU, for checking the LOGIC of csrc/cuda/*.cu without a GPU (tests/test_cuda_emulation.py).
// Says nothing about speed, and is no substitute for running the kernels on a GPU.
//
// This header stands in for what the kernels and their host launchers use from CUDA: the keywords,
// the built-in indices, __syncthreads(), dim3, streams, the runtime calls of common.cuh, and the
// __half / __nv_bfloat16 storage types with round-to-nearest-even conversions (the include/ folder
// maps <cuda_runtime.h>, <cuda_fp16.h>, ... here). The two CUDA-only syntaxes g++ cannot parse are
// rewritten mechanically by tests/_cuda_emulation.py before compiling (nothing else in the file
// changes, and #line keeps the original file and line numbers):
//   kernel<<<grid, block, smem, stream>>>(args)
//     ->  ::emu::launch("<file:line> (kernel)", grid, block, smem, stream)(kernel, args)
//   extern __shared__ T name[];                   ->  T* const name = ::emu::dynamic_shared<T>();
//
// Execution model (runtime.cpp): the blocks of a launch run one after the other; every thread of a
// block runs on its own fiber (ucontext), __syncthreads() is a real barrier, shared memory is
// poisoned with a NaN pattern at block start, and every shared-memory access is checked against
// shadow memory (races inside a barrier epoch, reads of never-written words, accesses beyond the
// dynamic size the launch gave). Launch limits are those of an H100/H200.
#pragma once

#include <math.h>
#include <stdlib.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ------------------------------------------------------------------------------------------------
// Runtime API (the subset common.cuh calls).

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
using cudaStream_t = struct CUstream_st*;

cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t err);

namespace emu {

// H100/H200 limits.
constexpr size_t kDefaultDynamicShared = 48 * 1024;
constexpr size_t kOptinDynamicShared = 227 * 1024;
constexpr unsigned kMaxThreadsPerBlock = 1024;

extern uint3 thread_idx, block_idx;
extern dim3 block_dim, grid_dim;

void syncthreads(const char* file, int line);
void* dynamic_shared_base();
cudaError_t set_max_dynamic_shared(const void* kernel, int attr, int value);

struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
  const char* where;  // "file:line (kernel expression)" of the launch
};

// Runs body() for every thread of every block of the grid; a bad configuration sets the error
// that cudaGetLastError() returns, as a real launch would, and runs nothing.
void run_grid(const void* kernel, const LaunchConfig& config, void (*body)(void*), void* context);

// `kernel<<<grid, block, bytes, stream>>>(args...)` becomes `launch(where, grid, block, bytes, stream)(kernel,
// args...)`: the arguments are converted to the kernel's parameter types once, at launch, as CUDA does.
struct Launch {
  LaunchConfig config;
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), Args&&... args) const {
    struct Call {
      void (*kernel)(Params...);
      std::tuple<Params...> params;
    } call{kernel, std::tuple<Params...>(static_cast<Params>(std::forward<Args>(args))...)};
    run_grid(reinterpret_cast<const void*>(kernel), config,
             [](void* c) {
               Call* call = static_cast<Call*>(c);
               std::apply(call->kernel, call->params);
             },
             &call);
  }
};

inline Launch launch(const char* where, dim3 grid, dim3 block, size_t shared_bytes = 0, cudaStream_t = nullptr) {
  return Launch{{grid, block, shared_bytes, where}};
}

template <typename T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_base());
}

}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  return ::emu::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), attr, value);
}

// The device max/min the kernels call unqualified on ints (expf, logf, fmaf, abs come from the C headers).
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }

// ------------------------------------------------------------------------------------------------
// Half-precision storage types: bit patterns and round-to-nearest-even conversions, no arithmetic
// (the CUDA build defines __CUDA_NO_HALF_OPERATORS__ and friends, so the kernels use none).

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

namespace emu {

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

inline uint16_t float_to_half_bits(float x) {
  const uint32_t u = float_bits(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u | static_cast<uint16_t>((a >> 13) & 0x3ffu);  // NaN stays NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: infinity
  if (a < 0x38800000u) {                        // below the smallest normal half (2^-14): subnormal or zero
    if (a < 0x33000000u) return sign;           // <= 2^-25: rounds to zero (ties to even)
    const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    // value = mant * 2^(e - 150) and the half subnormal unit is 2^-24: q = mant >> (126 - e), rounded.
    const int shift = 126 - static_cast<int>(a >> 23);
    const uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
    return sign | static_cast<uint16_t>(q + (rem > halfway || (rem == halfway && (q & 1u))));
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even;
  // a carry out of the mantissa correctly bumps the exponent.
  const uint32_t r = a - 0x38000000u;
  const uint32_t q = r >> 13, rem = r & 0x1fffu;
  return sign | static_cast<uint16_t>(q + (rem > 0x1000u || (rem == 0x1000u && (q & 1u))));
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) return (sign ? -1.f : 1.f) * ldexpf(static_cast<float>(mant), -24);
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline uint16_t float_to_bfloat16_bits(float x) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float bfloat16_bits_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

}  // namespace emu

inline float __half2float(__half x) { return ::emu::half_bits_to_float(x.bits); }
inline __half __float2half_rn(float x) { return __half{::emu::float_to_half_bits(x)}; }
inline float __bfloat162float(__nv_bfloat16 x) { return ::emu::bfloat16_bits_to_float(x.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16{::emu::float_to_bfloat16_bits(x)}; }
