// Portable SIMD helpers for the CPU kernels: GCC/Clang vector extensions of 16 lanes.
//
// The kernels are written once against `Vec<T>` (16 floats or 16 doubles); the compiler
// lowers each vector operation to the widest instructions of the target. Hot entry points
// carry RLR_CLONES, which on x86-64 with GCC builds one copy per ISA level (AVX-512, AVX2,
// baseline SSE2) and picks the best at load time, so a single build is both fast and portable.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(RLR_NO_CLONES)
#define RLR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RLR_CLONES
#endif
#define RLR_INLINE inline __attribute__((always_inline))

namespace rlr::cpu {

constexpr int kLanes = 16;

// Softmax tails (exp of very negative scores) and their products are subnormal floats, and
// every x86 instruction that reads or writes one takes a microcode assist (~100x slower): a
// trained model with sharp attention ran its step 1.6x slower from this alone. Each worker
// flushes them to zero (FTZ + DAZ) while it runs a kernel and restores its own mode after.
// Only values below 1.2e-38 (float) / 2.2e-308 (double) change, the same way on every thread.
struct FlushDenormals {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

template <typename T>
struct VecTraits;
template <>
struct VecTraits<float> {
  typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
  typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));
};
template <>
struct VecTraits<double> {
  typedef double vec __attribute__((vector_size(kLanes * sizeof(double))));
  typedef int64_t ivec __attribute__((vector_size(kLanes * sizeof(int64_t))));
};

template <typename T>
using Vec = typename VecTraits<T>::vec;

// memcpy keeps the loads and stores unaligned-safe; compilers turn it into one vector move.
template <typename T>
RLR_INLINE Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
RLR_INLINE void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
RLR_INLINE Vec<T> splat(T x) {
  return Vec<T>{} + x;
}

// V is Vec<float> or Vec<double> (deduced directly: Vec<T> itself is not a deducible form).
template <typename V>
RLR_INLINE V vmax(V a, V b) {
  return a > b ? a : b;
}

template <typename V>
RLR_INLINE auto hsum(V v) {
  auto s = v[0];
  for (int i = 1; i < kLanes; ++i) s += v[i];
  return s;
}

template <typename V>
RLR_INLINE auto hmax(V v) {
  auto m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp of every lane. float: Cephes-style range reduction x = n*ln2 + r, |r| <= ln2/2, and a
// degree-6 polynomial for e^r (about 1 ulp), written in plain vector arithmetic so that it
// vectorises (libm's expf does not without -ffast-math). n is rounded to nearest by the
// 1.5 * 2^23 trick, whose float bits also hold n as an integer (no conversions). Inputs are
// clamped to [-87.3, 88.3] (max/min, one instruction each): the result never overflows, and very
// negative inputs give ~1e-38 instead of 0, so callers that need an exact zero (masked keys)
// multiply by their keep mask or overwrite them afterwards.
RLR_INLINE Vec<float> vexp(Vec<float> x) {
  using ivec = VecTraits<float>::ivec;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  x = vmax(x, splat(-87.3f));
  x = x < 88.3f ? x : splat(88.3f);  // min
  const Vec<float> t = x * 1.44269504088896341f + kRound;
  const Vec<float> n = t - kRound;
  x = x - n * 0.693359375f;
  x = x - n * -2.12194440e-4f;
  Vec<float> y = splat(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * (x * x) + x + 1.0f;
  ivec bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits = (bits - 0x4B400000 + 127) << 23;  // the low mantissa bits of t hold n + 2^22
  Vec<float> pow2n;
  std::memcpy(&pow2n, &bits, sizeof(bits));
  return y * pow2n;
}

// float64 is the exactness path (tests, gradcheck), not a speed path: plain libm per lane.
RLR_INLINE Vec<double> vexp(Vec<double> x) {
  Vec<double> y;
  for (int i = 0; i < kLanes; ++i) y[i] = std::exp(x[i] < -745.0 ? -745.0 : x[i]);
  return y;
}

// In-register transpose of a 16 x 16 block (16 vectors of 16 lanes). Four rounds of block swaps:
// round s exchanges, in every 2s x 2s block, the top-right and bottom-left s x s blocks.
#if defined(__GNUC__) && !defined(__clang__)
#define RLR_HAS_TRANSPOSE 1
template <typename IV, int S, bool kLow, size_t... I>
constexpr IV swap_mask(std::index_sequence<I...>) {
  // kLow: row r (bit S clear) keeps its lanes with bit S clear and takes row r+S's lanes c-S for
  // the others; !kLow: row r+S takes row r's lanes c+S and keeps its lanes with bit S set.
  return IV{(kLow ? ((I & S) ? int(kLanes + I - S) : int(I)) : ((I & S) ? int(kLanes + I) : int(I + S)))...};
}

template <int S, typename V>
RLR_INLINE void swap_round(V (&m)[kLanes]) {
  using IV = decltype(m[0] < m[0]);
  constexpr IV lo = swap_mask<IV, S, true>(std::make_index_sequence<kLanes>{});
  constexpr IV hi = swap_mask<IV, S, false>(std::make_index_sequence<kLanes>{});
  for (int r = 0; r < kLanes; ++r) {
    if (r & S) continue;
    const V a = m[r], b = m[r + S];
    m[r] = __builtin_shuffle(a, b, lo);
    m[r + S] = __builtin_shuffle(a, b, hi);
  }
}

template <typename V>
RLR_INLINE void transpose16(V (&m)[kLanes]) {
  swap_round<8>(m);
  swap_round<4>(m);
  swap_round<2>(m);
  swap_round<1>(m);
}
#endif

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols: 16 x 16 blocks transposed in
// registers, scalar for the edges.
template <typename T>
RLR_INLINE void transpose(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  int64_t r0 = 0, c0 = 0;
#ifdef RLR_HAS_TRANSPOSE
  for (; r0 + kLanes <= rows; r0 += kLanes) {
    for (c0 = 0; c0 + kLanes <= cols; c0 += kLanes) {
      Vec<T> m[kLanes];
      for (int u = 0; u < kLanes; ++u) m[u] = load(src + (r0 + u) * lds + c0);
      transpose16(m);
      for (int i = 0; i < kLanes; ++i) store(dst + (c0 + i) * ldd + r0, m[i]);
    }
    for (int64_t r = r0; r < r0 + kLanes; ++r)
      for (int64_t c = c0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
#endif
  for (int64_t r = r0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// (w, d) token rows -> (d, Wx) channel rows, and back.
template <typename T>
RLR_INLINE void to_channels(const T* src, int64_t w, int64_t d, int64_t Wx, T* dst) {
  transpose(src, w, d, d, dst, Wx);
}

template <typename T>
RLR_INLINE void to_tokens(const T* src, int64_t w, int64_t d, int64_t Wx, T* dst) {
  transpose(src, d, w, Wx, dst, d);
}

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

}  // namespace rlr::cpu
