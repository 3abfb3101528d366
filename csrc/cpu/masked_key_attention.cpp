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

#include <algorithm>
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
    const int64_t i = i0 + ii, r = i / a.w, c = i % a.w;
    const int64_t r_lo = std::max<int64_t>(0, r - a.half), r_hi = std::min(a.h - 1, r + a.half);
    const int64_t c_lo = std::max<int64_t>(0, c - a.half), c_hi = std::min(a.w - 1, c + a.half);
    for (int64_t rr = r_lo; rr <= r_hi; ++rr) std::fill(s + rr * a.w + c_lo, s + rr * a.w + c_hi + 1, neg_inf<T>());
    std::fill(s + a.L, s + Lp, neg_inf<T>());
    // Four independent maxima: one chain would wait on the latency of every max.
    Vec<T> m[4] = {splat(neg_inf<T>()), splat(neg_inf<T>()), splat(neg_inf<T>()), splat(neg_inf<T>())};
    int64_t jm = 0;
    for (; jm + 4 * kLanes <= Lp; jm += 4 * kLanes)
      for (int u = 0; u < 4; ++u) m[u] = vmax(m[u], load(s + jm + u * kLanes));
    for (; jm < Lp; jm += kLanes) m[0] = vmax(m[0], load(s + jm));
    const T row_max = hmax(vmax(vmax(m[0], m[1]), vmax(m[2], m[3])));  // of the raw products: scale > 0
    const Vec<T> shift = splat(row_max), scale = splat(a.scale);
    Vec<T> l{};
    for (int64_t j = 0; j < Lp; j += kLanes) {
      const Vec<T> p = vexp((load(s + j) - shift) * scale);
      store(s + j, p);
      l += p;
    }
    // vexp clamps, so masked keys hold a tiny positive value: zero them exactly.
    for (int64_t rr = r_lo; rr <= r_hi; ++rr) std::fill(s + rr * a.w + c_lo, s + rr * a.w + c_hi + 1, T(0));
    std::fill(s + a.L, s + Lp, T(0));
    const T sum = hsum(l);
    if (inv_sum) {
      inv_sum[ii] = T(1) / sum;
    } else {
      const Vec<T> inv = splat(T(1) / sum);
      for (int64_t j = 0; j < Lp; j += kLanes) store(s + j, load(s + j) * inv);
    }
    if (lse) lse[ii] = static_cast<float>(a.scale * row_max + std::log(sum));
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

struct Geometry {
  int64_t B, H, L, d, h, w, half, Lq, Lp, dp, dr, blocks;
};

Geometry check_and_measure(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t height,
                           int64_t width, int64_t window) {
  check_input(q, "q", 4, q);
  check_input(k, "k", 3, q);
  check_input(v, "v", 4, q);
  Geometry g;
  g.B = q.size(0), g.H = q.size(1), g.L = q.size(2), g.d = q.size(3);
  TORCH_CHECK(k.size(0) == g.H && k.size(1) == g.L && k.size(2) == g.d, "k must have shape (", g.H, ", ", g.L, ", ",
              g.d, "), got ", k.sizes());
  TORCH_CHECK(v.sizes() == q.sizes(), "v must have the shape of q ", q.sizes(), ", got ", v.sizes());
  TORCH_CHECK(g.B >= 1 && g.H >= 1 && g.d >= 1, "empty input");
  check_grid(g.L, height, width, window);
  g.h = height, g.w = width, g.half = window / 2;
  TORCH_CHECK(g.half < height / 2 || g.half < width / 2, "window ", window, " covers the whole ", height, "x",
              width, " grid for the centre query, which then has no key outside its window");
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

}  // namespace

std::tuple<at::Tensor, at::Tensor> masked_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  int64_t height, int64_t width, int64_t window) {
  const Geometry g = check_and_measure(q, k, v, height, width, window);
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
  check_grad_out(grad_out, q);
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
