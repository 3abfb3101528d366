"""The compiled backends (rlr_kernels._C: "cpp"; rlr_kernels._C_cuda: "cuda") beyond the parity
grid of test_kernels.py: realistic shapes, thread-count independence, half and double precision,
direct misuse of the compiled modules, and the fallback when the extension is not built."""
import dataclasses
import importlib
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import rlr_kernels
from _kernel_cases import assert_matches, fwd_bwd, make_inputs, needs_backend, op_fn, reference_fwd_bwd
from rlr_kernels import dispatch
from rlr_kernels.window import window_mask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILED = [("cpp", "cpu")] + ([("cuda", "cuda")] if torch.cuda.is_available() else [])


def _assert_matches_reference(op, backend, tensors, grid, window, atol, rtol=None):
    q, k, v, grad = tensors
    got = fwd_bwd(op, backend, q, k, v, grad, grid, window)
    want = reference_fwd_bwd(op, q, k, v, grad, grid, window)
    assert_matches(got, want, q.dtype, atol, atol if rtol is None else rtol, label=f"{backend} {op}")


# Paper shapes (16x16 grid, d=64, window 5; 32x32 grid, d=32, window 7) and awkward ones: wide
# grids (several 16-column tiles), windows spanning 2-3 tiles, L not a multiple of any block size,
# head dims that are not multiples of 16, batches that are not whole blocks of 4 samples, and the
# small head dims of the fast training recipe (8, 16), which take their own code paths.
LOCAL_SHAPES = [  # B, H, h, w, d, window, R
    (2, 8, 16, 16, 64, 5, 1),
    (1, 2, 32, 32, 32, 7, 1),
    (2, 1, 5, 37, 40, 11, 2),
    (1, 1, 7, 20, 8, 19, 1),
    (6, 2, 9, 18, 8, 5, 1),
    (5, 1, 6, 7, 6, 3, 2),
]
MASKED_SHAPES = [  # B, H, h, w, d, window
    (2, 8, 16, 16, 64, 5),
    (1, 2, 32, 32, 32, 7),
    (2, 1, 9, 11, 40, 5),
    (3, 2, 13, 5, 24, 7),
    (2, 2, 12, 20, 8, 5),
    (3, 2, 9, 10, 16, 3),
    (2, 1, 7, 9, 4, 3),
]


@pytest.mark.parametrize("backend,device", COMPILED)
@pytest.mark.parametrize("shape", LOCAL_SHAPES, ids=str)
def test_local_realistic_shapes_fp32(backend, device, shape):
    needs_backend(backend, device)
    B, H, h, w, d, window, R = shape
    tensors = make_inputs("local", B, H, h, w, d, R, device=device)
    _assert_matches_reference("local", backend, tensors, (h, w), window, atol=2e-4)


@pytest.mark.parametrize("backend,device", COMPILED)
@pytest.mark.parametrize("shape", MASKED_SHAPES, ids=str)
def test_masked_realistic_shapes_fp32(backend, device, shape):
    needs_backend(backend, device)
    B, H, h, w, d, window = shape
    tensors = make_inputs("masked", B, H, h, w, d, device=device)
    _assert_matches_reference("masked", backend, tensors, (h, w), window, atol=2e-4)


