// The window rule of both ops for the C++ CPU and CUDA kernels: the twin of rlr_kernels/window.py
// (DESIGN.md §2-3), which the parity tests hold every kernel to.
//
// Token t of the h x w grid sits at row t / w, column t % w. The window of a query reaches
// `half` = window / 2 rows and columns on each side of it, truncated at the border (never shifted
// inwards); the relation is symmetric. Integer type I: int in the CUDA kernels, int64_t on the CPU.
#pragma once

#ifdef __CUDACC__
#define RLR_WINDOW_FN __host__ __device__ __forceinline__
#else
#define RLR_WINDOW_FN inline
#endif

namespace rlr::window {

template <typename I>
RLR_WINDOW_FN I reach(I window) {
  return window / 2;
}

// First and last position of the window around position x on an axis of `size` positions.
template <typename I>
RLR_WINDOW_FN I first(I x, I half) {
  return x - half > 0 ? x - half : I(0);
}

template <typename I>
RLR_WINDOW_FN I last(I x, I half, I size) {
  return x + half < size - 1 ? x + half : size - 1;
}

// Whether the token at (row_b, col_b) lies in the window of the token at (row_a, col_a).
template <typename I>
RLR_WINDOW_FN bool contains(I row_a, I col_a, I row_b, I col_b, I half) {
  const I dr = row_a - row_b, dc = col_a - col_b;
  return dr <= half && -dr <= half && dc <= half && -dc <= half;
}

template <typename I>
RLR_WINDOW_FN bool is_odd(I window) {
  return window >= 1 && window % 2 == 1;
}

// The largest meaningful window of an h x w grid: any larger one also covers the whole grid.
template <typename I>
RLR_WINDOW_FN I largest(I h, I w) {
  return 2 * (h > w ? h : w) - 1;
}

// Whether every query has a key outside its window, as the masked op needs (the centre query,
// whose window reaches both borders first, is the worst case).
template <typename I>
RLR_WINDOW_FN bool leaves_keys_outside(I h, I w, I window) {
  const I half = reach(window);
  return half < h / 2 || half < w / 2;
}

}  // namespace rlr::window
