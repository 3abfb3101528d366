"""Triton-specific checks on top of the backend parity grid of test_kernels.py: many tiles per
launch (forced small blocks, rows longer than a tile), the batch-split reduction of dk/dv, the
saved lse, dtype rules. The kernels compiled for real GPU targets: tests/test_gpu_builds.py."""
import math

import pytest
import torch

import rlr_kernels
from _kernel_cases import DEVICES, assert_matches, make_inputs, op_fn, reference_fwd_bwd
from rlr_kernels.window import reach, window_mask

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from rlr_kernels.triton import utils  # noqa: E402  (after the skip: it imports triton)

pytestmark = pytest.mark.skipif("triton" not in rlr_kernels.available_backends(),
                                reason="triton backend unavailable (no GPU and TRITON_INTERPRET unset)")


def _kernels():
    from rlr_kernels.triton import local_reference_attention as local_mod, masked_key_attention as masked_mod
    return local_mod, masked_mod


def _run_kernels(op, q, k, v, grad, grid, window, **blocks):
    local_mod, masked_mod = _kernels()
    fwd, bwd = ((local_mod.local_forward, local_mod.local_backward) if op == "local"
                else (masked_mod.masked_forward, masked_mod.masked_backward))
    tiles = {key: blocks[key] for key in ("block_m", "block_n") if key in blocks}
    out, lse = fwd(q, k, v, grid[0], grid[1], window, **tiles)
    dq, dk, dv = bwd(q, k, v, out, lse, grad, grid[0], grid[1], window, **blocks)
    return out, lse, dq, dk, dv


