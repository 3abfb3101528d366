// Masked learnable-key attention on CPU, forward and backward (DESIGN.md §3).
//
//   out[b,n,i] = sum_{j not in W(i)} softmax_j(q[b,n,i].k[n,j] * scale) v[b,n,j]
//
// Flash-style blocking over query rows: a block of M query rows gets its full row of scores
// against all L keys (an M x L buffer that stays in cache), the k x k window of each row is
// masked out by index (no L x L mask exists anywhere), and the block's probabilities multiply
// v. The keys of head n are shared by the batch: they are laid out once (transposed for the
// score product) and every sample's blocks of that head read the same copy.
//
// The products are small register-blocked kernels (8 rows x 32 columns of accumulators,
// 16-lane vectors) rather than BLAS calls, so that every output element is summed in one fixed
// order: results are bitwise independent of the number of threads. Lanes never run along a small
// head dim when they can run along the L keys instead: the scores and dP have the keys as columns;
// dk and dv are accumulated transposed (dk^T += q^T dS), keys as columns again; P v and
// dS k, whose columns are the head dim, use 8 x 16 blocks for d <= 16 and, for d <= 8, the
// dot-product form (lanes along the keys, one horizontal sum per result).
//
// Backward recomputes each block's scores and re-derives the exact softmax statistics from the
// full row (the float32 lse is not needed, so float64 stays exact), then
//   dP = dO v^T,  D_i = sum_j P_ij dP_ij,  dS = P (dP - D),
//   dq = scale dS k,  dk += scale dS^T q,  dv += P^T dO.
// The scale is applied to the scores in the softmax and to dq / dk at the end, so q, v and grad_out
// are read in place whenever their shapes need no padding (the paper shapes): no copies.
// One task per (b, head) owns dv[b, n] and a partial dk of sample b; the partials are summed
// over the batch in a fixed order.
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu_backward.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdlib>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace rlr::cpu {
namespace {

constexpr int64_t kRowBlock = 64;  // query rows per block: 2 x 64 x L scores stay in L2
// Register blocks: kBlockRows rows x NV 16-lane vectors of columns, 8 x 32 (16 accumulators:
// enough independent FMAs to hide their latency on two FMA ports) or 8 x 16 for head dims <= 16,
// so small heads are not padded to 32. Query rows are padded to whole register blocks.
constexpr int kBlockRows = 8;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[i, j] = sum_t A[i, t] * BT[t, j]      for i < M (M % MR == 0), j < N (N % 32 == 0).
template <int MR, typename T>
RLR_INLINE void gemm_a_bt(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* BT, int64_t ldb, T* C,
                          int64_t ldc) {
  constexpr int64_t kChunk = 256;  // columns of BT kept hot in L1 while all row groups pass
  for (int64_t j0 = 0; j0 < N; j0 += kChunk) {
    const int64_t j1 = std::min(N, j0 + kChunk);
    for (int64_t i = 0; i < M; i += MR) {
      const T* a = A + i * lda;
      for (int64_t j = j0; j < j1; j += 2 * kLanes) {
        Vec<T> c0[MR], c1[MR];
        for (int r = 0; r < MR; ++r) c0[r] = Vec<T>{}, c1[r] = Vec<T>{};
        const T* bp = BT + j;
        for (int64_t t = 0; t < K; ++t, bp += ldb) {
          const Vec<T> b0 = load(bp), b1 = load(bp + kLanes);
          for (int r = 0; r < MR; ++r) {
            const T x = a[r * lda + t];
            c0[r] += x * b0, c1[r] += x * b1;
          }
        }
        for (int r = 0; r < MR; ++r) store(C + (i + r) * ldc + j, c0[r]), store(C + (i + r) * ldc + j + kLanes, c1[r]);
      }
    }
  }
}

// C[r, t] (+)= sum_x A[r*sar + x*sax] * B[x, t]   for r < M (M % MR == 0), t < N (N % (16 NV) == 0).
// A is read through two strides so that the same kernel computes P v (A = P), dS k (A = dS) and
// dk^T = q^T dS (A = q transposed) without copying.
template <int NV, bool kAccumulate, typename T>
RLR_INLINE void gemm_a_b(int64_t M, int64_t N, int64_t X, const T* A, int64_t sar, int64_t sax, const T* B,
                         int64_t ldb, T* C, int64_t ldc) {
  constexpr int MR = kBlockRows;
  for (int64_t r0 = 0; r0 < M; r0 += MR) {
    const T* a = A + r0 * sar;
    for (int64_t t = 0; t < N; t += NV * kLanes) {
      Vec<T> c[MR][NV];
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) c[r][v] = Vec<T>{};
      const T* bp = B + t;
      for (int64_t x = 0; x < X; ++x, bp += ldb) {
        Vec<T> b[NV];
        for (int v = 0; v < NV; ++v) b[v] = load(bp + v * kLanes);
        const T* ax = a + x * sax;
        for (int r = 0; r < MR; ++r) {
          const T w = ax[r * sar];
          for (int v = 0; v < NV; ++v) c[r][v] += w * b[v];
        }
      }
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) {
          T* p = C + (r0 + r) * ldc + t + v * kLanes;
          store(p, kAccumulate ? load(p) + c[r][v] : c[r][v]);
        }
    }
  }
}

// C[i, t] = sum_j A[i, j] * BT[t, j]      for i < M (M % 4 == 0), t < N (N % 4 == 0), j < J (J % 16 == 0).
// The dot-product form: lanes run along the long reduction (the keys) and every result is one
// horizontal sum. For head dims of 8 or less, where lanes along d would be mostly padding.
template <typename T>
RLR_INLINE void gemm_dots(int64_t M, int64_t N, int64_t J, const T* A, int64_t lda, const T* BT, int64_t ldb, T* C,
                          int64_t ldc) {
  constexpr int MR = 4, NR = 4;
  for (int64_t i = 0; i < M; i += MR) {
    for (int64_t t = 0; t < N; t += NR) {
      Vec<T> acc[MR][NR];
      for (int r = 0; r < MR; ++r)
        for (int c = 0; c < NR; ++c) acc[r][c] = Vec<T>{};
      for (int64_t j = 0; j < J; j += kLanes) {
        Vec<T> av[MR], bv[NR];
        for (int r = 0; r < MR; ++r) av[r] = load(A + (i + r) * lda + j);
        for (int c = 0; c < NR; ++c) bv[c] = load(BT + (t + c) * ldb + j);
        for (int r = 0; r < MR; ++r)
          for (int c = 0; c < NR; ++c) acc[r][c] += av[r] * bv[c];
      }
      for (int r = 0; r < MR; ++r)
        for (int c = 0; c < NR; ++c) C[(i + r) * ldc + t + c] = hsum(acc[r][c]);
    }
  }
}

template <typename T>
struct MaskedArgs;

