"""Every backend of both ops against the dense reference, forward and all gradients."""
import dataclasses
import warnings

import pytest
import torch

import rlr_kernels
from _kernel_cases import (DEVICES, GRADIENTS, LOCAL_CASES, MASKED_CASES, TOL, assert_matches, case_inputs, fwd_bwd,
                           make_inputs, needs_backend, op_fn, reference_fwd_bwd)
from rlr_kernels.validate import check_local_args
from rlr_kernels.window import largest_window, leaves_keys_outside, window_mask, window_sizes

FUSED = [b for b in rlr_kernels.BACKENDS if b != "reference"]


def _compare(op, backend, case, dtype, device):
    (q, k, v, grad), grid, window = case_inputs(op, case, dtype, device)
    got = fwd_bwd(op, backend, q, k, v, grad, grid, window)
    # Ground truth in float64 from the very same (possibly rounded) inputs.
    want = reference_fwd_bwd(op, q, k, v, grad, grid, window)
    assert_matches(got, want, dtype, *TOL[dtype], label=f"{backend} {op} {case} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", LOCAL_CASES, ids=str)
def test_local_matches_reference_fp32(backend, device, case):
    needs_backend(backend, device)
    _compare("local", backend, case, torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", MASKED_CASES, ids=str)
def test_masked_matches_reference_fp32(backend, device, case):
    needs_backend(backend, device)
    _compare("masked", backend, case, torch.float32, device)


@pytest.mark.parametrize("path", ["kernel", "flash"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", MASKED_CASES, ids=str)
def test_cpp_masked_matches_reference_on_both_cpu_paths(path, dtype, case, monkeypatch):
    """The cpp backend's masked op has two CPU paths (the C++ kernel; ATen's CPU flash attention where
    AVX-512 is missing): each is held to the reference, whichever this CPU takes by default."""
    needs_backend("cpp", "cpu")
    monkeypatch.setenv("RLR_CPU_MASKED", path)
    _compare("masked", "cpp", case, dtype, "cpu")


def test_cpp_masked_path_override_is_checked(monkeypatch):
    needs_backend("cpp", "cpu")
    monkeypatch.setenv("RLR_CPU_MASKED", "fast")
    (q, k, v, _), grid, window = case_inputs("masked", MASKED_CASES[0], torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="RLR_CPU_MASKED must be 'kernel' or 'flash', got 'fast'"):
        rlr_kernels.masked_key_attention(q, k, v, grid=grid, window=window, backend="cpp")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op,case", [("local", LOCAL_CASES[0]), ("local", LOCAL_CASES[1]),
                                     ("masked", MASKED_CASES[0]), ("masked", MASKED_CASES[3])], ids=str)
def test_half_precision_matches_reference(backend, device, dtype, op, case):
    needs_backend(backend, device)
    try:
        _compare(op, backend, case, dtype, device)
    except NotImplementedError as err:
        pytest.skip(str(err))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", ["local", "masked"])
def test_batch_times_heads_past_the_cuda_grid_limit(backend, op):
    """B*H = 70400 programs on one grid axis, more than CUDA's 65535 on y/z, with a batch-summed dk."""
    needs_backend(backend, "cuda")
    _compare(op, backend, (1100, 64, 4, 4, 16, 3, 1), torch.float32, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", ["local", "masked"])
def test_batch_past_the_cuda_grid_limit(op):
    """B = 70000: Triton computes it; the CUDA kernels (batch on gridDim.z) refuse it by name."""
    case = (70000, 1, 4, 4, 16, 3, 1)
    if "triton" in rlr_kernels.available_backends("cuda"):
        _compare(op, "triton", case, torch.bfloat16, "cuda")
    if "cuda" in rlr_kernels.available_backends("cuda"):
        (q, k, v, _), grid, window = case_inputs(op, case, torch.float32, "cuda")
        with pytest.raises(RuntimeError, match="batch B=70000 exceeds the CUDA grid limit 65535"):
            op_fn(op)(q, k, v, grid=grid, window=window, backend="cuda")


def test_reference_local_gradcheck():
    (*tensors, _), grid, window = case_inputs("local", (2, 2, 3, 4, 4, 3, 2), torch.float64)
    tensors = [t.requires_grad_(True) for t in tensors]
    assert torch.autograd.gradcheck(
        lambda q, k, v: rlr_kernels.local_reference_attention(q, k, v, grid=grid, window=window, backend="reference"),
        tensors)


def test_reference_masked_gradcheck():
    (*tensors, _), grid, window = case_inputs("masked", (2, 2, 3, 4, 4, 1, 1), torch.float64)
    tensors = [t.requires_grad_(True) for t in tensors]
    assert torch.autograd.gradcheck(
        lambda q, k, v: rlr_kernels.masked_key_attention(q, k, v, grid=grid, window=window, backend="reference"),
        tensors)


def test_reference_matches_original_formulation():
    """The reference equals nn.MultiheadAttention-style dense float masks, reference repeated per sample."""
    B, H, h, w, d, window = 2, 2, 5, 5, 8, 3
    (q, k, v, _), grid, _ = case_inputs("local", (B, H, h, w, d, window, 1), torch.float64)
    inside = window_mask(h, w, window)
    local_mask = torch.zeros(h * w, h * w, dtype=torch.float64).masked_fill(~inside, float("-inf"))
    k_rep, v_rep = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
    want = torch.nn.functional.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=local_mask)
    got = rlr_kernels.local_reference_attention(q, k, v, grid=grid, window=window, backend="reference")
    torch.testing.assert_close(got, want)
    masked_mask = torch.zeros(h * w, h * w, dtype=torch.float64).masked_fill(inside, float("-inf"))
    want = torch.nn.functional.scaled_dot_product_attention(q, k_rep, q, attn_mask=masked_mask)
    got = rlr_kernels.masked_key_attention(q, k[0], q, grid=grid, window=window, backend="reference")
    torch.testing.assert_close(got, want)


def test_window_mask_truncates_at_border():
    mask = window_mask(4, 5, 3).view(4, 5, 4, 5)
    assert mask[0, 0].sum() == 4  # corner: 2x2, not shifted to 3x3
    assert mask[1, 1].sum() == 9
    assert mask[0, 2].sum() == 6
    assert mask[3, 4, 2:, 3:].all() and mask[3, 4].sum() == 4


SMALL_GRIDS = [(h, w) for h in range(1, 6) for w in range(1, 6)]


def _odd_windows(h, w):
    return range(1, largest_window(h, w) + 1, 2)


def test_window_sizes_count_the_mask_and_the_largest_window_covers_the_grid():
    for h, w in SMALL_GRIDS:
        for k in _odd_windows(h, w):
            assert torch.equal(window_sizes(h, w, k), window_mask(h, w, k).sum(1)), (h, w, k)
        assert window_mask(h, w, largest_window(h, w)).all()
        assert largest_window(h, w) == 1 or not window_mask(h, w, largest_window(h, w) - 2).all()


def test_masked_legality_is_every_query_keeps_a_key_outside_its_window():
    """leaves_keys_outside (the masked op's rule, in rlr_kernels.window and csrc/window.h) against a
    brute force over every query, and the cpp module's check against the Python one."""
    cpp = None
    if "cpp" in rlr_kernels.available_backends("cpu"):
        from rlr_kernels import cpp
    for h, w in SMALL_GRIDS:
        for k in _odd_windows(h, w):
            legal = bool((~window_mask(h, w, k)).any(1).all())
            assert leaves_keys_outside(h, w, k) == legal, (h, w, k)
            if cpp is not None:
                q, kk, v, _ = make_inputs("masked", 1, 1, h, w, 4)
                try:
                    cpp.masked_forward(q, kk, v, h, w, k)
                    accepted = True
                except RuntimeError as err:
                    assert "no key outside its window" in str(err)
                    accepted = False
                assert accepted == legal, (h, w, k)


def test_sum_over_reference_copies():
    (q, k, v, _), grid, window = case_inputs("local", (1, 2, 4, 4, 8, 3, 2), torch.float64)
    both = rlr_kernels.local_reference_attention(q, k, v, grid=grid, window=window, backend="reference")
    each = sum(rlr_kernels.local_reference_attention(q, k[c:c + 1], v[c:c + 1], grid=grid, window=window,
                                                     backend="reference") for c in range(2))
    torch.testing.assert_close(both, each)


# ------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, for every backend.

def _good(op):
    q = torch.randn(2, 2, 16, 8)
    if op == "local":
        return q, torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    return q, torch.randn(2, 16, 8), torch.randn(2, 2, 16, 8)


BAD_CALLS = [
    ("local", lambda q, k, v: (q[0], k, v), dict(grid=(4, 4), window=3), ValueError, "q must have rank 4"),
    ("local", lambda q, k, v: (q, k[..., :4], v), dict(grid=(4, 4), window=3), ValueError, "k and v"),
    ("local", lambda q, k, v: (q, k[:, :1], v[:, :1]), dict(grid=(4, 4), window=3), ValueError, "k must have shape"),
    ("local", lambda q, k, v: (q, k, v), dict(grid=(4, 4), window=4), ValueError, "odd"),
    ("local", lambda q, k, v: (q, k, v), dict(grid=(4, 4), window=0), ValueError, "odd"),
    ("local", lambda q, k, v: (q, k, v), dict(grid=(4, 4), window=9), ValueError, "oversized"),
    ("local", lambda q, k, v: (q, k, v), dict(grid=(4, 5), window=3), ValueError, "L must equal h\\*w"),
    ("local", lambda q, k, v: (q, k, v), dict(grid=16, window=3), ValueError, "grid must be a pair"),
    ("local", lambda q, k, v: (q, k, v), dict(grid=(4, 4), window=3.0), TypeError, "window must be an int"),
    ("local", lambda q, k, v: (q, k.double(), v.double()), dict(grid=(4, 4), window=3), TypeError, "dtype"),
    ("local", lambda q, k, v: (q.long(), k, v), dict(grid=(4, 4), window=3), TypeError, "floating"),
    ("local", lambda q, k, v: (q, k.to("meta"), v), dict(grid=(4, 4), window=3), ValueError, "device"),
    ("local", lambda q, k, v: (q.numpy(), k, v), dict(grid=(4, 4), window=3), TypeError, "q must be a torch.Tensor"),
    ("masked", lambda q, k, v: (q, k[None], v), dict(grid=(4, 4), window=3), ValueError, "k must have rank 3"),
    ("masked", lambda q, k, v: (q, k, v[:1]), dict(grid=(4, 4), window=3), ValueError, "v must have the shape of q"),
    ("masked", lambda q, k, v: (q, k[:1], v), dict(grid=(4, 4), window=3), ValueError, "k must have shape"),
    ("masked", lambda q, k, v: (q, k, v), dict(grid=(4, 4), window=5), ValueError, "no key"),
    ("masked", lambda q, k, v: (q, k, v), dict(grid=(4, 4), window=2), ValueError, "odd"),
    ("masked", lambda q, k, v: (q, k, v), dict(grid=(2, 8), window=3), ValueError, None),  # valid: no error
]


@pytest.mark.parametrize("backend", rlr_kernels.BACKENDS)
@pytest.mark.parametrize("op,mutate,kwargs,error,match", BAD_CALLS)
def test_bad_input_is_rejected(backend, op, mutate, kwargs, error, match):
    fn = op_fn(op)
    args = mutate(*_good(op))
    if match is None:
        if backend not in rlr_kernels.available_backends("cpu"):
            pytest.skip(f"{backend} unavailable")
        fn(*args, backend=backend, **kwargs)
        return
    with pytest.raises(error, match=match):
        fn(*args, backend=backend, **kwargs)


def test_unknown_and_unavailable_backend():
    q, k, v = _good("local")
    with pytest.raises(ValueError, match="backend must be one of"):
        rlr_kernels.local_reference_attention(q, k, v, grid=(4, 4), window=3, backend="fast")
    with pytest.raises(ValueError, match="cannot run here"):
        rlr_kernels.local_reference_attention(q, k, v, grid=(4, 4), window=3, backend="cuda")


def test_default_backend_is_fused_on_cpu_when_built():
    from rlr_kernels.dispatch import resolve_backend
    name = resolve_backend(None, torch.device("cpu"))
    assert name == ("cpp" if "cpp" in rlr_kernels.available_backends("cpu") else "reference")


def _pretend_loaded(monkeypatch, **available):
    """Make the fused backends named True look available on CPU and CUDA, the others missing."""
    from rlr_kernels import dispatch
    for name, loaded in available.items():
        fake = dataclasses.replace(dispatch._FUSED[name], devices=("cpu", "cuda"), requirement=lambda device: None,
                                   _kernels=object() if loaded else None,
                                   _import_error=None if loaded else "pretend it is not built")
        monkeypatch.setitem(dispatch._FUSED, name, fake)
    monkeypatch.setattr(dispatch, "_warned", set())
    return dispatch


def test_default_order_on_cuda_is_triton_then_cuda_then_reference(monkeypatch):
    cuda = torch.device("cuda")   # a device object only: nothing runs
    dispatch = _pretend_loaded(monkeypatch, triton=True, cuda=True)
    assert dispatch.resolve_backend(None, cuda, torch.float32) == "triton"
    dispatch = _pretend_loaded(monkeypatch, triton=False, cuda=True)
    with pytest.warns(RuntimeWarning, match=r"'triton' unavailable \(.*not built\); falling back"):
        assert dispatch.resolve_backend(None, cuda, torch.bfloat16) == "cuda"
    dispatch = _pretend_loaded(monkeypatch, triton=False, cuda=False)
    with pytest.warns(RuntimeWarning) as record:
        assert dispatch.resolve_backend(None, cuda, torch.float16) == "reference"
    assert ["'triton' unavailable" in str(record[0].message), "'cuda' unavailable" in str(record[1].message)] == [True] * 2
    assert "pip install" in str(record[1].message) and "pip install" not in str(record[0].message)


def test_float64_on_cuda_falls_back_to_reference_with_one_warning_each(monkeypatch):
    cuda = torch.device("cuda")
    dispatch = _pretend_loaded(monkeypatch, triton=True, cuda=True)
    with pytest.warns(RuntimeWarning) as record:
        assert dispatch.resolve_backend(None, cuda, torch.float64) == "reference"
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert "'triton' unavailable (it takes float16, bfloat16, float32, not torch.float64)" in messages[0]
    assert "'cuda' unavailable (it takes float16, bfloat16, float32, not torch.float64)" in messages[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # once per backend and reason, not on every call
        assert dispatch.resolve_backend(None, cuda, torch.float64) == "reference"
        assert dispatch.resolve_backend(None, cuda, torch.float32) == "triton"


@pytest.mark.skipif("cpp" not in rlr_kernels.available_backends("cpu"), reason="needs the cpp backend")
def test_a_dtype_the_backend_lacks_falls_back_instead_of_raising(monkeypatch):
    """Through the public op: a backend without float64 (as triton and cuda are) is skipped."""
    from rlr_kernels import dispatch
    monkeypatch.setitem(dispatch._FUSED, "cpp", dataclasses.replace(dispatch._FUSED["cpp"], dtypes=(torch.float32,)))
    monkeypatch.setattr(dispatch, "_warned", set())
    q, k, v = (t.double() for t in _good("local"))
    with pytest.warns(RuntimeWarning, match=r"'cpp' unavailable \(it takes float32, not torch.float64\); falling back\.$"):
        out = rlr_kernels.local_reference_attention(q, k, v, grid=(4, 4), window=3)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, rlr_kernels.local_reference_attention(q, k, v, grid=(4, 4), window=3,
                                                                         backend="reference"))
    assert dispatch.resolve_backend(None, torch.device("cpu"), torch.float32) == "cpp"


def test_validation_reports_sizes():
    shape = check_local_args(*_good("local"), (4, 4), 3)
    assert (shape.batch, shape.heads, shape.tokens, shape.head_dim, shape.copies) == (2, 2, 16, 8, 1)


@pytest.mark.parametrize("backend", FUSED + [None], ids=str)
@pytest.mark.parametrize("op", ["local", "masked"])
def test_fused_ops_compile_forward_and_backward(op, backend):
    """Both ops under torch.compile (inductor, fullgraph), forward and all gradients equal eager mode's;
    the graph holds the opaque custom ops of forward and backward (backend=None resolves while tracing)."""
    name = backend or rlr_kernels.dispatch.resolve_backend(None, torch.device("cpu"), torch.float32)
    if name == "reference":
        pytest.skip("no fused backend on this machine")
    needs_backend(name, "cpu")
    case = (LOCAL_CASES if op == "local" else MASKED_CASES)[3]
    (q, k, v, grad), grid, window = case_inputs(op, case, torch.float32, "cpu")

    def f(q, k, v):   # ops around the kernel, so that inductor has something to fuse on either side
        return op_fn(op)(q * 1.5, k, v.sin(), grid=grid, window=window, backend=backend).relu()

    torch._dynamo.reset()
    got = fwd_bwd_of(torch.compile(f, fullgraph=True), q, k, v, grad)   # inductor
    want = fwd_bwd_of(f, q, k, v, grad)
    for label, a, b in zip(GRADIENTS, got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{op} {label}: {m}")

    # What the forward and backward graphs call: the custom ops (eager mode calls the kernels directly).
    from torch._dynamo.backends.common import aot_autograd
    traced = []

    def record(gm, example_inputs):
        traced.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    fwd_bwd_of(torch.compile(f, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True),
               q, k, v, grad)
    assert any(f"rlr.{op_name(op)}_fwd" in t for t in traced), traced
    assert any(f"rlr.{op_name(op)}_bwd" in t for t in traced), traced


def fwd_bwd_of(fn, q, k, v, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def op_name(op):
    return "local_reference_attention" if op == "local" else "masked_key_attention"


@pytest.mark.parametrize("op", ["local", "masked"])
def test_custom_ops_pass_torch_library_opcheck(op):
    """The registered ops' schema, fake (meta) kernels and AOT dispatch, as torch.library checks them."""
    needs_backend("cpp", "cpu")
    from rlr_kernels import dispatch
    forward, backward = dispatch._CUSTOM_OPS[op]
    case = (LOCAL_CASES if op == "local" else MASKED_CASES)[1]
    (q, k, v, grad), (h, w), window = case_inputs(op, case, torch.float32, "cpu")
    out, lse = forward(q, k, v, h, w, window, "cpp")
    for fn, args in ((forward, (q, k, v, h, w, window, "cpp")),
                     (backward, (q, k, v, out, lse, grad, h, w, window, "cpp"))):
        torch.library.opcheck(fn, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static",
                                                    "test_aot_dispatch_dynamic"))