@pytest.mark.parametrize("backend,device", COMPILED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", ["local", "masked"])
def test_half_precision_paper_shape(backend, device, dtype, op):
    """Half inputs are computed in float32 and match a float64 reference run on the same rounded inputs."""
    needs_backend(backend, device)
    tensors = make_inputs(op, 2, 2, 16, 16, 64, dtype=dtype, device=device)
    _assert_matches_reference(op, backend, tensors, (16, 16), 5, atol=3e-2 if dtype == torch.bfloat16 else 5e-3)


def _needs_amx():
    needs_backend("cpp", "cpu")
    from rlr_kernels import cpp
    if not cpp.masked_amx_available():
        pytest.skip("this CPU has no AMX (or RLR_CPU_AMX=0): bfloat16 masked attention takes the float32 path")


# (B, H, h, w, d, window): the fast recipe's 32x32 level, the 16x16 level, a non-square grid with
# L = 96 and the smallest head dim the AMX path takes, a window cut by the border everywhere, and the
# backward's key tiles: L = 720 in panels of 48 (tiles of 480 and 240 keys), L = 576 with head dim 128
# (a tile of 64 keys; keys packed in two panels of 64).
AMX_SHAPES = [(8, 2, 32, 32, 32, 5), (2, 2, 16, 16, 64, 3), (3, 1, 8, 12, 16, 3), (2, 3, 4, 8, 48, 5),
              (1, 2, 20, 36, 32, 7), (2, 1, 24, 24, 128, 5)]


@pytest.mark.parametrize("shape", AMX_SHAPES, ids=str)
def test_cpp_masked_bfloat16_on_amx_matches_reference(shape):
    """The AMX path (bf16 tile products, P and dS rounded to bf16) matches a float64 reference on the
    same rounded inputs within bfloat16 tolerance, and the float32-compute path within the same."""
    _needs_amx()
    B, H, h, w, d, window = shape
    tensors = make_inputs("masked", B, H, h, w, d, dtype=torch.bfloat16)
    _assert_matches_reference("masked", "cpp", tensors, (h, w), window, atol=3e-2)


def test_cpp_masked_bfloat16_amx_and_float32_paths_agree(monkeypatch):
    _needs_amx()
    tensors = make_inputs("masked", 4, 2, 16, 16, 32, dtype=torch.bfloat16)
    amx = fwd_bwd("masked", "cpp", *tensors, (16, 16), 5)
    monkeypatch.setenv("RLR_CPU_AMX", "0")
    from rlr_kernels import cpp
    assert not cpp.masked_amx_available()
    plain = fwd_bwd("masked", "cpp", *tensors, (16, 16), 5)
    for name, a, b in zip(("out", "dq", "dk", "dv"), amx, plain):
        assert not torch.equal(a, b) or name == "out", f"{name}: both runs took the same path?"
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2 * scale, rtol=2e-2, msg=lambda m: f"{name}: {m}")


def test_cpp_masked_bfloat16_amx_sharp_attention_and_thread_count():
    """Sharp attention (most probabilities far below 1e-38) stays finite and matches the reference;
    the AMX path is bitwise independent of the thread count like the other kernels."""
    _needs_amx()
    q, k, v, grad = make_inputs("masked", 2, 2, 16, 16, 32, dtype=torch.bfloat16)
    q = (q.float() * 40).bfloat16()
    _assert_matches_reference("masked", "cpp", (q, k, v, grad), (16, 16), 3, atol=3e-2)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(fwd_bwd("masked", "cpp", q, k, v, grad, (16, 16), 3))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for name, a, b in zip(("out", "dq", "dk", "dv"), results[0], other):
            assert torch.equal(a, b), f"{name} differs between thread counts"


