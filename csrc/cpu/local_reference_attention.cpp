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
// Backward: the window scores are recomputed in full, so the softmax statistics (and, for several
// reference copies, each copy's D = sum_j P dP) are re-derived exactly rather than read back from
// the float32 lse; float64 inputs therefore stay float64-exact. dk/dv are gathered per key
// segment from shifted loads of the tile's dS / P (no overlapping read-modify-writes, which would
// stall on store forwarding). One task per head owns that head's dk/dv and sums the batch into
// them in a fixed order: no races, no per-sample partial buffers, and results that do not depend
// on the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace rlr::cpu {
namespace {

// Layouts (T = float, or double for float64 inputs):
//  - keys / values: (R, H, h, d, Wk), key column x at x + half, zero elsewhere. Channels are Wk
//    apart, a whole number of vectors, so every channel row starts 64-byte aligned.
//  - query rows: each task transposes its (w, d) query row (and grad_out row) into a thread-local
//    (d, Wx) buffer, query column x at x + pad, zero elsewhere, and its result back.
//  - S / G scratch: one padded row of P entries per window offset, 16 lanes at pad .. pad+15,
//    zeros around them, so that shifted loads (the dk/dv gather) read zeros past the tile.
//  - dk / dv: (R, H, h, d, Wd), key column x at x + half (Wd >= Wk: room for whole segments).
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
  int64_t B, R, H, h, w, d, k, half, tiles, Wq, Wk, segments, Wd, pad, Wx, P;
  T scale;

  int64_t kv_offset(int64_t c, int64_t n) const { return (c * H + n) * h * d * Wk; }
  int64_t grad_offset(int64_t c, int64_t n) const { return (c * H + n) * h * d * Wd; }
  int64_t token_row(int64_t b, int64_t n, int64_t r) const { return ((b * H + n) * h * w + r * w) * d; }
};

// Per-thread scratch: S (scores, then probabilities) and G (dP, then scale * dS) for one tile,
// the per-offset lane masks, and three (d, Wx) row buffers. Pads are zeroed once and never written.
template <typename T>
struct Scratch {
  std::vector<T> S, G, bias, keep, x, y, o;
  explicit Scratch(const LocalArgs<T>& a)
      : S(a.k * a.k * a.P), G(a.k * a.k * a.P), bias(a.k * kLanes), keep(a.k * kLanes), x(a.d * a.Wx),
        y(a.d * a.Wx), o(a.d * a.Wx) {}
};

// (w, d) token rows -> (d, Wx) channel rows, and back, in 16 x 16 blocks transposed in registers
// (scalar for the edges).
template <typename T>
RLR_INLINE void to_channels(const T* src, int64_t w, int64_t d, int64_t Wx, T* dst) {
  int64_t col0 = 0, c0 = 0;
#ifdef RLR_HAS_TRANSPOSE
  for (; col0 + kLanes <= w; col0 += kLanes) {
    for (c0 = 0; c0 + kLanes <= d; c0 += kLanes) {
      Vec<T> m[kLanes];
      for (int u = 0; u < kLanes; ++u) m[u] = load(src + (col0 + u) * d + c0);
      transpose16(m);
      for (int i = 0; i < kLanes; ++i) store(dst + (c0 + i) * Wx + col0, m[i]);
    }
    for (int64_t col = col0; col < col0 + kLanes; ++col)
      for (int64_t c = c0; c < d; ++c) dst[c * Wx + col] = src[col * d + c];
  }
#endif
  for (int64_t col = col0; col < w; ++col)
    for (int64_t c = 0; c < d; ++c) dst[c * Wx + col] = src[col * d + c];
}

template <typename T>
RLR_INLINE void to_tokens(const T* src, int64_t w, int64_t d, int64_t Wx, T* dst) {
  int64_t col0 = 0, c0 = 0;
#ifdef RLR_HAS_TRANSPOSE
  for (; col0 + kLanes <= w; col0 += kLanes) {
    for (c0 = 0; c0 + kLanes <= d; c0 += kLanes) {
      Vec<T> m[kLanes];
      for (int i = 0; i < kLanes; ++i) m[i] = load(src + (c0 + i) * Wx + col0);
      transpose16(m);
      for (int u = 0; u < kLanes; ++u) store(dst + (col0 + u) * d + c0, m[u]);
    }
    for (int64_t col = col0; col < col0 + kLanes; ++col)
      for (int64_t c = c0; c < d; ++c) dst[col * d + c] = src[c * Wx + col];
  }
#endif
  for (int64_t col = col0; col < w; ++col)
    for (int64_t c = 0; c < d; ++c) dst[col * d + c] = src[c * Wx + col];
}

