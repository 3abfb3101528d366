// Masked learnable-key attention on CUDA, forward and backward (DESIGN.md §3).
//
//   out[b,n,i] = sum_{j not in W(i)} softmax_j(q[b,n,i].k[n,j] * scale) v[b,n,j]
//
// Flash-style: one thread per query, a block of 64 queries walks all keys in tiles of 32 that it
// stages in shared memory (the tile of k[n] is the same for every sample: k is never repeated
// per sample). Window keys are skipped by index (no L x L mask), softmax is online, all in float.
//
// Backward: a query pass computes D = dO.O and dq; a key pass (one thread per key and sample)
// computes dv and this sample's dk, and a last kernel sums the per-sample dk over the batch in a
// fixed order (deterministic, no atomics).
#include "../window.h"
#include "common.cuh"

namespace rlr::cuda {
namespace {

constexpr int kQueries = 64;  // queries per block (one thread each)
constexpr int kKeys = 32;     // keys per shared-memory tile / keys per block in the dk/dv pass

struct MaskedShape {
  int B, H, h, w, d, half, L;
};

// Grid cell of token j, stepped along a tile without a division per key.
struct Cell {
  int row, col;
  __device__ Cell(int j, int w) : row(j / w), col(j - (j / w) * w) {}
  __device__ void next(int w) {
    if (++col == w) col = 0, ++row;
  }
};

template <typename T>
__global__ void masked_forward_kernel(MaskedShape s, float scale, const T* __restrict__ q, const T* __restrict__ k,
                                      const T* __restrict__ v, T* __restrict__ out, float* __restrict__ lse) {
  extern __shared__ float smem[];
  const int d = s.d, stride = d + 1;
  float* q_row = smem + threadIdx.x * stride;
  float* o_row = smem + (kQueries + threadIdx.x) * stride;
  float* keys = smem + 2 * kQueries * stride;
  float* vals = keys + kKeys * stride;
  const int n = blockIdx.y, b = blockIdx.z, i = blockIdx.x * kQueries + threadIdx.x;
  const bool valid = i < s.L;
  const int ri = i / s.w, ci = i % s.w;
  const long bn_off = (static_cast<long>(b) * s.H + n) * s.L * d;
  const T* k_n = k + static_cast<long>(n) * s.L * d;
  load_own_row(q_row, q + bn_off + static_cast<long>(i) * d, valid, d);
  fill(o_row, 0.f, d);
  float m = -INFINITY, l = 0.f;
  for (int j0 = 0; j0 < s.L; j0 += kKeys) {
    __syncthreads();
    load_rows(keys, k_n, j0, kKeys, 0, s.L, d);
    load_rows(vals, v + bn_off, j0, kKeys, 0, s.L, d);
    __syncthreads();
    if (!valid) continue;
    Cell cell(j0, s.w);
    for (int jj = 0; jj < kKeys && j0 + jj < s.L; ++jj, cell.next(s.w)) {
      if (window::contains(ri, ci, cell.row, cell.col, s.half)) continue;
      const float x = dot(q_row, keys + jj * stride, d) * scale;
      if (x > m) {  // new running max: rescale what has been summed so far
        const float correction = expf(m - x);
        l *= correction;
        for (int c = 0; c < d; ++c) o_row[c] *= correction;
        m = x;
      }
      const float p = expf(x - m);
      l += p;
      axpy(o_row, p, vals + jj * stride, d);
    }
  }
  if (!valid) return;
  lse[(static_cast<long>(b) * s.H + n) * s.L + i] = m + logf(l);
  store_own_row(out + bn_off + static_cast<long>(i) * d, o_row, 1.f / l, d);
}

// Query pass of the backward: D = dO.O, then dq = scale * sum_j P (dP - D) k_j.
template <typename T>
__global__ void masked_dq_kernel(MaskedShape s, float scale, const T* __restrict__ q, const T* __restrict__ k,
                                 const T* __restrict__ v, const T* __restrict__ out, const float* __restrict__ lse,
                                 const T* __restrict__ grad_out, T* __restrict__ dq, float* __restrict__ D) {
  extern __shared__ float smem[];
  const int d = s.d, stride = d + 1;
  float* q_row = smem + threadIdx.x * stride;
  float* g_row = smem + (kQueries + threadIdx.x) * stride;
  float* dq_row = smem + (2 * kQueries + threadIdx.x) * stride;
  float* keys = smem + 3 * kQueries * stride;
  float* vals = keys + kKeys * stride;
  const int n = blockIdx.y, b = blockIdx.z, i = blockIdx.x * kQueries + threadIdx.x;
  const bool valid = i < s.L;
  const int ri = i / s.w, ci = i % s.w;
  const long bn_off = (static_cast<long>(b) * s.H + n) * s.L * d;
  const long stat = (static_cast<long>(b) * s.H + n) * s.L + i;
  const T* k_n = k + static_cast<long>(n) * s.L * d;
  load_own_row(q_row, q + bn_off + static_cast<long>(i) * d, valid, d);
  load_own_row(g_row, grad_out + bn_off + static_cast<long>(i) * d, valid, d);
  fill(dq_row, 0.f, d);
  float Di = 0.f, row_lse = 0.f;
  if (valid) {
    const T* o = out + bn_off + static_cast<long>(i) * d;
    for (int c = 0; c < d; ++c) Di = fmaf(g_row[c], to_float(o[c]), Di);
    D[stat] = Di;
    row_lse = lse[stat];
  }
  for (int j0 = 0; j0 < s.L; j0 += kKeys) {
    __syncthreads();
    load_rows(keys, k_n, j0, kKeys, 0, s.L, d);
    load_rows(vals, v + bn_off, j0, kKeys, 0, s.L, d);
    __syncthreads();
    if (!valid) continue;
    Cell cell(j0, s.w);
    for (int jj = 0; jj < kKeys && j0 + jj < s.L; ++jj, cell.next(s.w)) {
      if (window::contains(ri, ci, cell.row, cell.col, s.half)) continue;
      const float* key = keys + jj * stride;
      const float p = expf(dot(q_row, key, d) * scale - row_lse);
      const float dp = dot(g_row, vals + jj * stride, d);
      axpy(dq_row, p * (dp - Di), key, d);
    }
  }
  if (valid) store_own_row(dq + bn_off + static_cast<long>(i) * d, dq_row, scale, d);
}

// Key pass of the backward for one sample: thread t owns key j of head n, walks all queries in
// tiles, writes dv[b,n,j] and this sample's dk (float, unscaled sum times scale).
template <typename T>
__global__ void masked_dkdv_kernel(MaskedShape s, float scale, const T* __restrict__ q, const T* __restrict__ k,
                                   const T* __restrict__ v, const float* __restrict__ lse,
                                   const T* __restrict__ grad_out, const float* __restrict__ D,
                                   float* __restrict__ dk_partial, T* __restrict__ dv) {
  extern __shared__ float smem[];
  const int d = s.d, stride = d + 1;
  float* k_row = smem + threadIdx.x * stride;
  float* v_row = smem + (kKeys + threadIdx.x) * stride;
  float* dk_row = smem + (2 * kKeys + threadIdx.x) * stride;
  float* dv_row = smem + (3 * kKeys + threadIdx.x) * stride;
  float* qs = smem + 4 * kKeys * stride;
  float* gs = qs + kKeys * stride;
  float* lse_s = gs + kKeys * stride;
  float* D_s = lse_s + kKeys;
  const int n = blockIdx.y, b = blockIdx.z, j = blockIdx.x * kKeys + threadIdx.x;
  const bool valid = j < s.L;
  const long bn_off = (static_cast<long>(b) * s.H + n) * s.L * d;
  const long stat_off = (static_cast<long>(b) * s.H + n) * s.L;
  load_own_row(k_row, k + (static_cast<long>(n) * s.L + j) * d, valid, d);
  load_own_row(v_row, v + bn_off + static_cast<long>(j) * d, valid, d);
  fill(dk_row, 0.f, d);
  fill(dv_row, 0.f, d);
  const int rj = j / s.w, cj = j % s.w;
  for (int i0 = 0; i0 < s.L; i0 += kKeys) {
    __syncthreads();
    load_rows(qs, q + bn_off, i0, kKeys, 0, s.L, d);
    load_rows(gs, grad_out + bn_off, i0, kKeys, 0, s.L, d);
    for (int x = threadIdx.x; x < kKeys; x += blockDim.x) {
      const bool ok = i0 + x < s.L;
      lse_s[x] = ok ? lse[stat_off + i0 + x] : 0.f;
      D_s[x] = ok ? D[stat_off + i0 + x] : 0.f;
    }
    __syncthreads();
    if (!valid) continue;
    Cell cell(i0, s.w);
    for (int ii = 0; ii < kKeys && i0 + ii < s.L; ++ii, cell.next(s.w)) {
      if (window::contains(rj, cj, cell.row, cell.col, s.half)) continue;  // symmetric: j in W(i) iff i in W(j)
      const float* qi = qs + ii * stride;
      const float* gi = gs + ii * stride;
      const float p = expf(dot(qi, k_row, d) * scale - lse_s[ii]);
      const float dp = dot(gi, v_row, d);
      axpy(dk_row, p * (dp - D_s[ii]), qi, d);
      axpy(dv_row, p, gi, d);
    }
  }
  if (!valid) return;
  float* dk_b = dk_partial + bn_off + static_cast<long>(j) * d;
  for (int c = 0; c < d; ++c) dk_b[c] = dk_row[c] * scale;
  store_own_row(dv + bn_off + static_cast<long>(j) * d, dv_row, 1.f, d);
}

// dk[e] = sum_b dk_partial[b, e] over e in (H, L, d), b in order.
template <typename T>
__global__ void sum_over_batch_kernel(long count, int B, const float* __restrict__ partial, T* __restrict__ dk) {
  const long e = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= count) return;
  float total = 0.f;
  for (int b = 0; b < B; ++b) total += partial[b * count + e];
  dk[e] = from_float<T>(total);
}

MaskedShape make_shape(const Dims& dims) {
  MaskedShape s;
  s.B = dims.B, s.H = dims.H, s.h = dims.h, s.w = dims.w, s.d = dims.d, s.half = window::reach(dims.window);
  s.L = dims.h * dims.w;
  return s;
}

}  // namespace