// C (M, dp) = A (M, L) times the (L, d) keys or values number `index`, given row-major (rows:
// (.., Lp, dp)) when d > 8 and transposed (cols: (.., dr, Lp)) when d <= 8. Lanes along d when
// d > 8 (16 columns per block when dp == 16), along the keys otherwise.
template <typename T>
RLR_INLINE void gemm_heads(const MaskedArgs<T>& a, int64_t M, const T* A, const T* rows, const T* cols,
                           int64_t index, T* C) {
  if (a.d <= 8)
    gemm_dots(M, a.dr, a.Lp, A, a.Lp, cols + index * a.dr * a.Lp, a.Lp, C, a.dp);
  else if (a.dp == kLanes)
    gemm_a_b<1, false>(M, a.dp, a.L, A, a.Lp, 1, rows + index * a.Lp * a.dp, a.dp, C, a.dp);
  else
    gemm_a_b<2, false>(M, a.dp, a.L, A, a.Lp, 1, rows + index * a.Lp * a.dp, a.dp, C, a.dp);
}

template <typename T>
struct MaskedArgs {
  const T* q;     // (B, H, Lq, dp)  q, zero padded
  const T* kT;    // (H, dr, Lp)     keys, transposed for the score product (and dq = dS k if d <= 8)
  const T* kp;    // (H, Lp, dp)     keys, row-major (backward: dq = dS k if d > 8)
  const T* vp;    // (B, H, Lp, dp)  values (forward, d > 8)
  const T* vT;    // (B, H, dr, Lp)  values, transposed (backward: dP = dO v^T; forward if d <= 8)
  const T* dop;   // (B, H, Lq, dp)  grad_out (backward)
  T* out;         // (B, H, L, d)    out (forward) / dq (backward)
  float* lse;     // (B, H, L)       forward
  T* dkT;         // (B, H, dr, Lp)  per-sample partial dk, transposed (backward)
  T* dk;          // (H, L, d)       dk, summed over the batch (backward)
  T* dv;          // (B, H, L, d)    dv (backward)
  int64_t B, H, L, d, h, w, half, Lq, Lp, dp, dr, blocks;
  T scale;
};

// Sets the keys of query i's window (truncated at the border) to `value` in a row of L keys. G: any
// geometry with the grid's h, w and the window's half (MaskedArgs, Geometry).
template <typename G, typename V>
RLR_INLINE void fill_window(const G& a, int64_t i, V* row, V value) {
  const int64_t r = i / a.w, c = i % a.w;
  const int64_t r_lo = window::first(r, a.half), r_hi = window::last(r, a.half, a.h);
  const int64_t c_lo = window::first(c, a.half), c_hi = window::last(c, a.half, a.w);
  for (int64_t rr = r_lo; rr <= r_hi; ++rr) std::fill(row + rr * a.w + c_lo, row + rr * a.w + c_hi + 1, value);
}

// fill_window for the keys [j0, j0 + n) of row i only, stored at row[0, n).
template <typename G, typename V>
RLR_INLINE void fill_window_range(const G& a, int64_t i, V* row, int64_t j0, int64_t n, V value) {
  const int64_t r = i / a.w, c = i % a.w;
  const int64_t r_lo = window::first(r, a.half), r_hi = window::last(r, a.half, a.h);
  const int64_t c_lo = window::first(c, a.half), c_hi = window::last(c, a.half, a.w);
  for (int64_t rr = r_lo; rr <= r_hi; ++rr) {
    const int64_t lo = std::max(rr * a.w + c_lo, j0), hi = std::min(rr * a.w + c_hi + 1, j0 + n);
    if (lo < hi) std::fill(row + lo - j0, row + hi - j0, value);
  }
}

// max of s[0, n), n % 16 == 0. Four independent maxima: one chain would wait on the latency of every max.
template <typename T>
RLR_INLINE T row_max(const T* s, int64_t n) {
  Vec<T> m[4] = {splat(neg_inf<T>()), splat(neg_inf<T>()), splat(neg_inf<T>()), splat(neg_inf<T>())};
  int64_t j = 0;
  for (; j + 4 * kLanes <= n; j += 4 * kLanes)
    for (int u = 0; u < 4; ++u) m[u] = vmax(m[u], load(s + j + u * kLanes));
  for (; j < n; j += kLanes) m[0] = vmax(m[0], load(s + j));
  return hmax(vmax(vmax(m[0], m[1]), vmax(m[2], m[3])));
}

// Masked softmax of the scaled rows [0, rows) of S (row ii = query i0 + ii), in place: S holds the
// raw products q.k on entry; window and padding keys get probability exactly 0. Writes each row's
// lse when `lse` is given. With `inv_sum`, the rows are left unnormalised (exp(scale (s - max)))
// and 1 / sum is stored instead: the forward scales its d output columns rather than the L
// probabilities.
template <typename T>
RLR_INLINE void masked_softmax_rows(const MaskedArgs<T>& a, int64_t i0, int64_t rows, T* S, float* lse,
                                    T* inv_sum = nullptr) {
  const int64_t Lp = a.Lp;
  for (int64_t ii = 0; ii < rows; ++ii) {
    T* s = S + ii * Lp;
    const int64_t i = i0 + ii;
    fill_window(a, i, s, neg_inf<T>());
    std::fill(s + a.L, s + Lp, neg_inf<T>());
    const T top = row_max(s, Lp);  // of the raw products: scale > 0
    const Vec<T> shift = splat(top), scale = splat(a.scale);
    Vec<T> l{};
    for (int64_t j = 0; j < Lp; j += kLanes) {
      const Vec<T> p = vexp((load(s + j) - shift) * scale);
      store(s + j, p);
      l += p;
    }
    // vexp clamps, so masked keys hold a tiny positive value: zero them exactly.
    fill_window(a, i, s, T(0));
    std::fill(s + a.L, s + Lp, T(0));
    const T sum = hsum(l);
    if (inv_sum) {
      inv_sum[ii] = T(1) / sum;
    } else {
      const Vec<T> inv = splat(T(1) / sum);
      for (int64_t j = 0; j < Lp; j += kLanes) store(s + j, load(s + j) * inv);
    }
    if (lse) lse[ii] = static_cast<float>(a.scale * top + std::log(sum));
  }
}