@pytest.mark.parametrize("op", ["local", "masked"])
def test_cpp_float64_is_exact(op):
    """float64 runs in float64 end to end (the backward re-derives the softmax statistics instead
    of reading the float32 lse), so it matches the reference to ~1e-12."""
    needs_backend("cpp", "cpu")
    tensors = make_inputs(op, 2, 2, 6, 7, 12, R=2 if op == "local" else 1, dtype=torch.float64)
    _assert_matches_reference(op, "cpp", tensors, (6, 7), 5, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("op", ["local", "masked"])
def test_cpp_gradcheck(op):
    needs_backend("cpp", "cpu")
    q, k, v, _ = make_inputs(op, 2, 1, 3, 4, 5, R=2 if op == "local" else 1, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *a: op_fn(op)(*a, grid=(3, 4), window=3, backend="cpp"), leaves)


THREAD_CASES = [("local", None, 3, 4, (12, 21)), ("local", None, 1, 1, (1, 7)),
                ("masked", "kernel", 3, 4, (12, 21)), ("masked", "kernel", 1, 1, (1, 7)),
                ("masked", "flash", 3, 4, (12, 21)), ("masked", "flash", 1, 1, (1, 7)),
                ("masked", "flash", 1, 1, (5, 9))]


@pytest.mark.parametrize("op,path,B,H,grid", THREAD_CASES, ids=str)
def test_cpp_results_do_not_depend_on_thread_count(op, path, B, H, grid, monkeypatch):
    """Bitwise, on every path; a single (sample, head) is the case where ATen's own GEMMs would
    spread over the threads (the flash path's 1x7 and 5x9 grids differed before it ran them on one)."""
    needs_backend("cpp", "cpu")
    from rlr_kernels import cpp
    if path == "flash" and B * H > 1 and cpp.masked_float32_path() != "flash":
        # ATen's flash backward gives a dk that depends on the thread count on AVX-512 CPUs (3.6e-7 apart on an
        # Intel Xeon with AMX): the cpp backend takes this path only on CPUs without AVX-512, where it does not.
        pytest.skip("the flash path is not this CPU's path; its batch-parallel dk is thread-count independent only "
                    "on the CPUs that take it (without AVX-512)")
    if path:
        monkeypatch.setenv("RLR_CPU_MASKED", path)
    tensors = make_inputs(op, B, H, *grid, 24, R=2 if op == "local" else 1)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(fwd_bwd(op, "cpp", *tensors, grid, 3 if grid[0] < 5 else 5))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for name, a, b in zip(("out", "dq", "dk", "dv"), results[0], other):
            assert torch.equal(a, b), f"{op} {path} {name} differs between thread counts"


def test_cpp_flash_path_keeps_one_bounded_set_of_window_masks_for_all_threads(monkeypatch):
    """The flash path's (L, L) masks live in one cache for the process: eight threads calling with one geometry hold
    one mask between them (they held one each for the thread's lifetime), more geometries than the bound give up the
    oldest, and a call with its mask built anew gives the same bits as one with the mask kept."""
    from concurrent.futures import ThreadPoolExecutor

    needs_backend("cpp", "cpu")
    from rlr_kernels import cpp

    monkeypatch.setenv("RLR_CPU_MASKED", "flash")
    cpp.masked_flash_mask_cache_clear()
    q, k, v, _ = make_inputs("masked", 2, 2, 12, 12, 16)
    with ThreadPoolExecutor(max_workers=8) as pool:
        outs = list(pool.map(lambda _: cpp.masked_forward(q, k, v, 12, 12, 5)[0], range(16)))
    assert cpp.masked_flash_mask_cache() == (1, 144 * 144 * 4)
    assert all(torch.equal(out, outs[0]) for out in outs)
    cpp.masked_flash_mask_cache_clear()
    assert torch.equal(cpp.masked_forward(q, k, v, 12, 12, 5)[0], outs[0])
    for side in (4, 5, 6, 7, 8, 9):
        small = make_inputs("masked", 1, 1, side, side, 8)[:3]
        cpp.masked_forward(*small, side, side, 3)
    masks, held = cpp.masked_flash_mask_cache()
    assert masks == 4 and held == sum(4 * (s * s) ** 2 for s in (6, 7, 8, 9))   # the four most recent
    cpp.masked_flash_mask_cache_clear()
    assert cpp.masked_flash_mask_cache() == (0, 0)


@pytest.mark.parametrize("op", ["local", "masked"])
def test_cpp_sharp_attention_flushes_subnormals_only_inside_the_kernels(op):
    """Scores ~100 apart put most probabilities below the float32 normal range: the kernels flush
    those subnormals to zero (they are ~1e-38 of the row's weight) and still match the reference,
    and the caller's floating-point mode is left as it was (subnormals still exist afterwards)."""
    needs_backend("cpp", "cpu")
    q, k, v, _ = make_inputs(op, 2, 2, 8, 8, 16, R=2 if op == "local" else 1)
    q = q * 40.0
    _assert_matches_reference(op, "cpp", (q, k, v, _), (8, 8), 3, atol=2e-4, rtol=2e-4)
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    assert (tiny * 1.0).item() != 0.0 and (tiny + 0.0).item() != 0.0


def test_cpp_lse_is_the_log_sum_exp_of_the_window_scores():
    needs_backend("cpp", "cpu")
    from rlr_kernels import cpp
    q, k, v, _ = make_inputs("local", 2, 2, 5, 6, 8, R=2)
    _, lse = cpp.local_forward(q, k, v, 5, 6, 3)
    inside = window_mask(5, 6, 3)
    scores = torch.einsum("bnid,cnjd->bcnij", q.double(), k.double()) / 8 ** 0.5
    want = scores.masked_fill(~inside, float("-inf")).logsumexp(-1)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 2, 30)
    torch.testing.assert_close(lse.double(), want, atol=1e-5, rtol=1e-5)
    qm, km, vm, _ = make_inputs("masked", 2, 2, 5, 6, 8)
    _, lse = cpp.masked_forward(qm, km, vm, 5, 6, 3)
    scores = torch.einsum("bnid,njd->bnij", qm.double(), km.double()) / 8 ** 0.5
    torch.testing.assert_close(lse.double(), scores.masked_fill(inside, float("-inf")).logsumexp(-1),
                               atol=1e-5, rtol=1e-5)


