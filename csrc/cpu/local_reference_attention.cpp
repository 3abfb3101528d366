// Local reference attention on CPU, forward and backward (DESIGN.md §3).
//
//   out[b,n,i] = sum_c sum_{j in W(i)} softmax_j(q[b,n,i].k[c,n,j] * scale) v[c,n,j]
//
// Cost O(B·R·H·L·k²·d): only the k x k window keys of each query are touched.
//
// Vectorisation runs across 16 neighbouring queries of one grid row (a "tile"), not across d:
// for a window offset (dr, dc) the 16 queries of a tile see 16 consecutive keys of grid row
// r+dr, so with tensors stored channel-major per grid row, every score, probability and output
// update is one 16-lane vector operation with no horizontal reduction. Keys and values are
// padded with zero columns so that every lane reads in bounds; lanes whose key lies off the
// grid are masked, so the window is truncated at the border exactly as in the reference.
//
// Keys and values are shared by the batch, so the queries of up to 4 samples at the same grid
// positions go through every product together: each key / value vector loaded from memory
// serves 4 tiles of queries (register blocking over the batch), which turns the products from
// load-bound into arithmetic-bound.
//
// Backward: the window scores are recomputed in full, so the softmax statistics (and, for several
// reference copies, each copy's D = sum_j P dP) are re-derived exactly rather than read back from
// the float32 lse; float64 inputs therefore stay float64-exact. dk/dv are gathered per key row
// once every query row whose window reaches it is done (a ring of the last k query rows keeps
// their P, dS, q and grad_out): for each window column, the products dS ⊙ q of all those query
// rows and samples are summed lane-aligned first and shifted onto the key lanes once, so the
// shift (an in-register permute) is paid once per ~k·4 products. One task per head owns that
// head's dk/dv and sums the batch into them in a fixed order: no races, no per-sample partial
// buffers, and results that do not depend on the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace rlr::cpu {
namespace {

constexpr int kBatchBlock = 4;  // samples per register block
constexpr int kColBlock = 5;    // window columns per register block (a whole paper window of 5)

// float64 is the exactness path, not a speed path: one sample at a time (a quarter of the code).
template <typename T>
constexpr int64_t batch_block() {
  return std::is_same_v<T, float> ? kBatchBlock : 1;
}

// Layouts (T = float, or double for float64 inputs):
//  - keys / values: (R, H, h, d, Wk), key column x at x + half, zero elsewhere. Channels are Wk
//    apart, a whole number of vectors, so every channel row starts 64-byte aligned.
//  - query rows: each task transposes its (w, d) query row (and grad_out row) of every sample into
//    a (d, Wq) buffer, zero past column w, and its result back.
//  - P / dS scratch: one 16-lane vector per (tile, window offset), offset o = ra * k + dc for key
//    row r_lo + ra and window column dc.
//  - dk / dv accumulators: (R, H, h, d, Wd), key column x at x + half; a tile at column c0 adds
//    window column dc into the 16-key segments at c0 + 16 (dc / 16) and the next one, hence
//    Wd = Wq + 16 ((k - 1) / 16 + 1). Written token-major to dk / dv once a head is done.
template <typename T>
struct LocalArgs {
  const T* q;     // (B, H, L, d)
  const T* kT;    // (R, H, h, d, Wk)
  const T* vT;    // (R, H, h, d, Wk)
  const T* dout;  // (B, H, L, d)  grad_out (backward only)
  T* out;         // (B, H, L, d)  out (forward) / dq (backward)
  float* lse;     // (B, R, H, L)  forward only
  T* dkT;         // (R, H, h, d, Wd) dk, summed over the batch (backward only)
  T* dvT;         // (R, H, h, d, Wd) dv, summed over the batch (backward only)
  T* dk;          // (R, H, L, d)  dk, token-major (backward only)
  T* dv;          // (R, H, L, d)  dv, token-major (backward only)
  int64_t B, R, H, h, w, d, k, half, tiles, Wq, Wk, Wd, noff;
  T scale;