template <typename T>
RLR_INLINE void masked_forward_tasks(const MaskedArgs<T>& a, int64_t begin, int64_t end) {
  std::vector<T> S(kRowBlock * a.Lp), O(kRowBlock * a.dp);
  T inv_sum[kRowBlock];
  for (int64_t id = begin; id < end; ++id) {
    const int64_t blk = id % a.blocks, b = (id / a.blocks) % a.B, n = id / (a.blocks * a.B);
    const int64_t i0 = blk * kRowBlock;
    const int64_t rows = std::min(kRowBlock, a.L - i0), rows_padded = std::min(kRowBlock, a.Lq - i0);
    const int64_t bn = b * a.H + n;
    gemm_a_bt<kBlockRows>(rows_padded, a.Lp, a.d, a.q + (bn * a.Lq + i0) * a.dp, a.dp, a.kT + n * a.dr * a.Lp, a.Lp,
                 S.data(), a.Lp);
    masked_softmax_rows(a, i0, rows, S.data(), a.lse + bn * a.L + i0, inv_sum);
    std::fill(S.begin() + rows * a.Lp, S.begin() + rows_padded * a.Lp, T(0));
    gemm_heads(a, rows_padded, S.data(), a.vp, a.vT, bn, O.data());
    T* out = a.out + (bn * a.L + i0) * a.d;
    for (int64_t ii = 0; ii < rows; ++ii)
      for (int64_t c = 0; c < a.d; ++c) out[ii * a.d + c] = O[ii * a.dp + c] * inv_sum[ii];
  }
}

template <typename T>
RLR_INLINE void masked_backward_tasks(const MaskedArgs<T>& a, int64_t begin, int64_t end) {
  std::vector<T> S(kRowBlock * a.Lp), G(kRowBlock * a.Lp), dQ(kRowBlock * a.dp), dvT(a.dr * a.Lp);
  for (int64_t bn = begin; bn < end; ++bn) {
    const int64_t n = bn % a.H;
    const T* q = a.q + bn * a.Lq * a.dp;
    const T* dop = a.dop + bn * a.Lq * a.dp;
    T* dkT = a.dkT + bn * a.dr * a.Lp;
    std::fill_n(dkT, a.dr * a.Lp, T(0));
    std::fill(dvT.begin(), dvT.end(), T(0));
    for (int64_t i0 = 0; i0 < a.L; i0 += kRowBlock) {
      const int64_t rows = std::min(kRowBlock, a.L - i0), rows_padded = std::min(kRowBlock, a.Lq - i0);
      gemm_a_bt<kBlockRows>(rows_padded, a.Lp, a.d, q + i0 * a.dp, a.dp, a.kT + n * a.dr * a.Lp, a.Lp, S.data(), a.Lp);
      gemm_a_bt<kBlockRows>(rows_padded, a.Lp, a.d, dop + i0 * a.dp, a.dp, a.vT + bn * a.dr * a.Lp, a.Lp, G.data(), a.Lp);
      masked_softmax_rows<T>(a, i0, rows, S.data(), nullptr);
      for (int64_t ii = 0; ii < rows; ++ii) {
        const T* p = S.data() + ii * a.Lp;
        T* g = G.data() + ii * a.Lp;
        Vec<T> acc{};
        for (int64_t j = 0; j < a.Lp; j += kLanes) acc += load(p + j) * load(g + j);
        const T D = hsum(acc);
        for (int64_t j = 0; j < a.Lp; j += kLanes) store(g + j, load(p + j) * (load(g + j) - D));
      }
      std::fill(S.begin() + rows * a.Lp, S.begin() + rows_padded * a.Lp, T(0));
      std::fill(G.begin() + rows * a.Lp, G.begin() + rows_padded * a.Lp, T(0));
      gemm_heads(a, rows_padded, G.data(), a.kp, a.kT, n, dQ.data());
      T* dq = a.out + (bn * a.L + i0) * a.d;
      for (int64_t ii = 0; ii < rows; ++ii)
        for (int64_t c = 0; c < a.d; ++c) dq[ii * a.d + c] = a.scale * dQ[ii * a.dp + c];
      // Transposed, dk^T += q^T dS and dv^T += dO^T P: the columns are the L keys, so
      // small head dims waste no lanes.
      gemm_a_b<2, true>(a.dr, a.Lp, rows, q + i0 * a.dp, 1, a.dp, G.data(), a.Lp, dkT, a.Lp);
      gemm_a_b<2, true>(a.dr, a.Lp, rows, dop + i0 * a.dp, 1, a.dp, S.data(), a.Lp, dvT.data(), a.Lp);
    }
    to_tokens(dvT.data(), a.L, a.d, a.Lp, a.dv + bn * a.L * a.d);
  }
}

// dk of head n = scale * the sum over the batch of the partials, in sample order (thread-count
// independent), transposed to (L, d). One task per head.
template <typename T>
RLR_INLINE void masked_dk_tasks(const MaskedArgs<T>& a, int64_t begin, int64_t end) {
  std::vector<T> sum(a.dr * a.Lp);
  for (int64_t n = begin; n < end; ++n) {
    std::copy_n(a.dkT + n * a.dr * a.Lp, a.dr * a.Lp, sum.data());
    for (int64_t b = 1; b < a.B; ++b) {
      const T* part = a.dkT + (b * a.H + n) * a.dr * a.Lp;
      for (int64_t j = 0; j < a.dr * a.Lp; j += kLanes) store(sum.data() + j, load(sum.data() + j) + load(part + j));
    }
    const Vec<T> scale = splat(a.scale);
    for (int64_t j = 0; j < a.dr * a.Lp; j += kLanes) store(sum.data() + j, load(sum.data() + j) * scale);
    to_tokens(sum.data(), a.L, a.d, a.Lp, a.dk + n * a.L * a.d);
  }
}

RLR_CLONES void masked_forward_f32(const MaskedArgs<float>& a, int64_t b, int64_t e) { masked_forward_tasks(a, b, e); }
RLR_CLONES void masked_forward_f64(const MaskedArgs<double>& a, int64_t b, int64_t e) { masked_forward_tasks(a, b, e); }
RLR_CLONES void masked_backward_f32(const MaskedArgs<float>& a, int64_t b, int64_t e) { masked_backward_tasks(a, b, e); }
RLR_CLONES void masked_backward_f64(const MaskedArgs<double>& a, int64_t b, int64_t e) {
  masked_backward_tasks(a, b, e);
}
RLR_CLONES void masked_dk_f32(const MaskedArgs<float>& a, int64_t b, int64_t e) { masked_dk_tasks(a, b, e); }
RLR_CLONES void masked_dk_f64(const MaskedArgs<double>& a, int64_t b, int64_t e) { masked_dk_tasks(a, b, e); }

void run_forward(const MaskedArgs<float>& a, int64_t b, int64_t e) { masked_forward_f32(a, b, e); }
void run_forward(const MaskedArgs<double>& a, int64_t b, int64_t e) { masked_forward_f64(a, b, e); }
void run_backward(const MaskedArgs<float>& a, int64_t b, int64_t e) { masked_backward_f32(a, b, e); }
void run_backward(const MaskedArgs<double>& a, int64_t b, int64_t e) { masked_backward_f64(a, b, e); }
void run_dk(const MaskedArgs<float>& a, int64_t b, int64_t e) { masked_dk_f32(a, b, e); }
void run_dk(const MaskedArgs<double>& a, int64_t b, int64_t e) { masked_dk_f64(a, b, e); }