std::string masked_forward(DType dtype, const Dims& dims, const void* q, const void* k, const void* v, void* out,
                           float* lse, cudaStream_t stream) {
  const MaskedShape s = make_shape(dims);
  return dispatch_dtype(dtype, [&](auto* tag) -> std::string {
    using T = std::remove_pointer_t<decltype(tag)>;
    const size_t smem = sizeof(float) * (2 * kQueries + 2 * kKeys) * (s.d + 1);
    auto kernel = masked_forward_kernel<T>;
    std::string err = prepare_smem(kernel, smem, "masked_forward");
    if (!err.empty()) return err;
    kernel<<<dim3(ceil_div(s.L, kQueries), s.H, s.B), kQueries, smem, stream>>>(
        s, dims.scale, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
        static_cast<T*>(out), lse);
    return launch_status("masked_forward");
  });
}

std::string masked_backward(DType dtype, const Dims& dims, const void* q, const void* k, const void* v,
                            const void* out, const float* lse, const void* grad_out, void* dq, void* dk, void* dv,
                            float* D, float* dk_partial, cudaStream_t stream) {
  const MaskedShape s = make_shape(dims);
  return dispatch_dtype(dtype, [&](auto* tag) -> std::string {
    using T = std::remove_pointer_t<decltype(tag)>;
    const size_t smem_q = sizeof(float) * (3 * kQueries + 2 * kKeys) * (s.d + 1);
    auto dq_kernel = masked_dq_kernel<T>;
    std::string err = prepare_smem(dq_kernel, smem_q, "masked_backward (dq)");
    if (!err.empty()) return err;
    dq_kernel<<<dim3(ceil_div(s.L, kQueries), s.H, s.B), kQueries, smem_q, stream>>>(
        s, dims.scale, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
        static_cast<const T*>(out), lse, static_cast<const T*>(grad_out), static_cast<T*>(dq), D);
    err = launch_status("masked_backward (dq)");
    if (!err.empty()) return err;
    const size_t smem_k = sizeof(float) * (6 * kKeys * (s.d + 1) + 2 * kKeys);
    auto dkdv_kernel = masked_dkdv_kernel<T>;
    err = prepare_smem(dkdv_kernel, smem_k, "masked_backward (dk, dv)");
    if (!err.empty()) return err;
    dkdv_kernel<<<dim3(ceil_div(s.L, kKeys), s.H, s.B), kKeys, smem_k, stream>>>(
        s, dims.scale, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), lse,
        static_cast<const T*>(grad_out), D, dk_partial, static_cast<T*>(dv));
    err = launch_status("masked_backward (dk, dv)");
    if (!err.empty()) return err;
    const long count = static_cast<long>(s.H) * s.L * s.d;
    sum_over_batch_kernel<T><<<static_cast<unsigned>((count + 255) / 256), 256, 0, stream>>>(
        count, s.B, dk_partial, static_cast<T*>(dk));
    return launch_status("masked_backward (sum over batch)");
  });
}

}  // namespace rlr::cuda