// Window geometry of one tile: query row r, query columns c0 .. c0+15.
struct Tile {
  int64_t r, c0, r_lo, nrows, valid_q;
};

template <typename T>
RLR_INLINE Tile make_tile(const LocalArgs<T>& a, int64_t r, int64_t tile, T* bias, T* keep) {
  Tile t;
  t.r = r;
  t.c0 = tile * kLanes;
  t.r_lo = std::max<int64_t>(0, r - a.half);
  t.nrows = std::min<int64_t>(a.h - 1, r + a.half) - t.r_lo + 1;
  t.valid_q = std::min<int64_t>(kLanes, a.w - t.c0);
  // Lane u at offset column dc looks at key column c0 + u + dc - half. Off-grid keys are masked;
  // lanes past the last query column stay unmasked (their rows stay finite) and are dropped.
  for (int64_t dc = 0; dc < a.k; ++dc) {
    for (int64_t u = 0; u < kLanes; ++u) {
      const int64_t col = t.c0 + u + dc - a.half;
      const bool ok = (col >= 0 && col < a.w) || u >= t.valid_q;
      bias[dc * kLanes + u] = ok ? T(0) : neg_inf<T>();
      keep[dc * kLanes + u] = ok ? T(1) : T(0);
    }
  }
  return t;
}

// out[i] = sum_c x[c] * y[c, i] for NB consecutive window columns: x is loaded once per channel
// for NB products (NB accumulators stay in registers). out rows are P apart.
template <int NB, typename T>
RLR_INLINE void dots_block(int64_t d, const T* x, int64_t xs, const T* y, int64_t ys, T* out, int64_t P) {
  Vec<T> acc[NB];
  for (int i = 0; i < NB; ++i) acc[i] = Vec<T>{};
  for (int64_t c = 0; c < d; ++c) {
    const Vec<T> xv = load(x + c * xs);
    for (int i = 0; i < NB; ++i) acc[i] += xv * load(y + c * ys + i);
  }
  for (int i = 0; i < NB; ++i) store(out + i * P, acc[i]);
}

// out[o] = sum_c x[c] * y[c, window offset o]: 16 lanes of dot products per window offset.
// x is a query tile in a row buffer, y the key-side tensor of one head, out an S/G buffer.
// Window columns go in blocks of up to 7 (a whole paper window of 5 or 7 in one block).
template <typename T>
RLR_INLINE void window_dots(const LocalArgs<T>& a, const Tile& t, const T* x, const T* y, T* out) {
  const int64_t k = a.k, d = a.d, Wk = a.Wk, Wx = a.Wx, P = a.P, pad = a.pad;
  for (int64_t ra = 0; ra < t.nrows; ++ra) {
    const T* yrow = y + (t.r_lo + ra) * d * Wk + t.c0;
    T* orow = out + ra * k * P + pad;
    for (int64_t dc = 0; dc < k; dc += 7) {
      const T* yb = yrow + dc;
      T* ob = orow + dc * P;
      switch (std::min<int64_t>(7, k - dc)) {
        case 1: dots_block<1>(d, x, Wx, yb, Wk, ob, P); break;
        case 2: dots_block<2>(d, x, Wx, yb, Wk, ob, P); break;
        case 3: dots_block<3>(d, x, Wx, yb, Wk, ob, P); break;
        case 4: dots_block<4>(d, x, Wx, yb, Wk, ob, P); break;
        case 5: dots_block<5>(d, x, Wx, yb, Wk, ob, P); break;
        case 6: dots_block<6>(d, x, Wx, yb, Wk, ob, P); break;
        default: dots_block<7>(d, x, Wx, yb, Wk, ob, P); break;
      }
    }
  }
}