  int64_t kv_offset(int64_t c, int64_t n) const { return (c * H + n) * h * d * Wk; }
  int64_t grad_offset(int64_t c, int64_t n) const { return (c * H + n) * h * d * Wd; }
  int64_t token_row(int64_t b, int64_t n, int64_t r) const { return ((b * H + n) * h * w + r * w) * d; }
  int64_t row_lo(int64_t r) const { return window::first(r, half); }
  int64_t row_count(int64_t r) const { return window::last(r, half, h) - row_lo(r) + 1; }
};

// Window geometry of one tile: query row r, query columns c0 .. c0+15, with per-column lane masks.
template <typename T>
struct Tile {
  int64_t r, c0, r_lo, nrows, valid_q;
  std::vector<T> bias, keep;  // (k, 16): 0 / -inf and 1 / 0 for every window column
};

template <typename T>
void make_tile(const LocalArgs<T>& a, int64_t r, int64_t tile, Tile<T>& t) {
  t.r = r;
  t.c0 = tile * kLanes;
  t.r_lo = a.row_lo(r);
  t.nrows = a.row_count(r);
  t.valid_q = std::min<int64_t>(kLanes, a.w - t.c0);
  t.bias.resize(a.k * kLanes);
  t.keep.resize(a.k * kLanes);
  // Lane u at window column dc looks at key column c0 + u + dc - half. Off-grid keys are masked;
  // lanes past the last query column stay unmasked (their rows stay finite) and are dropped.
  for (int64_t dc = 0; dc < a.k; ++dc) {
    for (int64_t u = 0; u < kLanes; ++u) {
      const int64_t col = t.c0 + u + dc - a.half;
      const bool ok = (col >= 0 && col < a.w) || u >= t.valid_q;
      t.bias[dc * kLanes + u] = ok ? T(0) : neg_inf<T>();
      t.keep[dc * kLanes + u] = ok ? T(1) : T(0);
    }
  }
}

// out[s][j] = sum_c x[s][c] * y[c, j] for NS samples and NK consecutive window columns: every key
// vector loaded serves NS query tiles. Rows of x are xs apart, of y ys apart; out[s] rows are
// 16 lanes apart.
template <int NS, int NK, typename T>
RLR_INLINE void dots_block(int64_t d, const T* const* x, int64_t xs, const T* y, int64_t ys, T* const* out,
                           int64_t o) {
  Vec<T> acc[NS][NK];
  for (int s = 0; s < NS; ++s)
    for (int j = 0; j < NK; ++j) acc[s][j] = Vec<T>{};
  for (int64_t c = 0; c < d; ++c) {
    Vec<T> xv[NS];
    for (int s = 0; s < NS; ++s) xv[s] = load(x[s] + c * xs);
    for (int j = 0; j < NK; ++j) {
      const Vec<T> yv = load(y + c * ys + j);
      for (int s = 0; s < NS; ++s) acc[s][j] += xv[s] * yv;
    }
  }
  for (int s = 0; s < NS; ++s)
    for (int j = 0; j < NK; ++j) store(out[s] + (o + j) * kLanes, acc[s][j]);
}

template <int NS, typename T>
RLR_INLINE void dots_columns(int64_t d, int64_t nk, const T* const* x, int64_t xs, const T* y, int64_t ys,
                             T* const* out, int64_t o) {
  switch (nk) {
    case 1: dots_block<NS, 1>(d, x, xs, y, ys, out, o); break;
    case 2: dots_block<NS, 2>(d, x, xs, y, ys, out, o); break;
    case 3: dots_block<NS, 3>(d, x, xs, y, ys, out, o); break;
    case 4: dots_block<NS, 4>(d, x, xs, y, ys, out, o); break;
    default: dots_block<NS, kColBlock>(d, x, xs, y, ys, out, o); break;
  }
}

// Window columns split into near-equal blocks of at most kColBlock (7 -> 4 + 3, not 5 + 2).
RLR_INLINE int64_t column_block(int64_t k, int64_t dc) {
  const int64_t blocks = (k + kColBlock - 1) / kColBlock;
  const int64_t size = (k + blocks - 1) / blocks;
  return std::min(size, k - dc);
}

// out[s][o] = sum_c x[s][c] * y[c, window offset o]: 16 lanes of dot products per window offset,
// for NS samples. x[s] are tiles of row buffers, y the key-side tensor of one head and copy.
template <int NS, typename T>
RLR_INLINE void window_dots(const LocalArgs<T>& a, const Tile<T>& t, const T* const* x, const T* y, T* const* out) {
  const int64_t k = a.k, d = a.d, Wk = a.Wk;
  for (int64_t ra = 0; ra < t.nrows; ++ra) {
    const T* yrow = y + (t.r_lo + ra) * d * Wk + t.c0;
    for (int64_t dc = 0; dc < k;) {
      const int64_t nk = column_block(k, dc);
      dots_columns<NS>(d, nk, x, a.Wq, yrow + dc, Wk, out, ra * k + dc);
      dc += nk;
    }
  }
}

// acc[s][c] (+)= sum_o weights[s][o] * y[c, window offset o] for NS samples and channels
// c0 .. c0+NC-1: every value vector loaded serves NS query tiles.
template <int NS, int NC, typename T>
RLR_INLINE void combine_block(const LocalArgs<T>& a, const Tile<T>& t, const T* const* weights, const T* y,
                              int64_t c0, T* const* acc, bool accumulate) {
  const int64_t k = a.k, d = a.d, Wk = a.Wk, Wq = a.Wq;
  Vec<T> s[NS][NC];
  for (int b = 0; b < NS; ++b)
    for (int i = 0; i < NC; ++i) s[b][i] = accumulate ? load(acc[b] + (c0 + i) * Wq) : Vec<T>{};
  for (int64_t ra = 0; ra < t.nrows; ++ra) {
    const T* yrow = y + (t.r_lo + ra) * d * Wk + c0 * Wk + t.c0;
    for (int64_t dc = 0; dc < k; ++dc) {
      const int64_t o = (ra * k + dc) * kLanes;
      Vec<T> wv[NS];
      for (int b = 0; b < NS; ++b) wv[b] = load(weights[b] + o);
      for (int i = 0; i < NC; ++i) {
        const Vec<T> yv = load(yrow + i * Wk + dc);
        for (int b = 0; b < NS; ++b) s[b][i] += wv[b] * yv;
      }
    }
  }
  for (int b = 0; b < NS; ++b)
    for (int i = 0; i < NC; ++i) store(acc[b] + (c0 + i) * Wq, s[b][i]);
}

// acc[s][c] (+)= sum_o weights[s][o] * y[c, o] over all channels; acc[s] are tiles of row buffers.
template <int NS, typename T>
RLR_INLINE void window_combine(const LocalArgs<T>& a, const Tile<T>& t, const T* const* weights, const T* y,
                               T* const* acc, bool accumulate) {
  int64_t c = 0;
  for (; c + 4 <= a.d; c += 4) combine_block<NS, 4>(a, t, weights, y, c, acc, accumulate);
  for (; c < a.d; ++c) combine_block<NS, 1>(a, t, weights, y, c, acc, accumulate);
}

// Masked softmax of the scaled scores over the window offsets of every lane, in place: S holds
// raw dot products on entry and probabilities on exit; m and l give lse = m + log l.
template <typename T>
RLR_INLINE void window_softmax(const LocalArgs<T>& a, const Tile<T>& t, T* S, Vec<T>& m, Vec<T>& l) {
  const int64_t k = a.k;
  m = splat(neg_inf<T>());
  for (int64_t ra = 0; ra < t.nrows; ++ra)
    for (int64_t dc = 0; dc < k; ++dc) {
      T* s = S + (ra * k + dc) * kLanes;
      const Vec<T> x = load(s) * a.scale + load(t.bias.data() + dc * kLanes);
      store(s, x);
      m = vmax(m, x);
    }
  l = Vec<T>{};
  for (int64_t ra = 0; ra < t.nrows; ++ra)
    for (int64_t dc = 0; dc < k; ++dc) {
      T* s = S + (ra * k + dc) * kLanes;
      const Vec<T> p = vexp(load(s) - m) * load(t.keep.data() + dc * kLanes);
      store(s, p);
      l += p;
    }
  const Vec<T> inv = splat(T(1)) / l;
  for (int64_t o = 0; o < t.nrows * k; ++o) {
    T* s = S + o * kLanes;
    store(s, load(s) * inv);
  }
}

// ------------------------------------------------------------------------------------ forward

// Per-thread forward scratch: the row buffers of a batch block (q in, out) and its P.
template <typename T>
struct ForwardScratch {
  std::vector<T> x, o, S;
  Tile<T> tile;
  explicit ForwardScratch(const LocalArgs<T>& a)
      : x(kBatchBlock * a.d * a.Wq), o(kBatchBlock * a.d * a.Wq), S(kBatchBlock * a.noff * kLanes) {}
};

// One query row r of head n for samples b0 .. b0+NS-1, all tiles and copies.
template <int NS, typename T>
RLR_INLINE void forward_row(const LocalArgs<T>& a, int64_t b0, int64_t n, int64_t r, ForwardScratch<T>& sc) {
  const int64_t L = a.h * a.w, row = a.d * a.Wq;
  for (int s = 0; s < NS; ++s) to_channels(a.q + a.token_row(b0 + s, n, r), a.w, a.d, a.Wq, sc.x.data() + s * row);
  for (int64_t tile = 0; tile < a.tiles; ++tile) {
    Tile<T>& t = sc.tile;
    make_tile(a, r, tile, t);
    const T* x[NS];
    T *o[NS], *S[NS];
    for (int s = 0; s < NS; ++s) {
      x[s] = sc.x.data() + s * row + t.c0;
      o[s] = sc.o.data() + s * row + t.c0;
      S[s] = sc.S.data() + s * a.noff * kLanes;
    }
    for (int64_t c = 0; c < a.R; ++c) {
      const T* kc = a.kT + a.kv_offset(c, n);
      const T* vc = a.vT + a.kv_offset(c, n);
      window_dots<NS>(a, t, x, kc, S);
      for (int s = 0; s < NS; ++s) {
        Vec<T> m, l;
        window_softmax(a, t, S[s], m, l);
        float* lse = a.lse + (((b0 + s) * a.R + c) * a.H + n) * L + t.r * a.w + t.c0;
        for (int64_t u = 0; u < t.valid_q; ++u) lse[u] = static_cast<float>(m[u] + std::log(l[u]));
      }
      window_combine<NS>(a, t, S, vc, o, c > 0);
    }
  }
  for (int s = 0; s < NS; ++s) to_tokens(sc.o.data() + s * row, a.w, a.d, a.Wq, a.out + a.token_row(b0 + s, n, r));
}

// ----------------------------------------------------------------------------------- backward

// Per-thread backward scratch: a ring of the last k query rows of a batch block (q, grad_out,
// P and dS of every copy and tile), and the dq row buffers.
template <typename T>
struct BackwardScratch {
  int64_t row, tile_block, slot_block;
  std::vector<T> x, y, o, S, G;
  Tile<T> tile;
  std::vector<const T*> src_w, src_x;  // gather sources
  explicit BackwardScratch(const LocalArgs<T>& a)
      : row(a.d * a.Wq),
        tile_block(a.noff * kLanes),
        slot_block(a.R * kBatchBlock * a.tiles * a.noff * kLanes),
        x(a.k * kBatchBlock * row),
        y(a.k * kBatchBlock * row),
        o(kBatchBlock * row),
        S(a.k * slot_block),
        G(a.k * slot_block),
        src_w(a.k * kBatchBlock),
        src_x(a.k * kBatchBlock) {}
  // Ring slot of query row r; sample s of the batch block; copy c; tile.
  T* xrow(int64_t r, int64_t k, int64_t s) { return x.data() + ((r % k) * kBatchBlock + s) * row; }
  T* yrow(int64_t r, int64_t k, int64_t s) { return y.data() + ((r % k) * kBatchBlock + s) * row; }
  int64_t pg(int64_t r, int64_t k, int64_t c, int64_t s, int64_t tile, int64_t tiles) const {
    return (r % k) * slot_block + ((c * kBatchBlock + s) * tiles + tile) * tile_block;
  }
};

// Query row r of head n for samples b0 + first .. b0 + first + NS - 1 (ring samples first ..):
// recompute P, form dS (into the ring) and dq.
template <int NS, typename T>
RLR_INLINE void backward_query_row(const LocalArgs<T>& a, int64_t b0, int64_t first, int64_t n, int64_t r,
                                   BackwardScratch<T>& sc) {
  const int64_t k = a.k;
  for (int64_t s = first; s < first + NS; ++s) {
    to_channels(a.q + a.token_row(b0 + s, n, r), a.w, a.d, a.Wq, sc.xrow(r, k, s));
    to_channels(a.dout + a.token_row(b0 + s, n, r), a.w, a.d, a.Wq, sc.yrow(r, k, s));
  }
  for (int64_t tile = 0; tile < a.tiles; ++tile) {
    Tile<T>& t = sc.tile;
    make_tile(a, r, tile, t);
    const int64_t noff = t.nrows * k;
    const T *x[NS], *y[NS];
    T* dq[NS];
    for (int s = 0; s < NS; ++s) {
      x[s] = sc.xrow(r, k, first + s) + t.c0;
      y[s] = sc.yrow(r, k, first + s) + t.c0;
      dq[s] = sc.o.data() + (first + s) * sc.row + t.c0;
    }
    for (int64_t c = 0; c < a.R; ++c) {
      const T* kc = a.kT + a.kv_offset(c, n);
      const T* vc = a.vT + a.kv_offset(c, n);
      T *S[NS], *G[NS];
      for (int s = 0; s < NS; ++s) {
        S[s] = sc.S.data() + sc.pg(r, k, c, first + s, tile, a.tiles);
        G[s] = sc.G.data() + sc.pg(r, k, c, first + s, tile, a.tiles);
      }
      window_dots<NS>(a, t, x, kc, S);
      window_dots<NS>(a, t, y, vc, G);  // dP
      for (int s = 0; s < NS; ++s) {
        Vec<T> m, l;
        window_softmax(a, t, S[s], m, l);
        Vec<T> D{};
        for (int64_t o = 0; o < noff; ++o) D += load(S[s] + o * kLanes) * load(G[s] + o * kLanes);
        // G = scale * dS, so that dq = G k and dk = G^T q need no further scaling.
        for (int64_t o = 0; o < noff; ++o) {
          T* g = G[s] + o * kLanes;
          store(g, (load(S[s] + o * kLanes) * a.scale) * (load(g) - D));
        }
      }
      window_combine<NS>(a, t, G, kc, dq, c > 0);
    }
  }
  for (int64_t s = first; s < first + NS; ++s)
    to_tokens(sc.o.data() + s * sc.row, a.w, a.d, a.Wq, a.out + a.token_row(b0 + s, n, r));
}

// Lane l of the result takes lane l - shift of the (zero-extended) input: the index vector for
// __builtin_shuffle(zero, v, idx) (the in-segment part) and __builtin_shuffle(v, zero, idx)
// (the part spilling into the next 16-key segment).
template <typename T>
RLR_INLINE auto shift_index(int64_t shift) {
  using IV = decltype(Vec<T>{} < Vec<T>{});
  IV idx;
  for (int l = 0; l < kLanes; ++l) idx[l] = kLanes + l - shift;
  return idx;
}

// dst[c, key] += sum_src sum_j w[src][j] (.) x[src][c], shifted by window column dc0 + j onto the
// key lanes, for window columns dc0 .. dc0+NK-1 (within one 16-key segment) and channels
// c0 .. c0+NC-1. The products of all sources are summed lane-aligned (query lanes) and shifted
// once per column: the shift costs one permute per ns products.
template <int NK, int NC, typename T>
RLR_INLINE void gather_block(int64_t ns, const T* const* w, const T* const* x, int64_t xs, int64_t c0, T* dst,
                             int64_t ds, int64_t shift0) {
  Vec<T> acc[NK][NC];
  for (int j = 0; j < NK; ++j)
    for (int i = 0; i < NC; ++i) acc[j][i] = Vec<T>{};
  for (int64_t src = 0; src < ns; ++src) {
    Vec<T> wv[NK];
    for (int j = 0; j < NK; ++j) wv[j] = load(w[src] + j * kLanes);
    for (int i = 0; i < NC; ++i) {
      const Vec<T> xv = load(x[src] + (c0 + i) * xs);
      for (int j = 0; j < NK; ++j) acc[j][i] += wv[j] * xv;
    }
  }
  const Vec<T> zero{};
  for (int i = 0; i < NC; ++i) {
    Vec<T> lo{}, hi{};
    for (int j = 0; j < NK; ++j) {
      const auto idx = shift_index<T>(shift0 + j);
      lo += __builtin_shuffle(zero, acc[j][i], idx);
      hi += __builtin_shuffle(acc[j][i], zero, idx);
    }
    T* p = dst + (c0 + i) * ds;
    store(p, load(p) + lo);
    store(p + kLanes, load(p + kLanes) + hi);
  }
}

template <int NK, typename T>
RLR_INLINE void gather_channels(int64_t d, int64_t ns, const T* const* w, const T* const* x, int64_t xs, T* dst,
                                int64_t ds, int64_t shift0) {
  int64_t c = 0;
  for (; c + 4 <= d; c += 4) gather_block<NK, 4>(ns, w, x, xs, c, dst, ds, shift0);
  for (; c < d; ++c) gather_block<NK, 1>(ns, w, x, xs, c, dst, ds, shift0);
}

// Key row kr of head n: dk += sum dS^T q and dv += sum P^T grad_out over the query rows whose
// window reaches kr (all in the ring) and the NS samples of the batch block.
template <typename T>
RLR_INLINE void backward_key_row(const LocalArgs<T>& a, int64_t ns_batch, int64_t n, int64_t kr,
                                 BackwardScratch<T>& sc) {
  const int64_t k = a.k, d = a.d;
  const int64_t qr_lo = a.row_lo(kr), qr_hi = window::last(kr, a.half, a.h);
  for (int64_t c = 0; c < a.R; ++c) {
    T* dk = a.dkT + a.grad_offset(c, n) + kr * d * a.Wd;
    T* dv = a.dvT + a.grad_offset(c, n) + kr * d * a.Wd;
    for (int64_t tile = 0; tile < a.tiles; ++tile) {
      const int64_t c0 = tile * kLanes;
      for (int64_t dc = 0; dc < k;) {
        // Blocks of window columns that stay within one 16-key segment.
        const int64_t seg = dc / kLanes, shift0 = dc % kLanes;
        const int64_t nk = std::min({column_block(k, dc), kLanes - shift0, k - dc});
        for (int pass = 0; pass < 2; ++pass) {  // 0: dk from dS and q, 1: dv from P and grad_out
          int64_t ns = 0;
          for (int64_t qr = qr_lo; qr <= qr_hi; ++qr) {
            const int64_t o = (kr - a.row_lo(qr)) * k + dc;
            for (int64_t s = 0; s < ns_batch; ++s, ++ns) {
              const T* pg = (pass == 0 ? sc.G : sc.S).data() + sc.pg(qr, k, c, s, tile, a.tiles);
              sc.src_w[ns] = pg + o * kLanes;
              sc.src_x[ns] = (pass == 0 ? sc.xrow(qr, k, s) : sc.yrow(qr, k, s)) + c0;
            }
          }
          T* dst = (pass == 0 ? dk : dv) + c0 + seg * kLanes;
          const T* const* w = sc.src_w.data();
          const T* const* x = sc.src_x.data();
          switch (nk) {
            case 1: gather_channels<1>(d, ns, w, x, a.Wq, dst, a.Wd, shift0); break;
            case 2: gather_channels<2>(d, ns, w, x, a.Wq, dst, a.Wd, shift0); break;
            case 3: gather_channels<3>(d, ns, w, x, a.Wq, dst, a.Wd, shift0); break;
            case 4: gather_channels<4>(d, ns, w, x, a.Wq, dst, a.Wd, shift0); break;
            default: gather_channels<kColBlock>(d, ns, w, x, a.Wq, dst, a.Wd, shift0); break;
          }
        }
        dc += nk;
      }
    }
  }
}

// Entry points compiled once per ISA level (RLR_CLONES). Forward task: one query row of one head,
// all samples; backward task: one head, all samples in order (it owns that head's dk / dv).
template <typename T>
RLR_INLINE void forward_tasks(const LocalArgs<T>& a, int64_t begin, int64_t end) {
  ForwardScratch<T> sc(a);
  for (int64_t id = begin; id < end; ++id) {
    const int64_t r = id % a.h, n = id / a.h;
    for (int64_t b0 = 0; b0 < a.B; b0 += batch_block<T>()) {
      if constexpr (batch_block<T>() == 1) {
        forward_row<1>(a, b0, n, r, sc);
      } else {
        if (a.B - b0 >= kBatchBlock)
          forward_row<kBatchBlock>(a, b0, n, r, sc);
        else
          for (int64_t b = b0; b < a.B; ++b) forward_row<1>(a, b, n, r, sc);
      }
    }
  }
}

template <typename T>
RLR_INLINE void backward_tasks(const LocalArgs<T>& a, int64_t begin, int64_t end) {
  BackwardScratch<T> sc(a);
  for (int64_t n = begin; n < end; ++n) {
    for (int64_t c = 0; c < a.R; ++c) {
      std::fill_n(a.dkT + a.grad_offset(c, n), a.h * a.d * a.Wd, T(0));
      std::fill_n(a.dvT + a.grad_offset(c, n), a.h * a.d * a.Wd, T(0));
    }
    for (int64_t b0 = 0; b0 < a.B; b0 += batch_block<T>()) {
      const int64_t ns = std::min<int64_t>(batch_block<T>(), a.B - b0);
      // Query row r fills the ring; key row r - half is then complete (its last query row is r).
      for (int64_t r = 0; r < a.h + a.half; ++r) {
        if (r < a.h) {
          if constexpr (batch_block<T>() == 1)
            backward_query_row<1>(a, b0, 0, n, r, sc);
          else if (ns == kBatchBlock)  // a whole block; a remainder goes one sample at a time
            backward_query_row<kBatchBlock>(a, b0, 0, n, r, sc);
          else
            for (int64_t s = 0; s < ns; ++s) backward_query_row<1>(a, b0, s, n, r, sc);
        }
        if (r >= a.half) backward_key_row(a, ns, n, r - a.half, sc);
      }
    }
    for (int64_t c = 0; c < a.R; ++c)
      for (int64_t r = 0; r < a.h; ++r) {
        const int64_t from = a.grad_offset(c, n) + r * a.d * a.Wd + a.half, to = a.token_row(c, n, r);
        to_tokens(a.dkT + from, a.w, a.d, a.Wd, a.dk + to);
        to_tokens(a.dvT + from, a.w, a.d, a.Wd, a.dv + to);
      }
  }
}

// Keys and values (R, H, L, d) -> (R, H, h, d, Wk), key column x at x + half, zero elsewhere.
// One task per grid row.
template <typename T>
RLR_INLINE void layout_tasks(const LocalArgs<T>& a, const T* k, const T* v, T* kT, T* vT, int64_t begin,
                             int64_t end) {
  for (int64_t id = begin; id < end; ++id) {
    const int64_t row = id * a.d * a.Wk, from = id * a.w * a.d;
    for (T* x : {kT + row, vT + row})  // only the padding columns: the grid columns are written next
      for (int64_t c = 0; c < a.d; ++c) {
        std::fill_n(x + c * a.Wk, a.half, T(0));
        std::fill(x + c * a.Wk + a.half + a.w, x + (c + 1) * a.Wk, T(0));
      }
    to_channels(k + from, a.w, a.d, a.Wk, kT + row + a.half);
    to_channels(v + from, a.w, a.d, a.Wk, vT + row + a.half);
  }
}

RLR_CLONES void local_layout_f32(const LocalArgs<float>& a, const float* k, const float* v, float* kT, float* vT,
                                 int64_t begin, int64_t end) {
  layout_tasks(a, k, v, kT, vT, begin, end);
}
RLR_CLONES void local_layout_f64(const LocalArgs<double>& a, const double* k, const double* v, double* kT,
                                 double* vT, int64_t begin, int64_t end) {
  layout_tasks(a, k, v, kT, vT, begin, end);
}
RLR_CLONES void local_forward_f32(const LocalArgs<float>& a, int64_t begin, int64_t end) {
  forward_tasks(a, begin, end);
}
RLR_CLONES void local_forward_f64(const LocalArgs<double>& a, int64_t begin, int64_t end) {
  forward_tasks(a, begin, end);
}
RLR_CLONES void local_backward_f32(const LocalArgs<float>& a, int64_t begin, int64_t end) {
  backward_tasks(a, begin, end);
}
RLR_CLONES void local_backward_f64(const LocalArgs<double>& a, int64_t begin, int64_t end) {
  backward_tasks(a, begin, end);
}

void run_layout(const LocalArgs<float>& a, const float* k, const float* v, float* kT, float* vT, int64_t b,
                int64_t e) {
  local_layout_f32(a, k, v, kT, vT, b, e);
}
void run_layout(const LocalArgs<double>& a, const double* k, const double* v, double* kT, double* vT, int64_t b,
                int64_t e) {
  local_layout_f64(a, k, v, kT, vT, b, e);
}
void run_forward(const LocalArgs<float>& a, int64_t b, int64_t e) { local_forward_f32(a, b, e); }
void run_forward(const LocalArgs<double>& a, int64_t b, int64_t e) { local_forward_f64(a, b, e); }
void run_backward(const LocalArgs<float>& a, int64_t b, int64_t e) { local_backward_f32(a, b, e); }
void run_backward(const LocalArgs<double>& a, int64_t b, int64_t e) { local_backward_f64(a, b, e); }

struct Geometry {
  int64_t B, R, H, L, d, h, w, k, half, tiles, Wq, Wk, Wd;
};

Geometry check_and_measure(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t height,
                           int64_t width, int64_t window) {
  checks::check_local(q, k, v, height, width, window, at::kCPU);
  Geometry g;
  g.B = q.size(0), g.H = q.size(1), g.L = q.size(2), g.d = q.size(3), g.R = k.size(0);
  g.h = height, g.w = width;
  // Window offsets past the grid touch no key: clip them (the result is the same).
  g.k = std::min(window, window::largest(height, width));
  g.half = window::reach(g.k);
  g.tiles = (width + kLanes - 1) / kLanes;
  g.Wq = g.tiles * kLanes;
  g.Wk = (g.Wq + 2 * g.half + kLanes - 1) / kLanes * kLanes;  // channel rows start 64-byte aligned
  // The gather of a tile writes two 16-key segments per 16 window columns.
  g.Wd = g.Wq + ((g.k - 1) / kLanes + 1) * kLanes;
  return g;
}

template <typename T>
LocalArgs<T> make_args(const Geometry& g) {
  LocalArgs<T> a{};
  a.B = g.B, a.R = g.R, a.H = g.H, a.h = g.h, a.w = g.w, a.d = g.d, a.k = g.k, a.half = g.half;
  a.tiles = g.tiles, a.Wq = g.Wq, a.Wk = g.Wk, a.Wd = g.Wd, a.noff = g.k * g.k;
  a.scale = T(1) / std::sqrt(T(g.d));
  return a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> local_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 int64_t height, int64_t width, int64_t window) {
  const Geometry g = check_and_measure(q, k, v, height, width, window);
  const auto ct = compute_dtype(q);
  auto qc = q.to(ct).contiguous(), kc = k.to(ct).contiguous(), vc = v.to(ct).contiguous();
  auto out = at::empty_like(qc);
  auto lse = at::empty({g.B, g.R, g.H, g.L}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES(ct, "rlr_local_forward", [&] {
    auto a = make_args<scalar_t>(g);
    const int64_t kv_size = g.R * g.H * g.h * g.d * g.Wk;
    scalar_t* kT = reusable_buffer<scalar_t, 0>(2 * kv_size);
    at::parallel_for(0, g.R * g.H * g.h, 1, [&](int64_t b, int64_t e) {
      run_layout(a, kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), kT, kT + kv_size, b, e);
    });
    a.q = qc.data_ptr<scalar_t>(), a.kT = kT, a.vT = kT + kv_size;
    a.out = out.data_ptr<scalar_t>(), a.lse = lse.data_ptr<float>();
    parallel_for_flushed(0, g.H * g.h, 1, [&](int64_t b, int64_t e) { run_forward(a, b, e); });
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_backward(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& out,
                                                              const at::Tensor& lse, const at::Tensor& grad_out,
                                                              int64_t height, int64_t width, int64_t window) {
  const Geometry g = check_and_measure(q, k, v, height, width, window);
  checks::check_backward(q, out, lse, grad_out, {g.B, g.R, g.H, g.L}, at::kCPU);
  const auto ct = compute_dtype(q);
  auto qc = q.to(ct).contiguous(), kc = k.to(ct).contiguous(), vc = v.to(ct).contiguous();
  auto doc = grad_out.to(ct).contiguous();
  auto dq = at::empty_like(qc), dk = at::empty_like(kc), dv = at::empty_like(vc);
  AT_DISPATCH_FLOATING_TYPES(ct, "rlr_local_backward", [&] {
    auto a = make_args<scalar_t>(g);
    const int64_t kv_size = g.R * g.H * g.h * g.d * g.Wk, grad_size = g.R * g.H * g.h * g.d * g.Wd;
    scalar_t* kT = reusable_buffer<scalar_t, 0>(2 * kv_size + 2 * grad_size);
    at::parallel_for(0, g.R * g.H * g.h, 1, [&](int64_t b, int64_t e) {
      run_layout(a, kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), kT, kT + kv_size, b, e);
    });
    a.q = qc.data_ptr<scalar_t>(), a.kT = kT, a.vT = kT + kv_size;
    a.dout = doc.data_ptr<scalar_t>(), a.out = dq.data_ptr<scalar_t>();
    a.dkT = kT + 2 * kv_size, a.dvT = kT + 2 * kv_size + grad_size;
    a.dk = dk.data_ptr<scalar_t>(), a.dv = dv.data_ptr<scalar_t>();
    parallel_for_flushed(0, g.H, 1, [&](int64_t b, int64_t e) { run_backward(a, b, e); });
  });
  return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type())};
}

}  // namespace rlr::cpu