// ---------------------------------------------------------------- bfloat16 on CPUs with AMX
//
// For bfloat16 inputs on a CPU whose matrix unit multiplies bfloat16 (AMX, reached through ATen's
// oneDNN brgemm micro-kernels), the five products run as bf16 x bf16 -> fp32 tile products, and
// everything between them (masking, softmax, D, dS) stays float32, as in the float32 path above.
// P and dS are rounded to bfloat16 before they multiply v, k, q and dO, as every bf16 flash
// attention does. The backward takes P = exp(scale s - lse) and D = dO . O from the forward's lse
// and out instead of re-deriving them from full score rows. Each brgemm call is single-threaded
// inside our own tasks and every output is summed in a fixed order, so results still do not
// depend on the thread count.
// B operands are packed once into the VNNI layout the tile products read (pairs of K rows
// interleaved): the keys per head, the values per (sample, head), P and dS per block.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RLR_AMX_TARGET 1
#define RLR_AMX_ISA "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi,bmi2"
#define RLR_AMX_FN __attribute__((target(RLR_AMX_ISA)))
#define RLR_AMX_INLINE inline __attribute__((always_inline, target(RLR_AMX_ISA)))
#else
#define RLR_AMX_TARGET 0
#define RLR_AMX_FN RLR_CLONES
#define RLR_AMX_INLINE RLR_INLINE
#endif

namespace amx {

using bf16 = at::BFloat16;
namespace blas = at::native::cpublas;

// float -> bfloat16, round to nearest even (inputs are finite).
// With AVX512-BF16 (every CPU with AMX has it) one instruction per 16 values.
RLR_AMX_INLINE void store_bf16(bf16* y, Vec<float> x) {
#if RLR_AMX_TARGET
  __m512 v;
  std::memcpy(&v, &x, sizeof(v));
  const __m256bh h = _mm512_cvtneps_pbh(v);
  std::memcpy(y, &h, sizeof(h));
#else  // never run (masked_amx_available() is false without the target), only compiled
  for (int k = 0; k < kLanes; ++k) y[k] = bf16(x[k]);
#endif
}

// 2^t of every lane, t <= ~0 (a softmax's shifted scores in base 2; -inf gives 0 under FTZ). Half the
// instructions of vexp: it is the softmax's exp that bounds this path, not the tile products (at head dim
// 32 a score costs 128 flops on the tiles, ~0.1 cycle, and ~1.5 cycles of vector work around them).
// Round to the nearest integer n, f = t - n in [-0.5, 0.5], a degree-5 polynomial for 2^f (relative error
// 2.4e-7 in float32, about vexp's), then scalef multiplies by 2^n in one instruction.
RLR_AMX_INLINE Vec<float> exp2_amx(Vec<float> t) {
#if RLR_AMX_TARGET
  // (the maskz forms with a full mask: the plain ones pass GCC an "undefined" operand it warns about)
  constexpr __mmask16 all = 0xFFFF;
  t = vmax(t, splat(-127.f));
  __m512 x;
  std::memcpy(&x, &t, sizeof(x));
  const __m512 n = _mm512_maskz_roundscale_ps(all, x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.327638397924602e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675512090325356e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713092088699e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022120237350464e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469440460205e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
  const __m512 y = _mm512_maskz_scalef_ps(all, p, n);
  Vec<float> out;
  std::memcpy(&out, &y, sizeof(out));
  return out;
#else  // never run (masked_amx_available() is false without the target), only compiled
  return vexp(t * 0.693147180559945309f);
#endif
}

constexpr float kLog2e = 1.44269504088896341f;

// y[j] = bf16(x[j] * scale) for j < n (n % 16 == 0).
RLR_AMX_INLINE void scaled_to_bf16(const float* x, float scale, bf16* y, int64_t n) {
  for (int64_t j = 0; j < n; j += kLanes) store_bf16(y + j, load(x + j) * scale);
}

// brgemm reads a packed B operand in column panels of 16, 32, 48 or 64: a (K, N) matrix is stored
// as N / nb panels of (K, nb), each VNNI-packed, nb the widest of those that divides N.
inline int64_t panel_width(int64_t N) {
  for (int64_t nb : {64, 48, 32, 16})
    if (N % nb == 0) return nb;
  return 0;
}

// out = x (K, N; row stride ld_in) in packed panels.
inline void pack_panels(int64_t K, int64_t N, int64_t ld_in, const bf16* x, bf16* out) {
  const int64_t nb = panel_width(N);
  for (int64_t j = 0; j < N; j += nb)
    blas::pack(K, nb, ld_in, nb, at::kBFloat16, at::kBFloat16, x + j, out + j * K);
}

// C (M, N; row stride ldc) (+)= A (M, K; row stride lda) B, B in packed panels of width nb, panel p at
// B + p * panel_stride: a column range of a wider packed matrix (N < its width), or a range of its K rows
// (B offset by the first row times nb, panel_stride = nb times all its rows).
inline void gemm_panels(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B, int64_t nb,
                        int64_t panel_stride, float* C, int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < N; j += nb) blas::brgemm(M, nb, K, lda, nb, ldc, accumulate, A, B + j / nb * panel_stride, C + j);
}

// C (M, N; row stride ldc) (+)= A (M, K; row stride lda) B, B (K, N) in packed panels.
inline void gemm(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B, float* C, int64_t ldc,
                 bool accumulate) {
  const int64_t nb = panel_width(N);
  gemm_panels(M, N, K, A, lda, B, nb, nb * K, C, ldc, accumulate);
}

struct Args {
  const bf16* q;      // (B, H, L, d)
  const bf16* dop;    // (B, H, L, d)  grad_out (backward)
  const bf16* kT;     // (H, d, L)     keys transposed, VNNI-packed: B operand of S = q k^T
  const bf16* kv;     // (H, L, d)     keys, VNNI-packed: B operand of dq = dS k (backward)
  const bf16* vv;     // (B, H, L, d)  values, VNNI-packed: B operand of O = P v (forward)
  const bf16* v;      // (B, H, L, d)  values as given (backward packs v^T per task)
  const bf16* o;      // (B, H, L, d)  the forward's output (backward)
  bf16* out;          // (B, H, L, d)  out (forward) / dq (backward)
  float* lse;         // (B, H, L)     written by the forward, read by the backward
  float* dkT;         // (B, H, d, L)  per-sample partial dk^T (backward)
  bf16* dk;           // (H, L, d)
  bf16* dv;           // (B, H, L, d)
  MaskedArgs<float> m;  // geometry and scale for the softmax (Lp = row stride of the score blocks)
};

RLR_AMX_INLINE void transpose_bf16(const bf16* x, int64_t rows, int64_t cols, bf16* y) {  // y (cols, rows) = x^T
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) y[c * rows + r] = x[r * cols + c];
}