// acc[c] (+)= sum_o weights[o] * y[c, window offset o] for channels c0 .. c0+NC-1.
template <int NC, typename T>
RLR_INLINE void combine_block(const LocalArgs<T>& a, const Tile& t, const T* weights, const T* y, int64_t c0,
                              T* acc, bool accumulate) {
  const int64_t k = a.k, d = a.d, Wk = a.Wk, Wx = a.Wx, P = a.P, pad = a.pad;
  Vec<T> s[NC];
  for (int i = 0; i < NC; ++i) s[i] = accumulate ? load(acc + (c0 + i) * Wx) : Vec<T>{};
  for (int64_t ra = 0; ra < t.nrows; ++ra) {
    const T* yrow = y + (t.r_lo + ra) * d * Wk + c0 * Wk + t.c0;
    const T* wrow = weights + ra * k * P + pad;
    for (int64_t dc = 0; dc < k; ++dc) {
      const Vec<T> wv = load(wrow + dc * P);
      for (int i = 0; i < NC; ++i) s[i] += wv * load(yrow + i * Wk + dc);
    }
  }
  for (int i = 0; i < NC; ++i) store(acc + (c0 + i) * Wx, s[i]);
}

// acc[c] (+)= sum_o weights[o] * y[c, o] over all channels; acc is a tile of a row buffer.
template <typename T>
RLR_INLINE void window_combine(const LocalArgs<T>& a, const Tile& t, const T* weights, const T* y, T* acc,
                               bool accumulate) {
  int64_t c = 0;
  for (; c + 8 <= a.d; c += 8) combine_block<8>(a, t, weights, y, c, acc, accumulate);
  for (; c < a.d; ++c) combine_block<1>(a, t, weights, y, c, acc, accumulate);
}

// Masked softmax of the scaled scores over the window offsets of every lane, in place: S holds
// raw dot products on entry and probabilities on exit; m and l give lse = m + log l.
template <typename T>
RLR_INLINE void window_softmax(const LocalArgs<T>& a, const Tile& t, T* S, const T* bias, const T* keep,
                               Vec<T>& m, Vec<T>& l) {
  const int64_t k = a.k, P = a.P, pad = a.pad;
  m = splat(neg_inf<T>());
  for (int64_t ra = 0; ra < t.nrows; ++ra)
    for (int64_t dc = 0; dc < k; ++dc) {
      T* s = S + (ra * k + dc) * P + pad;
      const Vec<T> x = load(s) * a.scale + load(bias + dc * kLanes);
      store(s, x);
      m = vmax(m, x);
    }
  l = Vec<T>{};
  for (int64_t ra = 0; ra < t.nrows; ++ra)
    for (int64_t dc = 0; dc < k; ++dc) {
      T* s = S + (ra * k + dc) * P + pad;
      const Vec<T> p = vexp(load(s) - m) * load(keep + dc * kLanes);
      store(s, p);
      l += p;
    }
  const Vec<T> inv = splat(T(1)) / l;
  for (int64_t o = 0; o < t.nrows * k; ++o) {
    T* s = S + o * P + pad;
    store(s, load(s) * inv);
  }
}

// One tile of queries, all reference copies. x: the tile's q, o: its output (row buffers).
template <typename T>
RLR_INLINE void local_forward_tile(const LocalArgs<T>& a, int64_t b, int64_t n, const Tile& t, const T* x, T* o,
                                   Scratch<T>& sc) {
  const int64_t L = a.h * a.w;
  for (int64_t c = 0; c < a.R; ++c) {
    const T* kc = a.kT + a.kv_offset(c, n);
    const T* vc = a.vT + a.kv_offset(c, n);
    window_dots(a, t, x, kc, sc.S.data());
    Vec<T> m, l;
    window_softmax(a, t, sc.S.data(), sc.bias.data(), sc.keep.data(), m, l);
    float* lse = a.lse + ((b * a.R + c) * a.H + n) * L + t.r * a.w + t.c0;
    for (int64_t u = 0; u < t.valid_q; ++u) lse[u] = static_cast<float>(m[u] + std::log(l[u]));
    window_combine(a, t, sc.S.data(), vc, o, c > 0);
  }
}

