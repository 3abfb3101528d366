"""Every backend of both ops against the dense reference, forward and all gradients."""
import dataclasses
import warnings

import pytest
import torch

import rlr_kernels
from rlr_kernels import reference
from rlr_kernels.validate import check_local_args

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FUSED = [b for b in rlr_kernels.BACKENDS if b != "reference"]

# (B, H, h, w, d, window, R): non-square grids, window 1 and >= the grid, R = 1 and 2, batch 1,
# odd head dims. Kept small: the Triton kernels run through the interpreter on CPU.
LOCAL_CASES = [
    (2, 2, 4, 4, 16, 3, 1),
    (1, 1, 3, 5, 16, 3, 2),
    (2, 2, 5, 3, 32, 1, 1),
    (1, 2, 4, 4, 16, 7, 1),
    (2, 1, 2, 6, 24, 9, 2),
    (1, 2, 6, 5, 17, 5, 1),
    (3, 2, 8, 8, 64, 5, 1),
]
MASKED_CASES = [
    (2, 2, 4, 4, 16, 1, 1),
    (1, 1, 3, 5, 16, 3, 1),
    (2, 2, 5, 3, 32, 1, 1),
    (1, 2, 6, 5, 17, 3, 1),
    (3, 2, 8, 8, 64, 5, 1),
    (1, 1, 1, 7, 32, 3, 1),
]
TOL = {torch.float32: (2e-4, 2e-4), torch.float64: (1e-9, 1e-9), torch.bfloat16: (3e-2, 3e-2),
       torch.float16: (5e-3, 5e-3)}


def _skip_unavailable(backend, device):
    if backend not in rlr_kernels.available_backends(device):
        pytest.skip(f"backend {backend} not available on {device}")


def _inputs(op, case, dtype, device, seed=0):
    B, H, h, w, d, window, R = case
    g = torch.Generator().manual_seed(seed)
    L = h * w
    q = torch.randn(B, H, L, d, generator=g)
    if op == "local":
        k = torch.randn(R, H, L, d, generator=g)
        v = torch.randn(R, H, L, d, generator=g)
    else:
        k = torch.randn(H, L, d, generator=g)
        v = torch.randn(B, H, L, d, generator=g)
    grad = torch.randn(B, H, L, d, generator=g)
    to = dict(dtype=dtype, device=device)
    return [t.to(**to) for t in (q, k, v)], grad.to(**to), (h, w), window


def _run(op, backend, tensors, grad, grid, window):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    fn = rlr_kernels.local_reference_attention if op == "local" else rlr_kernels.masked_key_attention
    out = fn(*tensors, grid=grid, window=window, backend=backend)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in tensors]


def _compare(op, backend, case, dtype, device):
    tensors, grad, grid, window = _inputs(op, case, dtype, device)
    got = _run(op, backend, tensors, grad, grid, window)
    # Ground truth in float64 from the very same (possibly rounded) inputs.
    want = _run(op, "reference", [t.double() for t in tensors], grad.double(), grid, window)
    atol, rtol = TOL[dtype]
    for name, g_, w_ in zip(("out", "dq", "dk", "dv"), got, want):
        assert g_.dtype == dtype and g_.shape == w_.shape, name
        torch.testing.assert_close(g_.double(), w_, atol=atol * max(1.0, w_.abs().max().item()), rtol=rtol,
                                   msg=lambda m: f"{backend} {op} {name} {case} {dtype}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", LOCAL_CASES, ids=str)
def test_local_matches_reference_fp32(backend, device, case):
    _skip_unavailable(backend, device)
    _compare("local", backend, case, torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", MASKED_CASES, ids=str)
def test_masked_matches_reference_fp32(backend, device, case):
    _skip_unavailable(backend, device)
    _compare("masked", backend, case, torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op,case", [("local", LOCAL_CASES[0]), ("local", LOCAL_CASES[1]),
                                     ("masked", MASKED_CASES[0]), ("masked", MASKED_CASES[3])], ids=str)
def test_half_precision_matches_reference(backend, device, dtype, op, case):
    _skip_unavailable(backend, device)
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
    _skip_unavailable(backend, "cuda")
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
        tensors, grad, grid, window = _inputs(op, case, torch.float32, "cuda")
        fn = rlr_kernels.local_reference_attention if op == "local" else rlr_kernels.masked_key_attention
        with pytest.raises(RuntimeError, match="batch B=70000 exceeds the CUDA grid limit 65535"):
            fn(*tensors, grid=grid, window=window, backend="cuda")


def test_reference_local_gradcheck():
    tensors, _, grid, window = _inputs("local", (2, 2, 3, 4, 4, 3, 2), torch.float64, "cpu")
    tensors = [t.requires_grad_(True) for t in tensors]
    assert torch.autograd.gradcheck(
        lambda q, k, v: rlr_kernels.local_reference_attention(q, k, v, grid=grid, window=window, backend="reference"),
        tensors)


def test_reference_masked_gradcheck():
    tensors, _, grid, window = _inputs("masked", (2, 2, 3, 4, 4, 1, 1), torch.float64, "cpu")
    tensors = [t.requires_grad_(True) for t in tensors]
    assert torch.autograd.gradcheck(
        lambda q, k, v: rlr_kernels.masked_key_attention(q, k, v, grid=grid, window=window, backend="reference"),
        tensors)


def test_reference_matches_original_formulation():
    """The reference equals nn.MultiheadAttention-style dense float masks, reference repeated per sample."""
    B, H, h, w, d, window = 2, 2, 5, 5, 8, 3
    (q, k, v), _, grid, _ = _inputs("local", (B, H, h, w, d, window, 1), torch.float64, "cpu")
    inside = reference.window_mask(h, w, window)
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
    mask = reference.window_mask(4, 5, 3).view(4, 5, 4, 5)
    assert mask[0, 0].sum() == 4  # corner: 2x2, not shifted to 3x3
    assert mask[1, 1].sum() == 9
    assert mask[0, 2].sum() == 6
    assert mask[3, 4, 2:, 3:].all() and mask[3, 4].sum() == 4


def test_sum_over_reference_copies():
    (q, k, v), _, grid, window = _inputs("local", (1, 2, 4, 4, 8, 3, 2), torch.float64, "cpu")
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
    fn = rlr_kernels.local_reference_attention if op == "local" else rlr_kernels.masked_key_attention
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


@pytest.mark.parametrize("backend", FUSED)
def test_fused_ops_trace_under_torch_compile(backend):
    if backend not in rlr_kernels.available_backends("cpu"):
        pytest.skip(f"{backend} unavailable")
    q, k, v = _good("local")

    def f(q, k, v):
        return rlr_kernels.local_reference_attention(q, k, v, grid=(4, 4), window=3, backend=backend)

    graph_fn = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(graph_fn(q, k, v), f(q, k, v))

    # Under compile the kernel is the opaque custom op (eager mode calls the kernel directly).
    traced = []

    def record(gm, example_inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    torch._dynamo.reset()
    torch.compile(f, backend=record, fullgraph=True)(q, k, v)
    assert any("rlr.local_reference_attention_fwd" in target for target in traced), traced