RLR_AMX_INLINE void forward_tasks(const Args& a, int64_t begin, int64_t end) {
  const auto& m = a.m;
  const int64_t L = m.L, d = m.d, Lp = m.Lp;
  std::vector<float> S(kRowBlock * Lp), O(kRowBlock * d);
  std::vector<bf16> P(kRowBlock * Lp);
  float inv_sum_row[kRowBlock];
  for (int64_t id = begin; id < end; ++id) {
    const int64_t blk = id % m.blocks, b = (id / m.blocks) % m.B, n = id / (m.blocks * m.B);
    const int64_t i0 = blk * kRowBlock, rows = std::min(kRowBlock, L - i0), bn = b * m.H + n;
    gemm(rows, L, d, a.q + (bn * L + i0) * d, d, a.kT + n * d * L, S.data(), Lp, false);
    float* lse = a.lse + bn * L + i0;
    bf16* out = a.out + (bn * L + i0) * d;
    for (int64_t ii = 0; ii < rows; ++ii) {
      // One pass for the maximum (window keys excluded), one that writes exp(scale (s - max)) as
      // bfloat16 and sums it; the window's probabilities are then set to exactly 0.
      float* s_row = S.data() + ii * Lp;
      bf16* p_row = P.data() + ii * Lp;
      const int64_t i = i0 + ii;
      fill_window(m, i, s_row, neg_inf<float>());
      const float top = row_max(s_row, L);
      const Vec<float> shift = splat(top), scale2 = splat(m.scale * kLog2e);
      Vec<float> sum{};
      for (int64_t j = 0; j < L; j += kLanes) {
        const Vec<float> e = exp2_amx((load(s_row + j) - shift) * scale2);
        sum += e;
        store_bf16(p_row + j, e);
      }
      // exp2_amx clamps: the window's -inf scores gave <= 6e-39 each, negligible in the sum, exact 0 in P
      fill_window(m, i, p_row, bf16(0.f));
      const float total = hsum(sum);
      inv_sum_row[ii] = 1.f / total;
      lse[ii] = m.scale * top + std::log(total);
    }
    gemm(rows, d, L, P.data(), Lp, a.vv + bn * L * d, O.data(), d, false);
    for (int64_t ii = 0; ii < rows; ++ii) scaled_to_bf16(O.data() + ii * d, inv_sum_row[ii], out + ii * d, d);
  }
  blas::brgemm_release();
}

// Keys per tile of the backward. It needs no full-row statistics (P = exp(scale s - lse) from the forward's lse),
// so it walks each block of query rows through the keys in tiles: S, dP, P and dS of a 64 x 512 tile (0.4 MB)
// stay in L2 at any L, where full rows (64 x L of each) spilled it from L = 2048 on (a 64 x 64 grid: 5 MB).
constexpr int64_t kKeyTile = 512;

RLR_AMX_INLINE void backward_tasks(const Args& a, int64_t begin, int64_t end) {
  const auto& m = a.m;
  const int64_t L = m.L, d = m.d;
  // Packed (d, L) operands are read in column panels of their own width: a tile is a whole number of them.
  const int64_t nb_keys = panel_width(L), nb_d = panel_width(d);
  const int64_t T = std::min(L, kKeyTile / nb_keys * nb_keys);
  std::vector<float> S(kRowBlock * T), G(kRowBlock * T), dQ(kRowBlock * d), dvT(d * L);
  // P and dS in bfloat16: row-major (dS: A operand of dq = dS k) and packed (B operands of dk^T, dv^T)
  std::vector<bf16> P(kRowBlock * T), Pv(kRowBlock * T), dS(kRowBlock * T), dSv(kRowBlock * T), vT(d * L),
      vTv(d * L), qT(d * kRowBlock), doT(d * kRowBlock);
  float D[kRowBlock];
  for (int64_t bn = begin; bn < end; ++bn) {
    const int64_t n = bn % m.H;
    const bf16* q = a.q + bn * L * d;
    const bf16* dop = a.dop + bn * L * d;
    const bf16* o = a.o + bn * L * d;
    const float* lse = a.lse + bn * L;
    float* dkT = a.dkT + bn * d * L;
    std::fill_n(dkT, d * L, 0.f);
    std::fill(dvT.begin(), dvT.end(), 0.f);
    transpose_bf16(a.v + bn * L * d, L, d, vT.data());
    pack_panels(d, L, L, vT.data(), vTv.data());
    for (int64_t i0 = 0; i0 < L; i0 += kRowBlock) {
      const int64_t rows = std::min(kRowBlock, L - i0);
      // D = dO . O, the flash-attention identity sum_j P dP = dO . O
      for (int64_t ii = 0; ii < rows; ++ii) {
        float sum = 0.f;
        for (int64_t c = 0; c < d; ++c)
          sum += static_cast<float>(dop[(i0 + ii) * d + c]) * static_cast<float>(o[(i0 + ii) * d + c]);
        D[ii] = sum;
      }
      transpose_bf16(q + i0 * d, rows, d, qT.data());
      transpose_bf16(dop + i0 * d, rows, d, doT.data());
      for (int64_t j0 = 0; j0 < L; j0 += T) {
        const int64_t cols = std::min(T, L - j0);
        gemm_panels(rows, cols, d, q + i0 * d, d, a.kT + n * d * L + j0 * d, nb_keys, nb_keys * d, S.data(), T, false);
        gemm_panels(rows, cols, d, dop + i0 * d, d, vTv.data() + j0 * d, nb_keys, nb_keys * d, G.data(), T, false);
        // P = exp(scale s - lse), dS = P (dP - D): one pass, written as bfloat16; the window's are exactly 0.
        for (int64_t ii = 0; ii < rows; ++ii) {
          const int64_t i = i0 + ii;
          const Vec<float> scale2 = splat(m.scale * kLog2e), shift2 = splat(lse[i] * kLog2e), Dv = splat(D[ii]);
          const float* s_row = S.data() + ii * T;
          const float* g_row = G.data() + ii * T;
          bf16* p_row = P.data() + ii * T;
          bf16* ds_row = dS.data() + ii * T;
          for (int64_t j = 0; j < cols; j += kLanes) {
            const Vec<float> p = exp2_amx(load(s_row + j) * scale2 - shift2);
            store_bf16(p_row + j, p);
            store_bf16(ds_row + j, p * (load(g_row + j) - Dv));
          }
          fill_window_range(m, i, p_row, j0, cols, bf16(0.f));
          fill_window_range(m, i, ds_row, j0, cols, bf16(0.f));
        }
        // dq (+)= dS k over this tile's keys: rows j0.. of the packed (L, d) keys.
        gemm_panels(rows, d, cols, dS.data(), T, a.kv + n * L * d + j0 * nb_d, nb_d, nb_d * L, dQ.data(), d, j0 > 0);
        // dk^T += q^T dS and dv^T += dO^T P: K = the block's rows, N = the tile's keys.
        pack_panels(rows, cols, T, dS.data(), dSv.data());
        pack_panels(rows, cols, T, P.data(), Pv.data());
        gemm(d, cols, rows, qT.data(), rows, dSv.data(), dkT + j0, L, true);
        gemm(d, cols, rows, doT.data(), rows, Pv.data(), dvT.data() + j0, L, true);
      }
      scaled_to_bf16(dQ.data(), m.scale, a.out + (bn * L + i0) * d, rows * d);
    }
    bf16* dv = a.dv + bn * L * d;
    for (int64_t c = 0; c < d; ++c)
      for (int64_t j = 0; j < L; ++j) dv[j * d + c] = bf16(dvT[c * L + j]);
  }
  blas::brgemm_release();
}

