// Local reference attention on CUDA, forward and backward (DESIGN.md §3).
//
//   out[b,n,i] = sum_c sum_{j in W(i)} softmax_j(q[b,n,i].k[c,n,j] * scale) v[c,n,j]
//
// One block per 32-column segment of one grid row: thread t owns grid column c0 + t. For each
// window row, the block stages the 32 + 2·half keys (and values) its queries can see in shared
// memory, so each key row is read from global memory once per block instead of once per query.
// Softmax is two-pass per reference copy (row max / sum, then the weighted values), all in float.
//
// Backward: a query pass computes D = sum_j P dP per copy (stored) and dq; a key pass, one thread
// per key, sums dk and dv over the batch and the key's window (the window relation is symmetric),
// so the reduction over the batch is race-free and deterministic.
#include "../window.h"
#include "common.cuh"

namespace rlr::cuda {
namespace {

constexpr int kTile = 32;  // grid columns per block (queries, or keys in the dk/dv pass)

struct LocalShape {
  int B, R, H, h, w, d, half, L, segments;  // segments: blocks per grid row
};

__host__ __device__ inline int span_of(const LocalShape& s) { return kTile + 2 * s.half; }

template <typename T>
__global__ void local_forward_kernel(LocalShape s, float scale, const T* __restrict__ q, const T* __restrict__ k,
                                     const T* __restrict__ v, T* __restrict__ out, float* __restrict__ lse) {
  extern __shared__ float smem[];
  const int d = s.d, stride = d + 1, span = span_of(s);
  float* q_row = smem + threadIdx.x * stride;
  float* o_row = smem + (kTile + threadIdx.x) * stride;
  float* keys = smem + 2 * kTile * stride;
  float* vals = keys + span * stride;
  const int r = blockIdx.x / s.segments, c0 = (blockIdx.x % s.segments) * kTile;
  const int n = blockIdx.y, b = blockIdx.z;
  const int col = c0 + threadIdx.x, i = r * s.w + col, first = c0 - s.half;
  const bool valid = col < s.w;
  const long q_off = (static_cast<long>(b) * s.H + n) * s.L * d;
  load_own_row(q_row, q + q_off + static_cast<long>(i) * d, valid, d);
  fill(o_row, 0.f, d);
  const int r_lo = window::first(r, s.half), r_hi = window::last(r, s.half, s.h);
  for (int c = 0; c < s.R; ++c) {
    const long kv_off = (static_cast<long>(c) * s.H + n) * s.L * d;
    float m = -INFINITY, l = 0.f;
    for (int rr = r_lo; rr <= r_hi; ++rr) {  // pass 1: max and sum of exp
      __syncthreads();
      load_rows(keys, k + kv_off + static_cast<long>(rr) * s.w * d, first, span, 0, s.w, d);
      __syncthreads();
      if (!valid) continue;
      for (int kc = window::first(col, s.half); kc <= window::last(col, s.half, s.w); ++kc) {
        const float x = dot(q_row, keys + (kc - first) * stride, d) * scale;
        if (x > m) {
          l = l * expf(m - x) + 1.f;
          m = x;
        } else {
          l += expf(x - m);
        }
      }
    }
    const float row_lse = m + logf(l);
    if (valid) lse[((static_cast<long>(b) * s.R + c) * s.H + n) * s.L + i] = row_lse;
    for (int rr = r_lo; rr <= r_hi; ++rr) {  // pass 2: probabilities times values
      __syncthreads();
      load_rows(keys, k + kv_off + static_cast<long>(rr) * s.w * d, first, span, 0, s.w, d);
      load_rows(vals, v + kv_off + static_cast<long>(rr) * s.w * d, first, span, 0, s.w, d);
      __syncthreads();
      if (!valid) continue;
      for (int kc = window::first(col, s.half); kc <= window::last(col, s.half, s.w); ++kc) {
        const float p = expf(dot(q_row, keys + (kc - first) * stride, d) * scale - row_lse);
        axpy(o_row, p, vals + (kc - first) * stride, d);
      }
    }
  }
  if (valid) store_own_row(out + q_off + static_cast<long>(i) * d, o_row, 1.f, d);
}

// Query pass of the backward: D[b,c,n,i] = sum_j P dP per copy, and dq.
template <typename T>
__global__ void local_dq_kernel(LocalShape s, float scale, const T* __restrict__ q, const T* __restrict__ k,
                                const T* __restrict__ v, const float* __restrict__ lse, const T* __restrict__ grad_out,
                                T* __restrict__ dq, float* __restrict__ D) {
  extern __shared__ float smem[];
  const int d = s.d, stride = d + 1, span = span_of(s);
  float* q_row = smem + threadIdx.x * stride;
  float* g_row = smem + (kTile + threadIdx.x) * stride;
  float* dq_row = smem + (2 * kTile + threadIdx.x) * stride;
  float* keys = smem + 3 * kTile * stride;
  float* vals = keys + span * stride;
  const int r = blockIdx.x / s.segments, c0 = (blockIdx.x % s.segments) * kTile;
  const int n = blockIdx.y, b = blockIdx.z;
  const int col = c0 + threadIdx.x, i = r * s.w + col, first = c0 - s.half;
  const bool valid = col < s.w;
  const long q_off = (static_cast<long>(b) * s.H + n) * s.L * d;
  load_own_row(q_row, q + q_off + static_cast<long>(i) * d, valid, d);
  load_own_row(g_row, grad_out + q_off + static_cast<long>(i) * d, valid, d);
  fill(dq_row, 0.f, d);
  const int r_lo = window::first(r, s.half), r_hi = window::last(r, s.half, s.h);
  for (int c = 0; c < s.R; ++c) {
    const long kv_off = (static_cast<long>(c) * s.H + n) * s.L * d;
    const long stat = ((static_cast<long>(b) * s.R + c) * s.H + n) * s.L + i;
    const float row_lse = valid ? lse[stat] : 0.f;
    float Dc = 0.f;
    for (int pass = 0; pass < 2; ++pass) {  // pass 0: D; pass 1: dq
      for (int rr = r_lo; rr <= r_hi; ++rr) {
        __syncthreads();
        load_rows(keys, k + kv_off + static_cast<long>(rr) * s.w * d, first, span, 0, s.w, d);
        load_rows(vals, v + kv_off + static_cast<long>(rr) * s.w * d, first, span, 0, s.w, d);
        __syncthreads();
        if (!valid) continue;
        for (int kc = window::first(col, s.half); kc <= window::last(col, s.half, s.w); ++kc) {
          const float* key = keys + (kc - first) * stride;
          const float p = expf(dot(q_row, key, d) * scale - row_lse);
          const float dp = dot(g_row, vals + (kc - first) * stride, d);
          if (pass == 0)
            Dc = fmaf(p, dp, Dc);
          else
            axpy(dq_row, p * (dp - Dc), key, d);
        }
      }
    }
    if (valid) D[stat] = Dc;
  }
  if (valid) store_own_row(dq + q_off + static_cast<long>(i) * d, dq_row, scale, d);
}

// Key pass of the backward: thread t owns key column c0 + t of grid row r for copy c, head n,
// and sums dk, dv over every sample and every query whose window holds the key.
template <typename T>
__global__ void local_dkdv_kernel(LocalShape s, float scale, const T* __restrict__ q, const T* __restrict__ k,
                                  const T* __restrict__ v, const float* __restrict__ lse,
                                  const T* __restrict__ grad_out, const float* __restrict__ D, T* __restrict__ dk,
                                  T* __restrict__ dv) {
  extern __shared__ float smem[];
  const int d = s.d, stride = d + 1, span = span_of(s);
  float* k_row = smem + threadIdx.x * stride;
  float* v_row = smem + (kTile + threadIdx.x) * stride;
  float* dk_row = smem + (2 * kTile + threadIdx.x) * stride;
  float* dv_row = smem + (3 * kTile + threadIdx.x) * stride;
  float* qs = smem + 4 * kTile * stride;
  float* gs = qs + span * stride;
  float* lse_s = gs + span * stride;
  float* D_s = lse_s + span;
  const int r = blockIdx.x / s.segments, c0 = (blockIdx.x % s.segments) * kTile;
  const int n = blockIdx.y % s.H, c = blockIdx.y / s.H;
  const int col = c0 + threadIdx.x, j = r * s.w + col, first = c0 - s.half;
  const bool valid = col < s.w;
  const long kv_off = (static_cast<long>(c) * s.H + n) * s.L * d;
  load_own_row(k_row, k + kv_off + static_cast<long>(j) * d, valid, d);
  load_own_row(v_row, v + kv_off + static_cast<long>(j) * d, valid, d);
  fill(dk_row, 0.f, d);
  fill(dv_row, 0.f, d);
  const int r_lo = window::first(r, s.half), r_hi = window::last(r, s.half, s.h);
  for (int b = 0; b < s.B; ++b) {
    const long q_off = (static_cast<long>(b) * s.H + n) * s.L * d;
    const long stat_off = ((static_cast<long>(b) * s.R + c) * s.H + n) * s.L;
    for (int rq = r_lo; rq <= r_hi; ++rq) {
      __syncthreads();
      load_rows(qs, q + q_off + static_cast<long>(rq) * s.w * d, first, span, 0, s.w, d);
      load_rows(gs, grad_out + q_off + static_cast<long>(rq) * s.w * d, first, span, 0, s.w, d);
      for (int x = threadIdx.x; x < span; x += blockDim.x) {
        const int qc = first + x;
        const bool ok = qc >= 0 && qc < s.w;
        lse_s[x] = ok ? lse[stat_off + rq * s.w + qc] : 0.f;
        D_s[x] = ok ? D[stat_off + rq * s.w + qc] : 0.f;
      }
      __syncthreads();
      if (!valid) continue;
      for (int qc = window::first(col, s.half); qc <= window::last(col, s.half, s.w); ++qc) {
        const int x = qc - first;
        const float* qi = qs + x * stride;
        const float* gi = gs + x * stride;
        const float p = expf(dot(qi, k_row, d) * scale - lse_s[x]);
        const float dp = dot(gi, v_row, d);
        axpy(dk_row, p * (dp - D_s[x]), qi, d);
        axpy(dv_row, p, gi, d);
      }
    }
  }
  if (valid) {
    store_own_row(dk + kv_off + static_cast<long>(j) * d, dk_row, scale, d);
    store_own_row(dv + kv_off + static_cast<long>(j) * d, dv_row, 1.f, d);
  }
}

LocalShape make_shape(const Dims& dims) {
  LocalShape s;
  s.B = dims.B, s.R = dims.R, s.H = dims.H, s.h = dims.h, s.w = dims.w, s.d = dims.d;
  s.half = window::reach(dims.window);
  s.L = dims.h * dims.w;
  s.segments = static_cast<int>(ceil_div(dims.w, kTile));
  return s;
}

}  // namespace

std::string local_forward(DType dtype, const Dims& dims, const void* q, const void* k, const void* v, void* out,
                          float* lse, cudaStream_t stream) {
  const LocalShape s = make_shape(dims);
  return dispatch_dtype(dtype, [&](auto* tag) -> std::string {
    using T = std::remove_pointer_t<decltype(tag)>;
    const size_t smem = sizeof(float) * (2 * kTile + 2 * span_of(s)) * (s.d + 1);
    auto kernel = local_forward_kernel<T>;
    std::string err = prepare_smem(kernel, smem, "local_forward");
    if (!err.empty()) return err;
    const dim3 grid(s.h * s.segments, s.H, s.B);
    kernel<<<grid, kTile, smem, stream>>>(s, dims.scale, static_cast<const T*>(q), static_cast<const T*>(k),
                                          static_cast<const T*>(v), static_cast<T*>(out), lse);
    return launch_status("local_forward");
  });
}

std::string local_backward(DType dtype, const Dims& dims, const void* q, const void* k, const void* v,
                           const float* lse, const void* grad_out, void* dq, void* dk, void* dv, float* D,
                           cudaStream_t stream) {
  const LocalShape s = make_shape(dims);
  return dispatch_dtype(dtype, [&](auto* tag) -> std::string {
    using T = std::remove_pointer_t<decltype(tag)>;
    const size_t smem_q = sizeof(float) * (3 * kTile + 2 * span_of(s)) * (s.d + 1);
    auto dq_kernel = local_dq_kernel<T>;
    std::string err = prepare_smem(dq_kernel, smem_q, "local_backward (dq)");
    if (!err.empty()) return err;
    dq_kernel<<<dim3(s.h * s.segments, s.H, s.B), kTile, smem_q, stream>>>(
        s, dims.scale, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), lse,
        static_cast<const T*>(grad_out), static_cast<T*>(dq), D);
    err = launch_status("local_backward (dq)");
    if (!err.empty()) return err;
    const size_t smem_k = sizeof(float) * ((4 * kTile + 2 * span_of(s)) * (s.d + 1) + 2 * span_of(s));
    auto dkdv_kernel = local_dkdv_kernel<T>;
    err = prepare_smem(dkdv_kernel, smem_k, "local_backward (dk, dv)");
    if (!err.empty()) return err;
    dkdv_kernel<<<dim3(s.h * s.segments, s.R * s.H), kTile, smem_k, stream>>>(
        s, dims.scale, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), lse,
        static_cast<const T*>(grad_out), D, static_cast<T*>(dk), static_cast<T*>(dv));
    return launch_status("local_backward (dk, dv)");
  });
}

}  // namespace rlr::cuda
