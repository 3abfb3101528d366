"""RLRModel (rlr/model.py) and RLRConfig (rlr/config.py): shapes, windows, positional table,
the reference computed once per forward, and equal results on every kernel backend."""
import json
import math

import pytest
import torch

import rlr_kernels
from rlr_kernels.window import leaves_keys_outside
from rlr import RLRConfig, RLRModel
from rlr.config import FORMAT_VERSION, ConfigError
from rlr.model import RLRLevel, sincos_position_table

TINY = dict(input_size=64, heads=2, layers=2, d_models=(16, 32), windows={8: 3, 4: 3}, backend="reference")


def tiny_model(**overrides) -> RLRModel:
    torch.manual_seed(0)
    return RLRModel(RLRConfig(**dict(TINY, **overrides)), channels=[6, 10])


def tiny_features(batch=3):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 64, 6, generator=gen), torch.randn(batch, 16, 10, generator=gen)]


def test_shapes_and_defaults():
    model = tiny_model()
    assert model.grids == [(8, 8), (4, 4)]
    outputs = model(tiny_features())
    assert [tuple(o.shape) for o in outputs] == [(3, 64, 6), (3, 16, 10)]
    assert tuple(model.levels[1](tiny_features()[1]).shape) == (3, 16, 10)
    # Paper widths: D = 128 * 2**(i-1) for out index i.
    assert RLRConfig().level_d_models() == (256, 512)
    assert RLRConfig(out_indices=(1, 2, 3)).level_d_models() == (128, 256, 512)


def test_wrong_token_shape_names_expected_shape():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\(B, 64, 6\)"):
        model.levels[0](torch.randn(2, 63, 6))
    with pytest.raises(ValueError, match="expected 2 feature levels"):
        model([torch.randn(2, 64, 6)])


def test_window_rule():
    config = RLRConfig()
    assert [config.window_for((s, s)) for s in (16, 32, 64)] == [5, 7, 11]
    assert config.window_for((16, 12)) == 5          # a non-square grid uses its longer side
    with pytest.raises(ConfigError, match="no attention window set for a 8x8"):
        RLRConfig(windows={}).window_for((8, 8))
    with pytest.raises(ConfigError, match="odd"):
        RLRConfig(windows={16: 4})
    # A window that leaves the centre query without keys for the masked attention: refused at build time.
    with pytest.raises(ValueError, match="4x4 token grid"):
        RLRLevel(6, (4, 4), 16, heads=2, layers=1, window=5)


def test_every_grid_side_gets_a_window():
    """Sides the tables lack (320, 384, 448 px inputs and beyond): log-linear in the side between the table's
    entries, odd, and never so large that the masked op loses its keys."""
    paper, fast = RLRConfig(), RLRConfig.from_recipe("fast")
    sides = (8, 12, 20, 24, 28, 40, 48, 56, 80, 96, 128)
    assert [paper.window_for((s, s)) for s in sides] == [3, 5, 5, 7, 7, 9, 9, 11, 13, 13, 15]
    assert [fast.window_for((s, s)) for s in sides] == [1, 3, 3, 5, 5, 7, 7, 9, 11, 11, 13]
    windows = [paper.window_for((s, s)) for s in range(2, 200)]
    assert windows == sorted(windows) and all(k % 2 == 1 for k in windows)   # grows with the grid, odd
    for side in range(1, 40):
        window = paper.window_for((side, side))
        if side > 1:   # a 1x1 grid has no key outside any window: the model refuses it (test above)
            assert leaves_keys_outside(side, side, window), side
    assert RLRConfig(windows={32: 7}).window_for((48, 48)) == 7   # a one-entry table: that window everywhere


def test_a_run_records_the_windows_its_grids_used():
    config = RLRConfig.from_recipe("fast")
    config.record_windows([(48, 48), (24, 24)])
    assert config.windows == {16: 3, 24: 5, 32: 5, 48: 7, 64: 9}
    assert RLRConfig.from_dict(config.to_dict()).window_for((48, 48)) == 7