// dk of head n = scale * the sum over the batch of the partials, in sample order; one task per head.
RLR_AMX_INLINE void dk_tasks(const Args& a, int64_t begin, int64_t end) {
  const auto& m = a.m;
  const int64_t L = m.L, d = m.d;
  std::vector<float> sum(d * L);
  for (int64_t n = begin; n < end; ++n) {
    std::copy_n(a.dkT + n * d * L, d * L, sum.data());
    for (int64_t b = 1; b < m.B; ++b) {
      const float* part = a.dkT + (b * m.H + n) * d * L;
      for (int64_t j = 0; j < d * L; ++j) sum[j] += part[j];
    }
    bf16* dk = a.dk + n * L * d;
    for (int64_t c = 0; c < d; ++c)
      for (int64_t j = 0; j < L; ++j) dk[j * d + c] = bf16(m.scale * sum[c * L + j]);
  }
}

// These run only on CPUs with AMX, so they are compiled for the ISA every such CPU has (AVX-512
// with BF16 conversions) instead of the portable clones.
RLR_AMX_FN void run_forward(const Args& a, int64_t b, int64_t e) { forward_tasks(a, b, e); }
RLR_AMX_FN void run_backward(const Args& a, int64_t b, int64_t e) { backward_tasks(a, b, e); }
RLR_AMX_FN void run_dk(const Args& a, int64_t b, int64_t e) { dk_tasks(a, b, e); }

}  // namespace amx

struct Geometry {
  int64_t B, H, L, d, h, w, half, Lq, Lp, dp, dr, blocks;
};

Geometry check_and_measure(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t height,
                           int64_t width, int64_t window) {
  checks::check_masked(q, k, v, height, width, window, at::kCPU);
  Geometry g;
  g.B = q.size(0), g.H = q.size(1), g.L = q.size(2), g.d = q.size(3);
  g.h = height, g.w = width, g.half = window::reach(window);
  g.Lq = round_up(g.L, kBlockRows);
  g.Lp = round_up(g.L, 2 * kLanes);
  g.dp = round_up(g.d, g.d <= kLanes ? kLanes : 2 * kLanes);
  g.dr = round_up(g.d, kBlockRows);
  g.blocks = (g.L + kRowBlock - 1) / kRowBlock;
  return g;
}

// x (N, L, d) as a (N, rows, cols) buffer of dtype ct: x itself when it already is one, else a
// zero-padded copy. The kernels only read it.
at::Tensor padded(const at::Tensor& x, int64_t rows, int64_t cols, at::ScalarType ct) {
  if (x.size(-2) == rows && x.size(-1) == cols && x.scalar_type() == ct && x.is_contiguous()) return x;
  const int64_t N = x.numel() / (x.size(-2) * x.size(-1));
  auto y = at::zeros({N, rows, cols}, x.options().dtype(ct));
  y.narrow(1, 0, x.size(-2)).narrow(2, 0, x.size(-1)).copy_(x.reshape({N, x.size(-2), x.size(-1)}));
  return y;
}

template <typename T>
MaskedArgs<T> make_args(const Geometry& g) {
  MaskedArgs<T> a{};
  a.B = g.B, a.H = g.H, a.L = g.L, a.d = g.d, a.h = g.h, a.w = g.w, a.half = g.half;
  a.Lq = g.Lq, a.Lp = g.Lp, a.dp = g.dp, a.dr = g.dr, a.blocks = g.blocks;
  a.scale = T(1) / std::sqrt(T(g.d));
  return a;
}


// The AMX path takes bfloat16 inputs with L and d multiples of 16 (the packed panels) on a CPU
// whose brgemm packs bfloat16 (AMX). RLR_CPU_AMX=0 in the environment turns it off (the float32-compute
// path then runs, as on CPUs without AMX).
bool use_amx(const at::Tensor& q, const Geometry& g) {
  return q.scalar_type() == at::kBFloat16 && g.L % 16 == 0 && g.d % 16 == 0 && masked_amx_available();
}

// x (N, K, Nc) contiguous bfloat16 -> each (K, Nc) matrix in packed panels.
at::Tensor vnni_packed(const at::Tensor& x) {
  auto y = at::empty_like(x);
  const int64_t K = x.size(-2), N = x.size(-1), count = x.numel() / (K * N);
  const auto* in = x.data_ptr<at::BFloat16>();
  auto* out = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, count, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) amx::pack_panels(K, N, N, in + i * K * N, out + i * K * N);
  });
  return y;
}

amx::Args amx_args(const Geometry& g) {
  amx::Args a{};
  a.m = make_args<float>(g);
  return a;
}