// dk[c, key] += sum_o G[o] * x[c] and dv[c, key] += sum_o S[o] * y[c] for channels c0 .. c0+NC-1,
// one 16-key segment at a time. Key lane j of segment s takes, from window column dc, query lane
// 16s + j - dc: a shifted load of the zero-padded G / S rows and of the row buffers, so every
// key segment is written once per tile.
template <int NC, typename T>
RLR_INLINE void gather_block(const LocalArgs<T>& a, const Tile& t, const T* S, const T* G, const T* x, const T* y,
                             T* dk, T* dv, int64_t c0) {
  const int64_t k = a.k, d = a.d, Wx = a.Wx, Wd = a.Wd, P = a.P, pad = a.pad;
  for (int64_t ra = 0; ra < t.nrows; ++ra) {
    for (int64_t seg = 0; seg < a.segments; ++seg) {
      Vec<T> gk[NC], gv[NC];
      for (int i = 0; i < NC; ++i) gk[i] = Vec<T>{}, gv[i] = Vec<T>{};
      for (int64_t dc = 0; dc < k; ++dc) {
        const int64_t shift = seg * kLanes - dc;
        const Vec<T> ds = load(G + (ra * k + dc) * P + pad + shift);
        const Vec<T> p = load(S + (ra * k + dc) * P + pad + shift);
        for (int i = 0; i < NC; ++i) {
          gk[i] += ds * load(x + (c0 + i) * Wx + shift);
          gv[i] += p * load(y + (c0 + i) * Wx + shift);
        }
      }
      const int64_t base = (t.r_lo + ra) * d * Wd + t.c0 + seg * kLanes;
      for (int i = 0; i < NC; ++i) {
        T* dkp = dk + base + (c0 + i) * Wd;
        T* dvp = dv + base + (c0 + i) * Wd;
        store(dkp, load(dkp) + gk[i]);
        store(dvp, load(dvp) + gv[i]);
      }
    }
  }
}

// Backward of one tile, all copies. x: the tile's q, y: its grad_out, dq: its dq (row buffers).
template <typename T>
RLR_INLINE void local_backward_tile(const LocalArgs<T>& a, int64_t b, int64_t n, const Tile& t, const T* x,
                                    const T* y, T* dq, Scratch<T>& sc) {
  const int64_t k = a.k, P = a.P, pad = a.pad;
  Vec<T> query_keep{};
  for (int64_t u = 0; u < t.valid_q; ++u) query_keep[u] = T(1);
  T* S = sc.S.data();
  T* G = sc.G.data();
  const int64_t noff = t.nrows * k;
  for (int64_t c = 0; c < a.R; ++c) {
    const T* kc = a.kT + a.kv_offset(c, n);
    const T* vc = a.vT + a.kv_offset(c, n);
    window_dots(a, t, x, kc, S);
    Vec<T> m, l;
    window_softmax(a, t, S, sc.bias.data(), sc.keep.data(), m, l);
    window_dots(a, t, y, vc, G);  // dP
    Vec<T> D{};
    for (int64_t o = 0; o < noff; ++o) {
      T* s = S + o * P + pad;
      const Vec<T> p = load(s) * query_keep;
      store(s, p);
      D += p * load(G + o * P + pad);
    }
    // G = scale * dS, so that dq = G k and dk = G^T q need no further scaling.
    for (int64_t o = 0; o < noff; ++o) {
      T* g = G + o * P + pad;
      store(g, (load(S + o * P + pad) * a.scale) * (load(g) - D));
    }
    window_combine(a, t, G, kc, dq, c > 0);
    T* dk = a.dkT + a.grad_offset(c, n);
    T* dv = a.dvT + a.grad_offset(c, n);
    int64_t ch = 0;
    for (; ch + 4 <= a.d; ch += 4) gather_block<4>(a, t, S, G, x, y, dk, dv, ch);
    for (; ch < a.d; ++ch) gather_block<1>(a, t, S, G, x, y, dk, dv, ch);
  }
}

// Entry points compiled once per ISA level (RLR_CLONES). Forward task: one query row of one
// (sample, head); backward task: one head, all samples in order (it owns that head's dk / dv).
template <typename T>
RLR_INLINE void forward_tasks(const LocalArgs<T>& a, int64_t begin, int64_t end) {
  Scratch<T> sc(a);
  T* x = sc.x.data() + a.pad;
  T* o = sc.o.data() + a.pad;
  for (int64_t id = begin; id < end; ++id) {
    const int64_t r = id % a.h, bn = id / a.h, b = bn / a.H, n = bn % a.H;
    to_channels(a.q + a.token_row(b, n, r), a.w, a.d, a.Wx, x);
    for (int64_t tile = 0; tile < a.tiles; ++tile) {
      const Tile t = make_tile(a, r, tile, sc.bias.data(), sc.keep.data());
      local_forward_tile(a, b, n, t, x + t.c0, o + t.c0, sc);
    }
    to_tokens(o, a.w, a.d, a.Wx, a.out + a.token_row(b, n, r));
  }
}

