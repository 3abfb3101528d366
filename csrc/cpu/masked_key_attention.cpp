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
// The products are small register-blocked kernels (4 rows x 32 columns of accumulators,
// 16-lane vectors) rather than BLAS calls, so that every output element is summed in one fixed
// order: results are bitwise independent of the number of threads.
//
// Backward recomputes each block's scores and re-derives the exact softmax statistics from the
// full row (the float32 lse is not needed, so float64 stays exact), then
//   dP = dO v^T,  D_i = sum_j P_ij dP_ij,  dS = P (dP - D),
//   dq = scale dS k,  dk += dS^T (q scale),  dv += P^T dO.
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
constexpr int64_t kCols = 32;      // output columns per register block (2 vectors)
constexpr int kMR = 4;             // rows per register block (8 would spill on AVX2)
constexpr int64_t kRowAlign = kMR; // query / key row counts are padded to whole row blocks

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
      for (int64_t j = j0; j < j1; j += kCols) {
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

// C[r, t] (+)= sum_x A[r*sar + x*sax] * B[x, t]   for r < M (M % MR == 0), t < N (N % 32 == 0).
// A is read through two strides so that the same kernel computes P v (A = P) and dS^T q (A = dS
// transposed) without copying.
template <int MR, bool kAccumulate, typename T>
RLR_INLINE void gemm_a_b(int64_t M, int64_t N, int64_t X, const T* A, int64_t sar, int64_t sax, const T* B,
                         int64_t ldb, T* C, int64_t ldc) {
  for (int64_t r0 = 0; r0 < M; r0 += MR) {
    const T* a = A + r0 * sar;
    for (int64_t t = 0; t < N; t += kCols) {
      Vec<T> c0[MR], c1[MR];
      for (int r = 0; r < MR; ++r) c0[r] = Vec<T>{}, c1[r] = Vec<T>{};
      const T* bp = B + t;
      for (int64_t x = 0; x < X; ++x, bp += ldb) {
        const Vec<T> b0 = load(bp), b1 = load(bp + kLanes);
        const T* ax = a + x * sax;
        for (int r = 0; r < MR; ++r) {
          const T v = ax[r * sar];
          c0[r] += v * b0, c1[r] += v * b1;
        }
      }
      for (int r = 0; r < MR; ++r) {
        T* p = C + (r0 + r) * ldc + t;
        store(p, kAccumulate ? load(p) + c0[r] : c0[r]);
        store(p + kLanes, kAccumulate ? load(p + kLanes) + c1[r] : c1[r]);
      }
    }
  }
}

template <typename T>
struct MaskedArgs {
  const T* qs;    // (B, H, Lq, dp)  q * scale, zero padded
  const T* kT;    // (H, d, Lp)      keys, transposed for the score product
  const T* kp;    // (H, Lp, dp)     keys, row-major (backward: dq = dS k)
  const T* vp;    // (B, H, Lp, dp)  values (forward)
  const T* vT;    // (B, H, d, Lp)   values, transposed (backward: dP = dO v^T)
  const T* dop;   // (B, H, Lq, dp)  grad_out (backward)
  T* out;         // (B, H, L, d)    out (forward) / dq (backward)
  float* lse;     // (B, H, L)       forward
  T* dk;          // (B, H, Lp, dp)  per-sample partial dk (backward)
  T* dv;          // (B, H, Lp, dp)  dv (backward)
  int64_t B, H, L, d, h, w, half, Lq, Lp, dp, blocks;
  T scale;
};

// Masked softmax of the rows [0, rows) of S (row ii = query i0 + ii), in place: window and padding
// keys get probability exactly 0. Writes each row's lse when `lse` is given.
template <typename T>
RLR_INLINE void masked_softmax_rows(const MaskedArgs<T>& a, int64_t i0, int64_t rows, T* S, float* lse) {
  const int64_t Lp = a.Lp;
  for (int64_t ii = 0; ii < rows; ++ii) {
    T* s = S + ii * Lp;
    const int64_t i = i0 + ii, r = i / a.w, c = i % a.w;
    const int64_t r_lo = std::max<int64_t>(0, r - a.half), r_hi = std::min(a.h - 1, r + a.half);
    const int64_t c_lo = std::max<int64_t>(0, c - a.half), c_hi = std::min(a.w - 1, c + a.half);
    for (int64_t rr = r_lo; rr <= r_hi; ++rr) std::fill(s + rr * a.w + c_lo, s + rr * a.w + c_hi + 1, neg_inf<T>());
    std::fill(s + a.L, s + Lp, neg_inf<T>());
    Vec<T> m = splat(neg_inf<T>());
    for (int64_t j = 0; j < Lp; j += kLanes) m = vmax(m, load(s + j));
    const T row_max = hmax(m);
    Vec<T> l{};
    for (int64_t j = 0; j < Lp; j += kLanes) {
      const Vec<T> p = vexp(load(s + j) - row_max);
      store(s + j, p);
      l += p;
    }
    // vexp clamps, so masked keys hold a tiny positive value: zero them exactly.
    for (int64_t rr = r_lo; rr <= r_hi; ++rr) std::fill(s + rr * a.w + c_lo, s + rr * a.w + c_hi + 1, T(0));
    std::fill(s + a.L, s + Lp, T(0));
    const T sum = hsum(l);
    const Vec<T> inv = splat(T(1) / sum);
    for (int64_t j = 0; j < Lp; j += kLanes) store(s + j, load(s + j) * inv);
    if (lse) lse[ii] = static_cast<float>(row_max + std::log(sum));
  }
}

template <typename T>
RLR_INLINE void masked_forward_tasks(const MaskedArgs<T>& a, int64_t begin, int64_t end) {
  std::vector<T> S(kRowBlock * a.Lp), O(kRowBlock * a.dp);
  for (int64_t id = begin; id < end; ++id) {
    const int64_t blk = id % a.blocks, b = (id / a.blocks) % a.B, n = id / (a.blocks * a.B);
    const int64_t i0 = blk * kRowBlock;
    const int64_t rows = std::min(kRowBlock, a.L - i0), rows_padded = std::min(kRowBlock, a.Lq - i0);
    const int64_t bn = b * a.H + n;
    gemm_a_bt<kMR>(rows_padded, a.Lp, a.d, a.qs + (bn * a.Lq + i0) * a.dp, a.dp, a.kT + n * a.d * a.Lp, a.Lp, S.data(), a.Lp);
    masked_softmax_rows(a, i0, rows, S.data(), a.lse + bn * a.L + i0);
    std::fill(S.begin() + rows * a.Lp, S.begin() + rows_padded * a.Lp, T(0));
    gemm_a_b<kMR, false>(rows_padded, a.dp, a.L, S.data(), a.Lp, 1, a.vp + bn * a.Lp * a.dp, a.dp, O.data(), a.dp);
    T* out = a.out + (bn * a.L + i0) * a.d;
    for (int64_t ii = 0; ii < rows; ++ii) std::copy(O.data() + ii * a.dp, O.data() + ii * a.dp + a.d, out + ii * a.d);
  }
}

template <typename T>
RLR_INLINE void masked_backward_tasks(const MaskedArgs<T>& a, int64_t begin, int64_t end) {
  std::vector<T> S(kRowBlock * a.Lp), G(kRowBlock * a.Lp), dQ(kRowBlock * a.dp);
  const int64_t keys_padded = round_up(a.L, kRowAlign);
  for (int64_t bn = begin; bn < end; ++bn) {
    const int64_t n = bn % a.H;
    const T* qs = a.qs + bn * a.Lq * a.dp;
    const T* dop = a.dop + bn * a.Lq * a.dp;
    T* dk = a.dk + bn * a.Lp * a.dp;
    T* dv = a.dv + bn * a.Lp * a.dp;
    for (int64_t i0 = 0; i0 < a.L; i0 += kRowBlock) {
      const int64_t rows = std::min(kRowBlock, a.L - i0), rows_padded = std::min(kRowBlock, a.Lq - i0);
      gemm_a_bt<kMR>(rows_padded, a.Lp, a.d, qs + i0 * a.dp, a.dp, a.kT + n * a.d * a.Lp, a.Lp, S.data(), a.Lp);
      gemm_a_bt<kMR>(rows_padded, a.Lp, a.d, dop + i0 * a.dp, a.dp, a.vT + bn * a.d * a.Lp, a.Lp, G.data(), a.Lp);
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
      gemm_a_b<kMR, false>(rows_padded, a.dp, a.L, G.data(), a.Lp, 1, a.kp + n * a.Lp * a.dp, a.dp, dQ.data(), a.dp);
      T* dq = a.out + (bn * a.L + i0) * a.d;
      for (int64_t ii = 0; ii < rows; ++ii)
        for (int64_t c = 0; c < a.d; ++c) dq[ii * a.d + c] = a.scale * dQ[ii * a.dp + c];
      gemm_a_b<kMR, true>(keys_padded, a.dp, rows, G.data(), 1, a.Lp, qs + i0 * a.dp, a.dp, dk, a.dp);
      gemm_a_b<kMR, true>(keys_padded, a.dp, rows, S.data(), 1, a.Lp, dop + i0 * a.dp, a.dp, dv, a.dp);
    }
  }
}

RLR_CLONES void masked_forward_f32(const MaskedArgs<float>& a, int64_t b, int64_t e) { masked_forward_tasks(a, b, e); }
RLR_CLONES void masked_forward_f64(const MaskedArgs<double>& a, int64_t b, int64_t e) { masked_forward_tasks(a, b, e); }
RLR_CLONES void masked_backward_f32(const MaskedArgs<float>& a, int64_t b, int64_t e) { masked_backward_tasks(a, b, e); }
RLR_CLONES void masked_backward_f64(const MaskedArgs<double>& a, int64_t b, int64_t e) {
  masked_backward_tasks(a, b, e);
}

void run_forward(const MaskedArgs<float>& a, int64_t b, int64_t e) { masked_forward_f32(a, b, e); }
void run_forward(const MaskedArgs<double>& a, int64_t b, int64_t e) { masked_forward_f64(a, b, e); }
void run_backward(const MaskedArgs<float>& a, int64_t b, int64_t e) { masked_backward_f32(a, b, e); }
void run_backward(const MaskedArgs<double>& a, int64_t b, int64_t e) { masked_backward_f64(a, b, e); }

struct Geometry {
  int64_t B, H, L, d, h, w, half, Lq, Lp, dp, blocks;
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
  g.Lq = round_up(g.L, kRowAlign);
  g.Lp = round_up(g.L, kCols);
  g.dp = round_up(g.d, kCols);
  g.blocks = (g.L + kRowBlock - 1) / kRowBlock;
  return g;
}

// Copy x (N, L, d) into a zero-filled (N, rows, cols) buffer of dtype ct.
at::Tensor padded(const at::Tensor& x, int64_t rows, int64_t cols, at::ScalarType ct) {
  const int64_t N = x.numel() / (x.size(-2) * x.size(-1));
  auto y = at::zeros({N, rows, cols}, x.options().dtype(ct));
  y.narrow(1, 0, x.size(-2)).narrow(2, 0, x.size(-1)).copy_(x.reshape({N, x.size(-2), x.size(-1)}));
  return y;
}

template <typename T>
MaskedArgs<T> make_args(const Geometry& g) {
  MaskedArgs<T> a{};
  a.B = g.B, a.H = g.H, a.L = g.L, a.d = g.d, a.h = g.h, a.w = g.w, a.half = g.half;
  a.Lq = g.Lq, a.Lp = g.Lp, a.dp = g.dp, a.blocks = g.blocks;
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
  auto qs = padded(q, g.Lq, g.dp, ct);
  auto kT = padded(k.transpose(1, 2), g.d, g.Lp, ct);
  auto vp = padded(v, g.Lp, g.dp, ct);
  AT_DISPATCH_FLOATING_TYPES(ct, "rlr_masked_forward", [&] {
    auto a = make_args<scalar_t>(g);
    qs.mul_(a.scale);
    a.qs = qs.data_ptr<scalar_t>(), a.kT = kT.data_ptr<scalar_t>(), a.vp = vp.data_ptr<scalar_t>();
    a.out = out.data_ptr<scalar_t>(), a.lse = lse.data_ptr<float>();
    at::parallel_for(0, g.H * g.B * g.blocks, 1, [&](int64_t b, int64_t e) { run_forward(a, b, e); });
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_backward(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const at::Tensor& out,
                                                               const at::Tensor& lse, const at::Tensor& grad_out,
                                                               int64_t height, int64_t width, int64_t window) {
  const Geometry g = check_and_measure(q, k, v, height, width, window);
  check_input(grad_out, "grad_out", 4, q);
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "grad_out must have the shape of q ", q.sizes(), ", got ",
              grad_out.sizes());
  const auto ct = compute_dtype(q);
  auto dq = at::empty({g.B, g.H, g.L, g.d}, q.options().dtype(ct));
  auto qs = padded(q, g.Lq, g.dp, ct);
  auto dop = padded(grad_out, g.Lq, g.dp, ct);
  auto kT = padded(k.transpose(1, 2), g.d, g.Lp, ct);
  auto kp = padded(k, g.Lp, g.dp, ct);
  auto vT = padded(v.transpose(2, 3), g.d, g.Lp, ct);
  auto dk = at::zeros({g.B, g.H, g.Lp, g.dp}, q.options().dtype(ct));
  auto dv = at::zeros_like(dk);
  AT_DISPATCH_FLOATING_TYPES(ct, "rlr_masked_backward", [&] {
    auto a = make_args<scalar_t>(g);
    qs.mul_(a.scale);
    a.qs = qs.data_ptr<scalar_t>(), a.dop = dop.data_ptr<scalar_t>(), a.kT = kT.data_ptr<scalar_t>();
    a.kp = kp.data_ptr<scalar_t>(), a.vT = vT.data_ptr<scalar_t>(), a.out = dq.data_ptr<scalar_t>();
    a.dk = dk.data_ptr<scalar_t>(), a.dv = dv.data_ptr<scalar_t>();
    at::parallel_for(0, g.B * g.H, 1, [&](int64_t b, int64_t e) { run_backward(a, b, e); });
  });
  auto dk_sum = dk[0].clone();  // batch sum in a fixed order: thread-count independent
  for (int64_t b = 1; b < g.B; ++b) dk_sum.add_(dk[b]);
  auto crop = [&](const at::Tensor& t, at::IntArrayRef shape) {
    return t.narrow(-2, 0, g.L).narrow(-1, 0, g.d).to(q.scalar_type()).contiguous().view(shape);
  };
  return {dq.to(q.scalar_type()), crop(dk_sum, {g.H, g.L, g.d}), crop(dv, {g.B, g.H, g.L, g.d})};
}

}  // namespace rlr::cpu