std::tuple<at::Tensor, at::Tensor> masked_forward_amx(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const Geometry& g) {
  auto out = at::empty_like(q);
  auto lse = at::empty({g.B, g.H, g.L}, q.options().dtype(at::kFloat));
  auto kT = vnni_packed(k.transpose(1, 2).contiguous());
  auto vv = vnni_packed(v.view({g.B * g.H, g.L, g.d}));
  auto a = amx_args(g);
  a.q = q.data_ptr<at::BFloat16>(), a.kT = kT.data_ptr<at::BFloat16>(), a.vv = vv.data_ptr<at::BFloat16>();
  a.out = out.data_ptr<at::BFloat16>(), a.lse = lse.data_ptr<float>();
  parallel_for_flushed(0, g.H * g.B * g.blocks, 1, [&](int64_t b, int64_t e) { amx::run_forward(a, b, e); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_backward_amx(const at::Tensor& q, const at::Tensor& k,
                                                                   const at::Tensor& v, const at::Tensor& out,
                                                                   const at::Tensor& lse, const at::Tensor& grad_out,
                                                                   const Geometry& g) {
  auto dq = at::empty_like(q), dv = at::empty_like(v), dk = at::empty_like(k);
  auto kT = vnni_packed(k.transpose(1, 2).contiguous());
  auto kv = vnni_packed(k);
  auto a = amx_args(g);
  a.q = q.data_ptr<at::BFloat16>(), a.dop = grad_out.data_ptr<at::BFloat16>(), a.v = v.data_ptr<at::BFloat16>();
  a.o = out.data_ptr<at::BFloat16>(), a.lse = const_cast<float*>(lse.data_ptr<float>());
  a.kT = kT.data_ptr<at::BFloat16>(), a.kv = kv.data_ptr<at::BFloat16>();
  a.out = dq.data_ptr<at::BFloat16>(), a.dk = dk.data_ptr<at::BFloat16>(), a.dv = dv.data_ptr<at::BFloat16>();
  a.dkT = reusable_buffer<float, 2>(g.B * g.H * g.d * g.L);
  parallel_for_flushed(0, g.B * g.H, 1, [&](int64_t b, int64_t e) { amx::run_backward(a, b, e); });
  parallel_for_flushed(0, g.H, 1, [&](int64_t b, int64_t e) { amx::run_dk(a, b, e); });
  return {dq, dk, dv};
}

}  // namespace

bool masked_amx_available() {
  const char* env = std::getenv("RLR_CPU_AMX");
  if (env && std::string(env) == "0") return false;
#if RLR_AMX_TARGET
  // The path's own code is compiled for AVX512-BF16; brgemm must have AMX tiles behind it.
  static const bool cpu = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("amx-bf16") &&
                          at::native::cpublas::could_pack(at::kBFloat16);
  return cpu;
#else
  return false;
#endif
}

// ---------------------------------------------------------------- ATen's flash attention, on CPUs without AVX-512
//
// The kernels above are written against 16-lane vectors. Where a vector register holds fewer than
// 16 floats (AVX2: 8; NEON: 4) GCC keeps such vectors in memory and moves every operation through
// the stack: the masked op ran 4-5x slower than plain PyTorch on an AVX2-only AMD EPYC
// (docs/extension.md). There float32, float16 and bfloat16 (without AMX) take PyTorch's own CPU
// flash attention instead (what SDPA runs, vectorised per ISA at PyTorch's build), which returns the
// log-sum-exp of the contract and takes it back in its backward:
//   out, lse = flash(q, k expanded over the batch, v, mask), mask = -inf inside each row's window;
//   dq, dk_b, dv = flash_backward(...), dk = sum_b dk_b.
// The mask is one (L, L) float matrix shared by every sample and head. The flash kernels compute
// every output row, and every (sample, head)'s gradients, on one thread in a fixed order, and the
// batch sum of dk runs in sample order: results do not depend on the thread count. One exception
// is handled here: with a single (sample, head) ATen's parallel loop has a single task and the
// GEMMs inside it would spread over the threads (and round differently), so such a call runs inside
// a parallel region of its own, on one thread. Half types are computed in float32, float64 stays on
// the kernels (the exactness path). RLR_CPU_MASKED=kernel|flash in the environment forces a path.
namespace flash_path {

bool cpu_has_wide_vectors() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool wide = [] {
    __builtin_cpu_init();
    return bool(__builtin_cpu_supports("avx512f"));
  }();
  return wide;
#else
  return false;
#endif
}

bool wanted(at::ScalarType dtype) {
  if (dtype == at::kDouble) return false;
  if (const char* forced = std::getenv("RLR_CPU_MASKED")) {
    const std::string path(forced);
    TORCH_CHECK(path == "kernel" || path == "flash", "RLR_CPU_MASKED must be 'kernel' or 'flash', got '", path, "'");
    return path == "flash";
  }
  return !cpu_has_wide_vectors();
}

// (L, L) additive masks of dtype ct: -inf where key j lies in the window of query i, else 0. A level's layers,
// forward and backward, all ask for the same mask, and building it for each call made a forward call 21 % (L =
// 1024) to 28 % (L = 4096) slower (docs/extension.md): the masks are kept, in ONE cache for the whole process
// (threads share them; a thread pool holds no copy per thread), of at most kMaxMasks masks and kMaxMaskBytes
// bytes, the least recently used given up first. A mask over the byte bound alone is built for its call only.
// A mask given up while a call still uses it lives on until that call ends (tensors are reference counted).
constexpr size_t kMaxMasks = 4;                 // two levels, in two dtypes
constexpr int64_t kMaxMaskBytes = 128LL << 20;  // two float32 masks of a 64 x 64 grid

class MaskCache {
 public:
  at::Tensor get(const Geometry& g, at::ScalarType ct) {
    const Key key{g.h, g.w, g.half, ct};
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (auto found = find(key); found.defined()) return found;
    }
    at::Tensor mask = build(g, ct);  // outside the lock: other geometries need not wait for it
    const int64_t bytes = mask.numel() * mask.element_size();
    if (bytes > kMaxMaskBytes) return mask;
    const std::lock_guard<std::mutex> lock(mutex_);
    if (auto found = find(key); found.defined()) return found;  // another thread built it meanwhile
    entries_.insert(entries_.begin(), {key, mask});
    bytes_ += bytes;
    while (entries_.size() > kMaxMasks || bytes_ > kMaxMaskBytes) {
      bytes_ -= entries_.back().second.numel() * entries_.back().second.element_size();
      entries_.pop_back();
    }
    return mask;
  }

  std::tuple<int64_t, int64_t> info() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(entries_.size()), bytes_};
  }

  void clear() {
    const std::lock_guard<std::mutex> lock(mutex_);
    entries_.clear();
    bytes_ = 0;
  }

 private:
  using Key = std::tuple<int64_t, int64_t, int64_t, at::ScalarType>;

  // The mask of ``key``, moved to the front (most recently used); undefined if absent. Call under the lock.
  at::Tensor find(const Key& key) {
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->first == key) {
        std::rotate(entries_.begin(), it, it + 1);
        return entries_.front().second;
      }
    }
    return at::Tensor();
  }

  static at::Tensor build(const Geometry& g, at::ScalarType ct) {
    auto mask = at::zeros({g.L, g.L}, at::kFloat);
    float* m = mask.data_ptr<float>();
    for (int64_t i = 0; i < g.L; ++i) fill_window(g, i, m + i * g.L, -std::numeric_limits<float>::infinity());
    return mask.to(ct);
  }

  std::mutex mutex_;
  std::vector<std::pair<Key, at::Tensor>> entries_;  // most recently used first
  int64_t bytes_ = 0;
};

MaskCache& mask_cache() {
  static MaskCache* cache = new MaskCache();  // never destroyed: no tensor is freed after ATen at exit
  return *cache;
}

at::Tensor window_mask(const Geometry& g, at::ScalarType ct) { return mask_cache().get(g, ct); }

