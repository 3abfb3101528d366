"""The LOGIC of the CUDA kernels (csrc/cuda/*.cu), checked on the CPU under an emulation of the CUDA
execution model. It does not measure speed and is NO substitute for running the kernels on a GPU
(tests/test_kernels.py and tests/test_extension.py do that where a GPU is present).

The files nvcc compiles are built with g++ against stand-in CUDA headers (tests/cuda_emulation,
built by tests/_cuda_emulation.py) and run through their real host launchers, so block sizes, grid
sizes and shared-memory sizes are those the host code computes, including the opt-in above 48 KB.
Every thread of a block runs on its own fiber, __syncthreads() is a real barrier, shared memory
is NaN-poisoned at block start, and shadow memory reports races between barriers, reads of
never-written shared memory, accesses outside the launch's shared memory, and threads that skip a
barrier others wait at. What it cannot see: warp-level timing, memory coalescing and bank
conflicts, the GPU's own expf/fma rounding, device memory limits, and races on global memory.

Forward and backward of both ops are compared with rlr_kernels.reference (float64) on the parity
grid's shapes, in float32, float16 and bfloat16; planted bugs (tests/_cuda_emulation.build's
patches) must make the check fail.
"""
import math
from pathlib import Path

import pytest
import torch

import _cuda_emulation as emulation
from _kernel_cases import LOCAL_CASES, MASKED_CASES, TOL, assert_matches, case_inputs, reference_fwd_bwd

pytestmark = pytest.mark.skipif(emulation.compiler() is None,
                                reason="no g++ on PATH: the CUDA emulation compiles csrc/cuda/*.cu with it")

# Beyond the parity grid: several 32-column segments per grid row (w = 70: 3 segments, w = 37: 2),
# R = 2 with a wide window, and L = 99 / 210 (masked: 2 and 4 query blocks, ragged key tiles).
LOCAL_EXTRA = [(1, 1, 3, 70, 8, 5, 2), (2, 1, 5, 37, 40, 11, 2)]
MASKED_EXTRA = [(2, 1, 9, 11, 40, 5, 1), (1, 1, 3, 70, 8, 5, 1)]


@pytest.fixture(scope="session")
def build_cache(request, tmp_path_factory) -> Path:
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    return Path(cache.mkdir("cuda_emulation")) if cache is not None else tmp_path_factory.mktemp("cuda_emulation")


@pytest.fixture(scope="session")
def emulator(build_cache) -> emulation.Emulator:
    return emulation.Emulator(emulation.build(build_cache))


def _compare(emulator, op, case, dtype=torch.float32):
    (q, k, v, grad), grid, window = case_inputs(op, case, dtype)
    got = emulator.forward_backward(op, q, k, v, grad, grid, window)
    want = reference_fwd_bwd(op, q, k, v, grad, grid, window)
    assert_matches(got, want, dtype, *TOL[dtype], label=f"emulated cuda {op} {case} {dtype}")


@pytest.mark.parametrize("op, case", [("local", c) for c in LOCAL_CASES + LOCAL_EXTRA]
                         + [("masked", c) for c in MASKED_CASES + MASKED_EXTRA], ids=str)
def test_logic_matches_reference_fp32(emulator, op, case):
    before = emulator.stats()
    _compare(emulator, op, case)
    after = emulator.stats()
    # The checks really ran: threads on fibers, barriers, and every shared access through the shadow memory.
    assert after["barriers"] > before["barriers"] and after["shared_accesses"] > before["shared_accesses"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op,case", [("local", LOCAL_CASES[0]), ("local", LOCAL_CASES[1]),
                                     ("masked", MASKED_CASES[0]), ("masked", MASKED_CASES[3])], ids=str)
def test_half_precision_logic_matches_reference(emulator, op, case, dtype):
    _compare(emulator, op, case, dtype)


def _all_halves():
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)


def _same_bits_or_both_nan(got, want):
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


@pytest.mark.parametrize("dtype,name", [(torch.float16, "half"), (torch.bfloat16, "bfloat16")])
def test_half_stand_ins_convert_like_torch(emulator, dtype, name):
    """The stand-in __half / __nv_bfloat16 conversions are exact: every 16-bit pattern to float, and
    float to 16 bits rounding to nearest even, on the exact ties between neighbours, one float-ulp
    on either side of them, and random floats."""
    bits = _all_halves()
    _same_bits_or_both_nan(emulator.convert(f"{name}_to_float", bits), bits.view(dtype).float())
    values = bits.view(dtype).double()
    finite = values[torch.isfinite(values)].unique()  # sorted
    ties = ((finite[1:] + finite[:-1]) / 2).float()  # exact in float32
    up, down = torch.tensor(math.inf), torch.tensor(-math.inf)
    near = torch.cat([ties, torch.nextafter(ties, up), torch.nextafter(ties, down)])
    rand = torch.randint(-2**31, 2**31 - 1, (1 << 20,), generator=torch.Generator().manual_seed(0),
                         dtype=torch.int64).to(torch.int32).view(torch.float32)
    floats = torch.cat([near, rand, torch.tensor([0.0, -0.0, math.inf, -math.inf, 1e30, -1e-30, 65520.0, 65519.99])])
    got = emulator.convert(f"float_to_{name}", floats).view(dtype).float()
    _same_bits_or_both_nan(got, floats.to(dtype).float())