# (op, B, H, h, w, d, window, R, block_m, block_n, splits): tiles of 16 so that every launch has
# several query and key tiles; w > 16 puts one grid row across two tiles; splits > 1 takes the
# fp32-partials path of the batch reduction.
MULTI_TILE_CASES = [
    ("local", 3, 1, 5, 7, 16, 3, 2, 16, 16, 2),
    ("local", 2, 1, 2, 19, 20, 5, 1, 16, 32, 2),
    ("local", 1, 2, 9, 4, 33, 1, 1, 32, 16, None),
    ("local", 2, 1, 6, 6, 16, 11, 3, 16, 16, 3),
    ("masked", 3, 1, 5, 7, 16, 3, 1, 16, 16, 2),
    ("masked", 2, 1, 2, 19, 20, 5, 1, 16, 32, 2),
    ("masked", 1, 2, 9, 4, 33, 1, 1, 32, 16, None),
    ("masked", 2, 1, 7, 6, 16, 5, 1, 16, 16, 4),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", MULTI_TILE_CASES, ids=str)
def test_many_tiles_and_batch_splits_match_reference(device, case):
    op, B, H, h, w, d, window, R, block_m, block_n, splits = case
    q, k, v, grad = make_inputs(op, B, H, h, w, d, R, device=device)
    out, lse, *grads = _run_kernels(op, q, k, v, grad, (h, w), window, block_m=block_m, block_n=block_n,
                                    splits=splits)
    want = reference_fwd_bwd(op, q, k, v, grad, (h, w), window)
    assert_matches([out] + grads, want, q.dtype, 2e-4, 2e-4, label=str(case))


@triton.jit
def _window_probe(Inside, Reach, L, WIDTH, HEIGHT, HALF, BLOCK: tl.constexpr, TOKENS: tl.constexpr):
    # The kernels' window rule for one block of tokens: in_window against every token, and the
    # token range rows_in_reach gives the block.
    start = tl.program_id(0) * BLOCK
    offs_a = start + tl.arange(0, BLOCK)
    offs_b = tl.arange(0, TOKENS)
    inside = utils.in_window(offs_a // WIDTH, offs_a % WIDTH, offs_b // WIDTH, offs_b % WIDTH, HALF)
    tl.store(Inside + offs_a[:, None] * L + offs_b[None, :], inside.to(tl.int8),
             mask=(offs_a[:, None] < L) & (offs_b[None, :] < L))
    lo, hi = utils.rows_in_reach(start, BLOCK, L, WIDTH, HEIGHT, HALF)
    tl.store(Reach + 2 * tl.program_id(0), lo)
    tl.store(Reach + 2 * tl.program_id(0) + 1, hi)


@pytest.mark.parametrize("h,w,window,block", [(5, 7, 3, 16), (2, 19, 5, 16), (6, 6, 11, 16), (1, 7, 3, 16),
                                              (9, 4, 1, 32), (4, 5, 3, 16)])
def test_device_window_rule_is_the_twin_of_the_window_module(h, w, window, block):
    """The window rule inside the Triton kernels (utils.in_window, utils.rows_in_reach) gives what
    rlr_kernels.window gives: the same mask, and exactly the grid rows the block's windows meet."""
    L, blocks = h * w, triton.cdiv(h * w, block)
    inside = torch.zeros(L, L, dtype=torch.int8)
    ranges = torch.zeros(blocks, 2, dtype=torch.int32)
    _window_probe[(blocks,)](inside, ranges, L, w, h, reach(window), BLOCK=block,
                             TOKENS=triton.next_power_of_2(L))
    want = window_mask(h, w, window)
    assert torch.equal(inside.bool(), want)
    for b in range(blocks):
        rows_met = want[b * block:(b + 1) * block].any(0).view(h, w).any(1).nonzero().flatten()
        assert ranges[b].tolist() == [rows_met.min().item() * w, (rows_met.max().item() + 1) * w], b


@pytest.mark.parametrize("op", ["local", "masked"])
def test_lse_is_the_log_sum_exp_of_each_row(op):
    B, H, h, w, d, window, R = 2, 2, 5, 4, 16, 3, 2 if op == "local" else 1
    q, k, v, grad = make_inputs(op, B, H, h, w, d, R)
    _, lse, *_ = _run_kernels(op, q, k, v, grad, (h, w), window, block_m=16, block_n=16)
    inside = window_mask(h, w, window)
    keys = k.double() if op == "local" else k.double()[None]
    scores = torch.einsum("bnid,cnjd->bcnij", q.double(), keys) / math.sqrt(d)
    scores = scores.masked_fill(~inside if op == "local" else inside, float("-inf"))
    want = torch.logsumexp(scores, dim=-1)  # (B, R, H, L)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), want if op == "local" else want[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["local", "masked"])
def test_backward_is_deterministic(device, op):
    q, k, v, grad = make_inputs(op, 3, 1, 5, 5, 16, 2, device=device)
    first = _run_kernels(op, q, k, v, grad, (5, 5), 3, block_m=16, block_n=16, splits=2)
    second = _run_kernels(op, q, k, v, grad, (5, 5), 3, block_m=16, block_n=16, splits=2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["local", "masked"])
def test_float64_is_rejected_with_a_clear_error(op):
    q, k, v, _ = make_inputs(op, 1, 1, 4, 4, 16, 1, dtype=torch.float64)
    with pytest.raises(TypeError, match="triton backend takes float16, bfloat16 or float32"):
        op_fn(op)(q, k, v, grid=(4, 4), window=3, backend="triton")


def test_bad_block_size_is_rejected():
    local_mod, _ = _kernels()
    q, k, v, _ = make_inputs("local", 1, 1, 4, 4, 16, 1)
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        local_mod.local_forward(q, k, v, 4, 4, 3, block_m=24)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", ["local", "masked"])
def test_memory_stays_linear_in_tokens(op):
    """A 64x64 grid (L = 4096): an L x L fp32 score matrix per head would be 64 MiB; the
    kernels must stay far below it (only O(L d) tensors are allocated)."""
    B, H, h, w, d, window = 1, 1, 64, 64, 64, 11
    q, k, v, grad = make_inputs(op, B, H, h, w, d, 1, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _run_kernels(op, q, k, v, grad, (h, w), window)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 8 * 2 ** 20