def test_compiled_module_rejects_misuse_with_a_clear_error():
    """Direct callers of rlr_kernels._C bypass the Python checks: they get errors, not crashes."""
    needs_backend("cpp", "cpu")
    from rlr_kernels import cpp
    q, k, v, _ = make_inputs("local", 1, 2, 4, 4, 8)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        cpp.local_forward(q.transpose(2, 3), k, v, 4, 4, 3)
    with pytest.raises(RuntimeError, match="does not match L"):
        cpp.local_forward(q, k, v, 4, 5, 3)
    with pytest.raises(RuntimeError, match="odd"):
        cpp.local_forward(q, k, v, 4, 4, 2)
    with pytest.raises(RuntimeError, match="k must have shape"):
        cpp.local_forward(q, k[:, :1].contiguous(), v[:, :1].contiguous(), 4, 4, 3)
    with pytest.raises(RuntimeError, match="dtype"):
        cpp.local_forward(q, k.double(), v.double(), 4, 4, 3)
    qm, km, vm, _ = make_inputs("masked", 1, 2, 4, 4, 8)
    with pytest.raises(RuntimeError, match="no key outside"):
        cpp.masked_forward(qm, km, vm, 4, 4, 5)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        cpp.masked_forward(qm.long(), km.long(), vm.long(), 4, 4, 3)


@pytest.mark.parametrize("op", ["local", "masked"])
def test_cpp_backward_checks_out_lse_and_grad_out(op):
    """The checks the compiled modules share (csrc/checks.h): the backward's out, lse and grad_out too."""
    needs_backend("cpp", "cpu")
    from rlr_kernels import cpp
    q, k, v, grad = make_inputs(op, 2, 2, 4, 4, 8)
    out, lse = getattr(cpp, f"{op}_forward")(q, k, v, 4, 4, 3)
    backward = getattr(cpp, f"{op}_backward")
    for args, match in (((out, lse.half(), grad), "lse must be float32"),
                        ((out, lse[:1].contiguous(), grad), "lse must have shape"),
                        ((out.half(), lse, grad), "out has dtype Half but q has Float"),
                        ((out, lse, grad.to("meta")), "grad_out must be a CPU tensor"),
                        ((out, lse, grad[:1].contiguous()), "grad_out must have the shape of q")):
        with pytest.raises(RuntimeError, match=match):
            backward(q, k, v, *args, 4, 4, 3)
    with pytest.raises(RuntimeError, match="q is empty"):
        getattr(cpp, f"{op}_forward")(q[:0], k, v, 4, 4, 3)