template <typename T>
RLR_INLINE void backward_tasks(const LocalArgs<T>& a, int64_t begin, int64_t end) {
  Scratch<T> sc(a);
  T* x = sc.x.data() + a.pad;
  T* y = sc.y.data() + a.pad;
  T* o = sc.o.data() + a.pad;
  for (int64_t n = begin; n < end; ++n) {
    for (int64_t b = 0; b < a.B; ++b) {
      for (int64_t r = 0; r < a.h; ++r) {
        to_channels(a.q + a.token_row(b, n, r), a.w, a.d, a.Wx, x);
        to_channels(a.dout + a.token_row(b, n, r), a.w, a.d, a.Wx, y);
        for (int64_t tile = 0; tile < a.tiles; ++tile) {
          const Tile t = make_tile(a, r, tile, sc.bias.data(), sc.keep.data());
          local_backward_tile(a, b, n, t, x + t.c0, y + t.c0, o + t.c0, sc);
        }
        to_tokens(o, a.w, a.d, a.Wx, a.out + a.token_row(b, n, r));
      }
    }
  }
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

void run_forward(const LocalArgs<float>& a, int64_t b, int64_t e) { local_forward_f32(a, b, e); }
void run_forward(const LocalArgs<double>& a, int64_t b, int64_t e) { local_forward_f64(a, b, e); }
void run_backward(const LocalArgs<float>& a, int64_t b, int64_t e) { local_backward_f32(a, b, e); }
void run_backward(const LocalArgs<double>& a, int64_t b, int64_t e) { local_backward_f64(a, b, e); }

struct Geometry {
  int64_t B, R, H, L, d, h, w, k, half, tiles, Wq, Wk, segments, Wd, pad, Wx, P;
};

Geometry check_and_measure(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t height,
                           int64_t width, int64_t window) {
  check_input(q, "q", 4, q);
  check_input(k, "k", 4, q);
  check_input(v, "v", 4, q);
  Geometry g;
  g.B = q.size(0), g.H = q.size(1), g.L = q.size(2), g.d = q.size(3), g.R = k.size(0);
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(1) == g.H && k.size(2) == g.L && k.size(3) == g.d, "k must have shape (R, ", g.H, ", ", g.L,
              ", ", g.d, "), got ", k.sizes());
  TORCH_CHECK(g.B >= 1 && g.R >= 1 && g.H >= 1 && g.d >= 1, "empty input");
  check_grid(g.L, height, width, window);
  g.h = height, g.w = width;
  // Window offsets past the grid touch no key: clip them (the result is the same).
  g.k = std::min<int64_t>(window, 2 * std::max(height, width) - 1);
  g.half = g.k / 2;
  g.tiles = (width + kLanes - 1) / kLanes;
  g.Wq = g.tiles * kLanes;
  g.Wk = (g.Wq + 2 * g.half + kLanes - 1) / kLanes * kLanes;  // channel rows start 64-byte aligned
  // A tile's keys span 16 + k - 1 columns: that many 16-lane segments in the dk/dv gather.
  g.segments = (kLanes + g.k - 1 + kLanes - 1) / kLanes;
  g.Wd = g.Wq + (g.segments - 1) * kLanes;
  // Zero lanes in front of row buffers and S/G rows for loads shifted back by up to k - 1,
  // rounded to whole vectors so that unshifted loads stay aligned.
  g.pad = (g.k - 1 + kLanes - 1) / kLanes * kLanes;
  g.Wx = g.pad + g.Wq + (g.segments - 1) * kLanes;
  g.P = g.pad + g.segments * kLanes;
  return g;
}