// Runs f with ATen's parallelism as the thread count allows, except for a single (sample, head):
// then on one thread inside a parallel region, so that nested loops and GEMMs stay serial.
template <typename F>
void run_deterministic(const Geometry& g, const F& f) {
  if (g.B * g.H > 1) return f();
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t) {
    if (begin == 0) f();
  });
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const Geometry& g) {
  const auto ct = compute_dtype(q);
  const at::NoGradGuard no_grad;
  const auto qc = q.detach().to(ct), vc = v.detach().to(ct);
  const auto keys = k.detach().to(ct).unsqueeze(0).expand({g.B, g.H, g.L, g.d});
  const auto mask = window_mask(g, ct);
  at::Tensor out, lse;
  run_deterministic(g, [&] {
    std::tie(out, lse) = at::_scaled_dot_product_flash_attention_for_cpu(qc, keys, vc, 0.0, false, mask,
                                                                           1.0 / std::sqrt(double(g.d)));
  });
  return {out.to(q.scalar_type()).contiguous(), lse.to(at::kFloat).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& out, const at::Tensor& lse,
                                                        const at::Tensor& grad_out, const Geometry& g) {
  const auto ct = compute_dtype(q);
  const at::NoGradGuard no_grad;
  const auto qc = q.detach().to(ct), vc = v.detach().to(ct), oc = out.detach().to(ct).contiguous();
  const auto go = grad_out.detach().to(ct).contiguous(), lse_c = lse.detach().to(at::kFloat).contiguous();
  const auto keys = k.detach().to(ct).unsqueeze(0).expand({g.B, g.H, g.L, g.d});
  const auto mask = window_mask(g, ct);
  at::Tensor dq, dk_parts, dv;
  run_deterministic(g, [&] {
    std::tie(dq, dk_parts, dv) = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        go, qc, keys, vc, oc, lse_c, 0.0, false, mask, 1.0 / std::sqrt(double(g.d)));
  });
  // The sum over the batch in sample order, element by element (at::sum promises no order). ATen's own per-sample
  // dk is thread-count independent where this path is the default (CPUs without AVX-512), not on AVX-512 CPUs
  // (seen on an Intel Xeon with AMX, torch 2.14.1): one more reason they run the kernels above.
  auto dk = dk_parts[0].clone();
  for (int64_t b = 1; b < g.B; ++b) dk.add_(dk_parts[b]);
  return {dq.to(q.scalar_type()).contiguous(), dk.to(q.scalar_type()), dv.to(q.scalar_type()).contiguous()};
}

}  // namespace flash_path

std::string masked_float32_path() { return flash_path::wanted(at::kFloat) ? "flash" : "kernel"; }

std::tuple<int64_t, int64_t> masked_flash_mask_cache() { return flash_path::mask_cache().info(); }

void masked_flash_mask_cache_clear() { flash_path::mask_cache().clear(); }

std::tuple<at::Tensor, at::Tensor> masked_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  int64_t height, int64_t width, int64_t window) {
  const Geometry g = check_and_measure(q, k, v, height, width, window);
  if (use_amx(q, g)) return masked_forward_amx(q, k, v, g);
  if (flash_path::wanted(q.scalar_type())) return flash_path::forward(q, k, v, g);
  const auto ct = compute_dtype(q);
  auto out = at::empty({g.B, g.H, g.L, g.d}, q.options().dtype(ct));
  auto lse = at::empty({g.B, g.H, g.L}, q.options().dtype(at::kFloat));
  auto qp = padded(q, g.Lq, g.dp, ct);
  auto kT = padded(k.transpose(1, 2), g.dr, g.Lp, ct);
  const bool dots = g.d <= 8;  // gemm_heads reads v transposed, else row-major
  auto vx = dots ? padded(v.transpose(2, 3), g.dr, g.Lp, ct) : padded(v, g.Lp, g.dp, ct);
  AT_DISPATCH_FLOATING_TYPES(ct, "rlr_masked_forward", [&] {
    auto a = make_args<scalar_t>(g);
    a.q = qp.data_ptr<scalar_t>(), a.kT = kT.data_ptr<scalar_t>();
    (dots ? a.vT : a.vp) = vx.data_ptr<scalar_t>();
    a.out = out.data_ptr<scalar_t>(), a.lse = lse.data_ptr<float>();
    parallel_for_flushed(0, g.H * g.B * g.blocks, 1, [&](int64_t b, int64_t e) { run_forward(a, b, e); });
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_backward(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const at::Tensor& out,
                                                               const at::Tensor& lse, const at::Tensor& grad_out,
                                                               int64_t height, int64_t width, int64_t window) {
  const Geometry g = check_and_measure(q, k, v, height, width, window);
  checks::check_backward(q, out, lse, grad_out, {g.B, g.H, g.L}, at::kCPU);
  if (use_amx(q, g)) return masked_backward_amx(q, k, v, out, lse, grad_out, g);
  if (flash_path::wanted(q.scalar_type())) return flash_path::backward(q, k, v, out, lse, grad_out, g);
  const auto ct = compute_dtype(q);
  auto dq = at::empty({g.B, g.H, g.L, g.d}, q.options().dtype(ct));
  auto qp = padded(q, g.Lq, g.dp, ct);
  auto dop = padded(grad_out, g.Lq, g.dp, ct);
  auto kT = padded(k.transpose(1, 2), g.dr, g.Lp, ct);
  auto kp = g.d <= 8 ? at::Tensor() : padded(k, g.Lp, g.dp, ct);  // gemm_heads reads kT if d <= 8
  auto vT = padded(v.transpose(2, 3), g.dr, g.Lp, ct);
  auto dk = at::empty({g.H, g.L, g.d}, q.options().dtype(ct));
  auto dv = at::empty({g.B, g.H, g.L, g.d}, q.options().dtype(ct));
  AT_DISPATCH_FLOATING_TYPES(ct, "rlr_masked_backward", [&] {
    auto a = make_args<scalar_t>(g);
    a.q = qp.data_ptr<scalar_t>(), a.dop = dop.data_ptr<scalar_t>(), a.kT = kT.data_ptr<scalar_t>();
    a.kp = kp.defined() ? kp.data_ptr<scalar_t>() : nullptr;
    a.vT = vT.data_ptr<scalar_t>(), a.out = dq.data_ptr<scalar_t>();
    a.dkT = reusable_buffer<scalar_t, 1>(g.B * g.H * g.dr * g.Lp);
    a.dk = dk.data_ptr<scalar_t>(), a.dv = dv.data_ptr<scalar_t>();
    parallel_for_flushed(0, g.B * g.H, 1, [&](int64_t b, int64_t e) { run_backward(a, b, e); });
    parallel_for_flushed(0, g.H, 1, [&](int64_t b, int64_t e) { run_dk(a, b, e); });
  });
  return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type())};
}

}  // namespace rlr::cpu