def test_positional_table_formula():
    d, h, w = 16, 3, 5
    table = sincos_position_table(d, h, w)
    assert table.shape == (h * w, d)
    half = d // 2
    for token in range(h * w):
        row, col = token // w, token % w
        for k in range(d // 4):
            omega = math.exp(-2 * k * math.log(1e4) / half)
            expected = [math.sin(col * omega), math.cos(col * omega), math.sin(row * omega), math.cos(row * omega)]
            got = [table[token, 2 * k], table[token, 2 * k + 1], table[token, half + 2 * k], table[token, half + 2 * k + 1]]
            assert [float(g) for g in got] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_table(18, 2, 2)


def test_reference_embedded_and_projected_once_per_forward():
    model = tiny_model(ref_len=2)
    level = model.levels[0]
    seen = {"embedding": [], "projection": []}
    level.reference_embedding.register_forward_hook(lambda m, i, o: seen["embedding"].append(tuple(i[0].shape)))
    for layer in level.layers:
        layer.reference_proj.register_forward_hook(lambda m, i, o: seen["projection"].append(tuple(i[0].shape)))
    level(torch.randn(5, 64, 6))
    assert seen["embedding"] == [(2 * 64, 6)]                       # once, not per sample
    assert seen["projection"] == [(2, 64, 16)] * len(level.layers)  # once per layer, on the R copies only


def test_kaiming_init_and_reference_init():
    torch.manual_seed(0)
    level = RLRLevel(400, (8, 8), 64, heads=2, layers=1, window=3)
    std = level.embedding.proj.weight.std().item()
    gain = math.sqrt(2.0 / (1 + 0.01 ** 2))   # kaiming normal, leaky_relu, fan_in
    assert std == pytest.approx(gain / math.sqrt(400), rel=0.05)
    assert level.reference.shape == (64, 400)
    assert level.reference.std().item() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("backend", [b for b in rlr_kernels.available_backends("cpu") if b != "reference"])
def test_backends_agree(backend):
    model = tiny_model(ref_len=2)
    features = tiny_features(2)
    outputs = {}
    grads = {}
    for name in ("reference", backend):
        model.set_backend(name)
        model.zero_grad()
        out = model(features)
        sum(o.square().sum() for o in out).backward()
        outputs[name] = [o.detach() for o in out]
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for a, b in zip(outputs["reference"], outputs[backend]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for name, g in grads["reference"].items():
        torch.testing.assert_close(g, grads[backend][name], rtol=1e-3, atol=1e-3, msg=name)


def test_config_roundtrip_and_version(tmp_path):
    config = RLRConfig.from_recipe("fast", input_size=64, windows={8: 3}, d_models=(16, 32))
    assert config.lr == 2e-3 and config.recipe == "fast" and config.schedule == "cosine"
    config.save(tmp_path)
    assert RLRConfig.load(tmp_path) == config
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["format_version"] == FORMAT_VERSION
    data["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="another rlr version"):
        RLRConfig.load(tmp_path)
    with pytest.raises(ConfigError, match="not an rlr run folder"):
        RLRConfig.load(tmp_path / "missing")
    with pytest.raises(ConfigError, match="unknown recipe"):
        RLRConfig.from_recipe("slow")
    assert RLRConfig.from_recipe("paper").to_dict()["lr"] == 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_copy_gives_the_models_reconstructions(dtype):
    """The inference copy (weights in the dtype, every Linear one oneDNN call, the FFN's GELU fused) equals
    the model to float32 rounding, and the bf16 copy the model under bf16 autocast to bf16 rounding; the
    model itself stays as it was."""
    from rlr.inference import bf16_is_native
    from rlr.model import FusedLinear, inference_copy

    if dtype == torch.bfloat16 and not bf16_is_native(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16")
    model = tiny_model(backend=None).eval()   # the fused attention kernels, as inference runs them
    tokens = tiny_features()
    fast = inference_copy(model, "cpu", dtype)
    linears = [m for m in fast.modules() if isinstance(m, FusedLinear)]
    assert linears and not any(isinstance(m, torch.nn.Linear) for m in fast.modules())
    assert sum(m.activation == "gelu" for m in linears) == 2 * 2          # one FFN per layer and level
    assert {p.dtype for p in fast.parameters()} == {dtype} and not any(p.requires_grad for p in fast.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        expected = model(tokens)
    with torch.no_grad():
        got = fast([t.to(dtype) for t in tokens])
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    for g, e in zip(got, expected):
        assert g.dtype == dtype
        assert float((g.float() - e.float()).abs().max() / e.float().abs().max()) < tolerance