def test_cuda_module_rejects_cpu_tensors():
    try:
        from rlr_kernels import cuda
    except ImportError:
        pytest.skip("rlr_kernels._C_cuda is not built")
    q, k, v, _ = make_inputs("local", 1, 1, 4, 4, 8)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        cuda.local_forward(q, k, v, 4, 4, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rejects_float64_with_not_implemented():
    needs_backend("cuda", "cuda")
    q, k, v, _ = make_inputs("local", 1, 1, 4, 4, 8, dtype=torch.float64, device="cuda")
    with pytest.raises(NotImplementedError, match="float32, float16, bfloat16"):
        rlr_kernels.local_reference_attention(q, k, v, grid=(4, 4), window=3, backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", ["local", "masked"])
def test_cuda_backward_checks_out_lse_and_grad_out(op):
    needs_backend("cuda", "cuda")
    from rlr_kernels import cuda
    q, k, v, grad = make_inputs(op, 2, 2, 4, 4, 8, device="cuda")
    out, lse = getattr(cuda, f"{op}_forward")(q, k, v, 4, 4, 3)
    backward = getattr(cuda, f"{op}_backward")
    for args, match in (((out, lse.cpu(), grad), "lse is on cpu but q is on cuda"),
                        ((out, lse.half(), grad), "lse must be float32"),
                        ((out, lse[:1].contiguous(), grad), "lse must have shape"),
                        ((out.half(), lse, grad), "out has dtype Half but q has Float"),
                        ((out, lse, grad.cpu()), "grad_out must be a CUDA tensor"),
                        ((out, lse, grad[:1].contiguous()), "grad_out must have the shape of q")):
        with pytest.raises(RuntimeError, match=match):
            backward(q, k, v, *args, 4, 4, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", ["local", "masked"])
def test_cuda_is_deterministic(op):
    needs_backend("cuda", "cuda")
    tensors = make_inputs(op, 2, 4, 16, 16, 64, device="cuda")
    first = fwd_bwd(op, "cuda", *tensors, (16, 16), 5)
    second = fwd_bwd(op, "cuda", *tensors, (16, 16), 5)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# Missing build: importing rlr_kernels.cpp says how to build it; dispatch warns once and falls back.


def _simulate_missing_extension(monkeypatch):
    import rlr_kernels as package
    monkeypatch.setitem(sys.modules, "rlr_kernels._C", None)  # `from . import _C` -> ImportError
    monkeypatch.delitem(sys.modules, "rlr_kernels.cpp", raising=False)
    monkeypatch.delattr(package, "_C", raising=False)
    monkeypatch.delattr(package, "cpp", raising=False)
    monkeypatch.setitem(dispatch._FUSED, "cpp", dataclasses.replace(dispatch._FUSED["cpp"], _kernels=None))
    monkeypatch.setattr(dispatch, "_warned", set())


def test_missing_extension_import_error_says_how_to_build(monkeypatch):
    _simulate_missing_extension(monkeypatch)
    with pytest.raises(ImportError, match=r"pip install --no-build-isolation -e \."):
        importlib.import_module("rlr_kernels.cpp")


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    _simulate_missing_extension(monkeypatch)
    q, k, v, _ = make_inputs("local", 1, 2, 4, 4, 8)
    assert "cpp" not in rlr_kernels.available_backends("cpu")
    with pytest.warns(RuntimeWarning, match=r"'cpp' unavailable.*falling back.*pip install --no-build-isolation"):
        out = rlr_kernels.local_reference_attention(q, k, v, grid=(4, 4), window=3)
    want = rlr_kernels.local_reference_attention(q, k, v, grid=(4, 4), window=3, backend="reference")
    torch.testing.assert_close(out, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once, not on every call
        rlr_kernels.masked_key_attention(q, k[0], q, grid=(4, 4), window=1)
    with pytest.raises(ValueError, match=r"backend 'cpp' cannot run here.*pip install"):
        rlr_kernels.local_reference_attention(q, k, v, grid=(4, 4), window=3, backend="cpp")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="needs nvcc")
def test_cuda_sources_compile():
    """What CI runs directly (.ci/compile_cuda.sh): every CUDA source compiles (about a minute)."""
    result = subprocess.run(["bash", os.path.join(REPO, ".ci", "compile_cuda.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