// (N, H, L, d) -> zero-padded row-channel-major (N, H, h, d, width_padded), column x at x + shift.
at::Tensor channel_major(const at::Tensor& x, const Geometry& g, int64_t width_padded, int64_t shift,
                         at::ScalarType ct) {
  const int64_t N = x.size(0);
  auto y = at::zeros({N, g.H, g.h, g.d, width_padded}, x.options().dtype(ct));
  y.narrow(4, shift, g.w).copy_(x.view({N, g.H, g.h, g.w, g.d}).permute({0, 1, 2, 4, 3}));
  return y;
}

// Inverse of channel_major: (N, H, h, d, width_padded) -> (N, H, L, d) of dtype `dtype`.
at::Tensor token_major(const at::Tensor& y, const Geometry& g, int64_t shift, at::ScalarType dtype) {
  const int64_t N = y.size(0);
  auto x = at::empty({N, g.H, g.h, g.w, g.d}, y.options().dtype(dtype));
  x.copy_(y.narrow(4, shift, g.w).permute({0, 1, 2, 4, 3}));
  return x.view({N, g.H, g.L, g.d});
}

template <typename T>
LocalArgs<T> make_args(const Geometry& g) {
  LocalArgs<T> a{};
  a.B = g.B, a.R = g.R, a.H = g.H, a.h = g.h, a.w = g.w, a.d = g.d, a.k = g.k, a.half = g.half;
  a.tiles = g.tiles, a.Wq = g.Wq, a.Wk = g.Wk, a.segments = g.segments, a.Wd = g.Wd, a.pad = g.pad, a.Wx = g.Wx;
  a.P = g.P;
  a.scale = T(1) / std::sqrt(T(g.d));
  return a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> local_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 int64_t height, int64_t width, int64_t window) {
  const Geometry g = check_and_measure(q, k, v, height, width, window);
  const auto ct = compute_dtype(q);
  auto qc = q.to(ct).contiguous();
  auto kT = channel_major(k, g, g.Wk, g.half, ct);
  auto vT = channel_major(v, g, g.Wk, g.half, ct);
  auto out = at::empty_like(qc);
  auto lse = at::empty({g.B, g.R, g.H, g.L}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES(ct, "rlr_local_forward", [&] {
    auto a = make_args<scalar_t>(g);
    a.q = qc.data_ptr<scalar_t>(), a.kT = kT.data_ptr<scalar_t>(), a.vT = vT.data_ptr<scalar_t>();
    a.out = out.data_ptr<scalar_t>(), a.lse = lse.data_ptr<float>();
    at::parallel_for(0, g.B * g.H * g.h, 1, [&](int64_t b, int64_t e) { run_forward(a, b, e); });
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_backward(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& out,
                                                              const at::Tensor& lse, const at::Tensor& grad_out,
                                                              int64_t height, int64_t width, int64_t window) {
  const Geometry g = check_and_measure(q, k, v, height, width, window);
  check_input(grad_out, "grad_out", 4, q);
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "grad_out must have the shape of q ", q.sizes(), ", got ",
              grad_out.sizes());
  const auto ct = compute_dtype(q);
  auto qc = q.to(ct).contiguous();
  auto doc = grad_out.to(ct).contiguous();
  auto kT = channel_major(k, g, g.Wk, g.half, ct);
  auto vT = channel_major(v, g, g.Wk, g.half, ct);
  auto dq = at::empty_like(qc);
  auto dkT = at::zeros({g.R, g.H, g.h, g.d, g.Wd}, q.options().dtype(ct));
  auto dvT = at::zeros_like(dkT);
  AT_DISPATCH_FLOATING_TYPES(ct, "rlr_local_backward", [&] {
    auto a = make_args<scalar_t>(g);
    a.q = qc.data_ptr<scalar_t>(), a.kT = kT.data_ptr<scalar_t>(), a.vT = vT.data_ptr<scalar_t>();
    a.dout = doc.data_ptr<scalar_t>(), a.out = dq.data_ptr<scalar_t>();
    a.dkT = dkT.data_ptr<scalar_t>(), a.dvT = dvT.data_ptr<scalar_t>();
    at::parallel_for(0, g.H, 1, [&](int64_t b, int64_t e) { run_backward(a, b, e); });
  });
  return {dq.to(q.scalar_type()), token_major(dkT, g, g.half, q.scalar_type()),
          token_major(dvT, g, g.half, q.scalar_type())};
}

}  // namespace rlr::cpu
