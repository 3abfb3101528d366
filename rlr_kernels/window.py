"""The window rule of both ops, in one place (DESIGN.md §2-3): which keys a query sees, and which
grid/window pairs are legal. Every backend and validator asks this module; the kernels that cannot
call Python carry a twin of the bound formula that is tested against it:
``rlr_kernels/triton/utils.py`` (``in_window``, ``rows_in_reach``) and ``csrc/window.h`` (C++/CUDA).

Tokens are numbered row-major on the h x w grid: token t sits at row t // w, column t % w. The
window W(i) of token i holds the tokens j with |row(i) - row(j)| <= k//2 and
|col(i) - col(j)| <= k//2: windows are truncated at the border, never shifted inwards, and the
relation is symmetric (j in W(i) iff i in W(j)).
"""
from __future__ import annotations

import torch


def reach(window: int) -> int:
    """How many rows (and columns) a window extends on each side of its query: k // 2."""
    return window // 2


def in_window(row_a, col_a, row_b, col_b, half: int):
    """Whether the token at (row_b, col_b) lies in the window of the token at (row_a, col_a), for
    broadcastable index tensors (a dense mask, or a FlexAttention ``mask_mod``)."""
    return ((row_a - row_b).abs() <= half) & ((col_a - col_b).abs() <= half)


def window_mask(height: int, width: int, window: int, device=None) -> torch.Tensor:
    """Bool (L, L): ``mask[i, j]`` is True iff token j lies in the window of token i."""
    idx = torch.arange(height * width, device=device)
    row, col = idx // width, idx % width
    return in_window(row[:, None], col[:, None], row[None, :], col[None, :], reach(window))


def window_sizes(height: int, width: int, window: int) -> torch.Tensor:
    """|W(i)| of every token i, the truncated window's size (int64, (L,)), without an L x L mask."""
    half = reach(window)

    def extent(size):  # how many of the positions within `half` of each position lie on the axis
        pos = torch.arange(size)
        return (pos + half).clamp(max=size - 1) - (pos - half).clamp(min=0) + 1

    return (extent(height)[:, None] * extent(width)[None, :]).reshape(-1)


def is_odd_window(window: int) -> bool:
    """A window is a positive odd size (the query sits at its centre)."""
    return window >= 1 and window % 2 == 1


def largest_window(height: int, width: int) -> int:
    """The largest meaningful window of an h x w grid: any larger one also covers the whole grid."""
    return 2 * max(height, width) - 1


def leaves_keys_outside(height: int, width: int, window: int) -> bool:
    """Whether every query has a key outside its window, as the masked op needs. The centre query
    is the worst case: its window reaches the border on both sides first."""
    half = reach(window)
    return half < height // 2 or half < width // 2


def check_grid_window(grid, window, tokens: int) -> tuple[int, int, int]:
    """Validate ``grid=(h, w)`` and the odd ``window`` against the token count L."""
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2):
        raise ValueError(f"grid must be a pair (h, w), got {grid!r}")
    h, w = grid
    if isinstance(h, bool) or isinstance(w, bool) or not all(isinstance(s, int) for s in (h, w)):
        raise TypeError(f"grid must hold two ints, got {grid!r}")
    if h < 1 or w < 1:
        raise ValueError(f"grid sides must be positive, got {grid!r}")
    if h * w != tokens:
        raise ValueError(f"grid {h}x{w} has {h * w} tokens but the inputs have L={tokens} (L must equal h*w)")
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int, got {type(window).__name__}")
    if not is_odd_window(window):
        raise ValueError(f"window must be a positive odd int, got {window}")
    largest = largest_window(h, w)
    if window > largest:
        raise ValueError(
            f"window {window} is oversized for grid {h}x{w}: beyond {largest} every window already covers "
            f"the whole grid"
        )
    return h, w, window


def check_masked_window(height: int, width: int, window: int) -> None:
    """Reject a window that leaves some query of the masked op without a key."""
    if not leaves_keys_outside(height, width, window):
        raise ValueError(
            f"window {window} covers the whole {height}x{width} grid for the centre query, which then has no key "
            f"outside its window: masked_key_attention needs window//2 < max(h//2, w//2)"
        )
