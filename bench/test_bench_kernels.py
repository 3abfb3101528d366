"""pytest-benchmark entry points of the kernel suite: ``pytest bench --benchmark-only``.

Every method of bench/kernels.py at the paper's two shapes (batch 4), both ops, forward and
forward+backward, on CUDA when available, else CPU. The default ``pytest`` run (testpaths =
tests) does not collect this folder. A method the installed libraries do not support for a
configuration (NotImplementedError, e.g. FlexAttention's backward on CPU) is skipped with the
reason; any other failure fails the test.
"""
import pytest
import torch

from bench import kernels
from bench.common import Skip

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
METHODS = kernels.methods(DEVICE)
SHAPES = [kernels.KernelShape(4, kernels.HEADS, side, side, d, k) for side, d, k in kernels.PAPER_GRIDS]


def _synchronised(call):
    if DEVICE.type != "cuda":
        return call

    def run():
        result = call()
        torch.cuda.synchronize(DEVICE)
        return result
    return run


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label.replace(" ", "-"))
@pytest.mark.parametrize("mode", kernels.MODES)
@pytest.mark.parametrize("op", kernels.OPS)
@pytest.mark.parametrize("method", list(METHODS))
def test_kernel(benchmark, method, op, mode, shape):
    inputs = kernels.make_inputs(op, shape, DEVICE, torch.float32)
    try:
        prepared = METHODS[method](op, shape, inputs, mode == "fwd+bwd", DEVICE)
    except Skip as skip:
        pytest.skip(str(skip))
    call = _synchronised(kernels.make_call(prepared, mode, inputs))
    try:
        call()   # also compiles where the method compiles
    except NotImplementedError as err:
        pytest.skip(f"unsupported by the installed library: {err}")
    benchmark.group = f"{op} {mode} {shape.label}"
    benchmark.extra_info.update(gflop=kernels.useful_gflop(op, mode, shape), device=DEVICE.type)
    benchmark.pedantic(call, rounds=5, warmup_rounds=1, iterations=1)
