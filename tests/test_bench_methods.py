"""bench/kernels.py plumbing (not timing): the rlr-cpp-noamx method runs the cpp backend with the
AMX path off for the forward and the backward, and leaves the environment as it found it."""
import os

import pytest
import torch

from bench import kernels
from bench.common import Skip


def test_noamx_method_is_listed_exactly_where_the_amx_path_exists():
    assert ("rlr-cpp-noamx" in kernels.methods(torch.device("cpu"))) == kernels._cpu_amx_available()


def test_environment_is_set_around_forward_and_backward_and_restored(monkeypatch):
    monkeypatch.delenv("RLR_CPU_AMX", raising=False)
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", os.environ.get("RLR_CPU_AMX")))
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            seen.append(("backward", os.environ.get("RLR_CPU_AMX")))
            return grad * 2

    x = torch.ones(3, requires_grad=True)
    prepared = kernels.Prepared(lambda: Probe.apply(x), [x], environment={"RLR_CPU_AMX": "0"})
    kernels.make_call(prepared, "fwd+bwd", {"grad": torch.ones(3)})()
    kernels.make_call(prepared, "fwd", {"grad": torch.ones(3)})()
    assert seen == [("forward", "0"), ("backward", "0"), ("forward", "0")]
    assert "RLR_CPU_AMX" not in os.environ


def test_noamx_method_skips_other_dtypes_and_matches_cpp_in_bfloat16():
    if not kernels._cpu_amx_available():
        pytest.skip("no AMX path on this CPU")
    build = kernels.methods(torch.device("cpu"))["rlr-cpp-noamx"]
    shape = kernels.KernelShape(2, 2, 16, 16, 32, 5)
    with pytest.raises(Skip, match="bfloat16 only"):
        build("masked", shape, kernels.make_inputs("masked", shape, torch.device("cpu"), torch.float32), True,
              torch.device("cpu"))
    inputs = kernels.make_inputs("masked", shape, torch.device("cpu"), torch.bfloat16)
    plain = kernels.make_call(build("masked", shape, inputs, True, torch.device("cpu")), "fwd+bwd", inputs)()
    amx_build = kernels.methods(torch.device("cpu"))["rlr-cpp"]
    amx = kernels.make_call(amx_build("masked", shape, inputs, True, torch.device("cpu")), "fwd+bwd", inputs)()
    for a, b in zip(amx, plain):
        assert not torch.equal(a, b)   # two different code paths ...
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2 * max(1.0, b.abs().max().item()), rtol=3e-2)


def test_the_other_masked_path_is_listed_and_runs_it():
    """rlr-cpp-kernel where the cpp backend's masked op defaults to ATen's flash attention (no AVX-512), rlr-cpp-flash
    where it defaults to the kernel: the two paths of the same op side by side, close to each other."""
    from rlr_kernels import cpp

    other = {"flash": "kernel", "kernel": "flash"}[cpp.masked_float32_path()]
    table = kernels.methods(torch.device("cpu"))
    assert f"rlr-cpp-{other}" in table and "rlr-cpp" in table
    shape = kernels.KernelShape(2, 2, 8, 12, 16, 5)
    inputs = kernels.make_inputs("masked", shape, torch.device("cpu"), torch.float32)
    with pytest.raises(Skip, match="one path"):
        table[f"rlr-cpp-{other}"]("local", shape, inputs, True, torch.device("cpu"))
    results = [kernels.make_call(table[name]("masked", shape, inputs, True, torch.device("cpu")), "fwd+bwd", inputs)()
               for name in ("rlr-cpp", f"rlr-cpp-{other}")]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_recipe_step_rows_use_each_recipes_backbone_features():
    from bench import end_to_end

    shapes = end_to_end.model_shapes(True, torch.device("cpu"), "train_step")
    recipes = {s.recipe: s for s in shapes if s.recipe != "paper"}
    assert (recipes["fast"].backbone, recipes["fast"].channels) == ("lite0", (40, 112))
    assert (recipes["wide"].backbone, recipes["wide"].channels, recipes["wide"].batch) == ("lite2", (48, 120), 8)
    assert recipes["wide"].label == "lite2 wide recipe B8 [32x32x48, 16x16x120]"