def test_shared_memory_above_48kb_takes_the_opt_in_path_up_to_the_device_limit(emulator):
    """Head dim 226 needs 232 448 bytes per block in the masked dq pass (the H100/H200 limit): it goes
    through the launchers' cudaFuncSetAttribute opt-in and runs; 227 is refused with the launcher's
    message instead of launching."""
    case = (1, 1, 1, 7, 226, 3, 1)
    before = emulator.stats()["optin_launches"]
    _compare(emulator, "masked", case)
    assert emulator.stats()["optin_launches"] >= before + 3  # forward, dq and dk/dv passes
    (q, k, v, grad), grid, window = case_inputs("masked", (1, 1, 1, 7, 227, 3, 1), torch.float32)
    out, lse = emulator.masked_forward(q, k, v, grid, window)
    with pytest.raises(emulation.EmulationError, match=r"masked_backward \(dq\): needs 233472 bytes .* allows 232448"):
        emulator.masked_backward(q, k, v, out, lse, grad, grid, window)


def test_launch_and_shared_syntax_it_cannot_rewrite_is_named():
    with pytest.raises(ValueError, match=r"x\.cu:3: .*__shared__ declaration"):
        emulation.translate("// comment with <<< and __shared__\n\n__shared__ float tile[32];\n", "x.cu")
    text = emulation.translate("k<<<dim3(2, 3), 32, 0, s>>>(a, b);\nk2<T><<<1, 1>>>();\n", "y.cu")
    assert text.splitlines()[1:] == ['::emu::launch("y.cu:1 (k)", dim3(2, 3), 32, 0, s)(k, a, b);',
                                     '::emu::launch("y.cu:2 (k2<T>)", 1, 1)(k2<T>);']


# ------------------------------------------------------------------------------------------------
# Negative controls: a planted bug must make the check fail. Each builds a patched copy of one .cu
# file (the other objects come from the cache).

LOCAL_SRC, MASKED_SRC = "local_reference_attention.cu", "masked_key_attention.cu"
WINDOW_LOOP = "for (int kc = window::first(col, s.half); kc <= window::last(col, s.half, s.w); ++kc)"
LOCAL_CASE, MASKED_CASE = (2, 2, 5, 7, 16, 3, 2), (2, 2, 6, 7, 16, 3, 1)

OFF_BY_ONE = {
    # The forward's first window loop (pass 1: max and sum) stops one key column short.
    "local window bound": ("local", LOCAL_CASE, (LOCAL_SRC, WINDOW_LOOP, WINDOW_LOOP.replace("kc <=", "kc <"))),
    # The shared window test (csrc/window.h) uses < instead of <= on the row distance.
    "masked window bound": ("masked", MASKED_CASE, ("window.h", "dr <= half &&", "dr < half &&")),
}

EMULATION_ERRORS = {
    # The barrier between staging a key/value tile and reading it.
    "masked missing barrier after the tile load": (
        "masked", MASKED_CASE,
        (MASKED_SRC, "load_rows(vals, v + bn_off, j0, kKeys, 0, s.L, d);\n    __syncthreads();",
         "load_rows(vals, v + bn_off, j0, kKeys, 0, s.L, d);"),
        r"shared-memory race: thread \d+ writes byte \d+, which was read by thread \d+"),
    # The barrier before overwriting the previous window row's keys.
    "local missing barrier before the tile load": (
        "local", LOCAL_CASE,
        (LOCAL_SRC, "// pass 1: max and sum of exp\n      __syncthreads();", "// pass 1: max and sum of exp"),
        r"shared-memory race: thread \d+ writes byte \d+, which was read by"),
    # Threads past the grid's right edge leave the loop that still holds barriers.
    "local thread skips a barrier": (
        "local", LOCAL_CASE, (LOCAL_SRC, "if (!valid) continue;", "if (!valid) return;"),
        r"wait at __syncthreads\(\) csrc/cuda/local_reference_attention.cu:\d+ but threads 7,8,.* have exited"),
    # The host launcher asks for one span of keys too few.
    "local shared memory too small": (
        "local", LOCAL_CASE,
        (LOCAL_SRC, "sizeof(float) * (2 * kTile + 2 * span_of(s))", "sizeof(float) * (2 * kTile + span_of(s))"),
        r"local_reference_attention.cu:\d+ \(kernel\), block .*: thread \d+ writes 4 bytes at shared-memory offset "
        r"\d+, outside the \d+ bytes the launch gave"),
}


@pytest.mark.parametrize("bug", OFF_BY_ONE, ids=str)
def test_planted_off_by_one_fails_the_parity_check(build_cache, bug):
    op, case, patch = OFF_BY_ONE[bug]
    broken = emulation.Emulator(emulation.build(build_cache, [patch]))
    with pytest.raises(AssertionError, match="emulated cuda"):
        _compare(broken, op, case)


@pytest.mark.parametrize("bug", EMULATION_ERRORS, ids=str)
def test_planted_barrier_and_launch_bugs_are_reported(build_cache, bug):
    op, case, patch, message = EMULATION_ERRORS[bug]
    broken = emulation.Emulator(emulation.build(build_cache, [patch]))
    (q, k, v, grad), grid, window = case_inputs(op, case, torch.float32)
    with pytest.raises(emulation.EmulationError, match=message):
        broken.forward_backward(op, q, k, v, grad, grid, window)
