"""rlr/backbone.py: offline weights, local weights files, random init (tests), preprocessing."""
import numpy as np
import pytest
import torch

from rlr.backbone import (IMAGENET_MEAN, IMAGENET_STD, RANDOM_WEIGHTS, BackboneError, create_backbone,
                          resize_image, to_tensor)

pytestmark = pytest.mark.timm   # the lite0 backbone: timm, which imports torchvision


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
def test_offline_weights_classify_sample_photos(name):
    """Each package's weights, loaded by position into timm's network, recognise ImageNet photos."""
    import skimage.data
    import timm

    from rlr.backbone import _assign_weights, _load_state_file, offline_weights_file

    model = timm.create_model(name, pretrained=False).eval()
    _assign_weights(model, name, _load_state_file(offline_weights_file(name)), "package")
    images = [resize_image(skimage.data.chelsea(), 224), resize_image(skimage.data.coffee(), 224)]
    with torch.no_grad():
        top = model(to_tensor(images)).argmax(dim=1).tolist()
    assert top[0] in range(281, 286)        # ImageNet cats (Chelsea is a tabby)
    assert top[1] in (504, 967, 968)        # coffee mug / espresso / cup


def test_lite0_extractor_tokens():
    extractor = create_backbone("tf_efficientnet_lite0", input_size=64)
    assert extractor.channels == [40, 112] and extractor.grids == [(8, 8), (4, 4)]
    image = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    tokens = extractor(extractor.preprocess([image, image]))
    assert [tuple(t.shape) for t in tokens] == [(2, 64, 40), (2, 16, 112)]
    assert not tokens[0].requires_grad
    extractor.train()
    assert not extractor.model.training       # frozen: stays in eval mode


def test_avg_pool_switch():
    pooled = create_backbone("tf_efficientnet_lite0", RANDOM_WEIGHTS, input_size=64, avg_pool=True)
    raw = create_backbone("tf_efficientnet_lite0", RANDOM_WEIGHTS, input_size=64, avg_pool=False)
    x = torch.randn(1, 3, 64, 64)
    maps = raw.model(x)
    expected = torch.nn.AvgPool2d(3, 1, 1)(maps[0]).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pooled(x)[0], expected)
    torch.testing.assert_close(raw(x)[0], maps[0].flatten(2).transpose(1, 2))


def test_preprocessing():
    image = np.full((30, 50, 3), 128, np.uint8)
    resized = resize_image(image, 16)
    assert resized.shape == (16, 16, 3) and resized.dtype == np.uint8
    x = to_tensor([resized])
    expected = (128 / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x[0, :, 5, 5].numpy(), expected, rtol=1e-5)


def test_random_weights_are_reproducible_and_weights_file_roundtrip(tmp_path):
    a = create_backbone("tf_efficientnet_lite0", RANDOM_WEIGHTS, input_size=64)
    b = create_backbone("tf_efficientnet_lite0", RANDOM_WEIGHTS, input_size=64)
    offline = create_backbone("tf_efficientnet_lite0", input_size=64)
    assert a.weights_id == b.weights_id != offline.weights_id
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": offline.model.state_dict()}, path)
    from_file = create_backbone("tf_efficientnet_lite0", str(path), input_size=64)
    assert from_file.weights_id == offline.weights_id


def test_bad_backbones_give_clear_errors(tmp_path):
    with pytest.raises(BackboneError, match="unknown backbone 'no_such_net'"):
        create_backbone("no_such_net")
    with pytest.raises(BackboneError, match="no pretrained tag 'xx'"):
        create_backbone("tf_efficientnet_b6.xx")
    with pytest.raises(BackboneError, match="not found"):
        create_backbone("tf_efficientnet_lite0", str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_text("not weights")
    with pytest.raises(BackboneError, match="not a readable PyTorch state dict"):
        create_backbone("tf_efficientnet_lite0", str(junk))
    other = tmp_path / "other.pth"
    torch.save({"w": torch.zeros(3)}, other)
    with pytest.raises(BackboneError, match="is it a checkpoint of tf_efficientnet_lite0"):
        create_backbone("tf_efficientnet_lite0", str(other))
    with pytest.raises(BackboneError, match="out_indices"):
        create_backbone("tf_efficientnet_lite0", RANDOM_WEIGHTS, out_indices=(2, 9))


def test_hub_failure_message_says_what_to_do(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("Name or service not known")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(BackboneError, match="--backbone tf_efficientnet_lite0.*--backbone-weights"):
        create_backbone("tf_efficientnet_b6.aa_in1k")


# ---------------------------------------------------------------------------------------------- the "fast" runtime

def _count(network, kind):
    return sum(isinstance(m, kind) for m in network.modules())


def test_fast_runtime_gives_timms_tokens_to_float32_rounding():
    from rlr.backbone import FusedConv2d

    fast = create_backbone("tf_efficientnet_lite0", input_size=64)
    eager = create_backbone("tf_efficientnet_lite0", input_size=64, runtime="eager")
    assert fast.runtime == "fast" and eager.runtime == "eager"
    images = list(np.random.default_rng(0).integers(0, 256, (3, 80, 100, 3), dtype=np.uint8))
    x = fast.preprocess(images)
    assert x.is_contiguous(memory_format=torch.channels_last)     # the pixels' own layout, no copy
    for ours, timms in zip(fast(x), eager(x)):
        assert ours.shape == timms.shape and ours.dtype == torch.float32 and ours.is_contiguous()
        assert float((ours - timms).abs().max() / timms.abs().max()) < 1e-5
    network = fast.inference_network("cpu")
    # every BatchNorm of lite0 folded, each conv fused with its activation, the two stride-32 stages that no
    # output reads (blocks 5 and 6 of 7) dropped; timm's module itself untouched (rlr export traces it and
    # the weights' identity is taken of it)
    assert len(network.blocks) == 5 and len(fast.model.blocks) == 7
    assert _count(network, torch.nn.BatchNorm2d) == 0 and _count(network, FusedConv2d) == 33
    assert _count(fast.model, torch.nn.BatchNorm2d) == 48
    assert fast.inference_network("cpu") is network                # built once
    fast.to("cpu")
    assert fast.inference_network("cpu") is not network            # .to() rebuilds it


@pytest.mark.parametrize("out_indices, blocks", [((1, 2), 3), ((2, 3), 5), ((3, 4), 7)])
def test_the_fast_copy_leaves_out_the_blocks_no_output_reads(out_indices, blocks):
    fast = create_backbone("tf_efficientnet_lite0", out_indices=out_indices, input_size=64)
    eager = create_backbone("tf_efficientnet_lite0", out_indices=out_indices, input_size=64, runtime="eager")
    assert len(fast.inference_network("cpu").blocks) == blocks and len(fast.model.blocks) == 7
    x = torch.randn(2, 3, 64, 64)
    for ours, timms in zip(fast(x), eager(x), strict=True):
        assert float((ours - timms).abs().max() / timms.abs().max()) < 1e-5


def test_lite2_offline_extractor_fast_runtime_equals_timms():
    """lite2 (the wide recipe's features) from its offline package: channels, grids and the fast copy's tokens."""
    fast = create_backbone("tf_efficientnet_lite2", input_size=64)
    eager = create_backbone("tf_efficientnet_lite2", input_size=64, runtime="eager")
    assert fast.channels == [48, 120] and fast.grids == [(8, 8), (4, 4)]
    assert fast.weights_id == eager.weights_id
    x = fast.preprocess(list(np.random.default_rng(1).integers(0, 256, (2, 70, 90, 3), dtype=np.uint8)))
    for ours, timms in zip(fast(x), eager(x), strict=True):
        assert float((ours - timms).abs().max() / timms.abs().max()) < 1e-5


def test_the_fast_runtime_exports_as_timms_module():
    """Traced for export the extractor runs timm's module: no fused oneDNN op (which ONNX lacks) in the graph."""
    fast = create_backbone("tf_efficientnet_lite0", input_size=64)
    x = torch.randn(1, 3, 64, 64)
    exported = torch.export.export(fast, (x,)).graph_module
    targets = {str(node.target) for module in exported.modules() if isinstance(module, torch.fx.GraphModule)
               for node in module.graph.nodes if node.op == "call_function"}   # no_grad's body is a subgraph
    assert not any("mkldnn" in t for t in targets), sorted(t for t in targets if "mkldnn" in t)
    assert any("conv2d" in t for t in targets), sorted(targets)


@pytest.mark.parametrize("size", [(64, 64), (65, 63), (31, 32)])
@pytest.mark.parametrize("onednn", [True, False])
def test_fused_conv_pads_and_activates_like_timms_conv2d_same(size, onednn):
    from timm.layers import Conv2dSame

    from rlr.backbone import FusedConv2d

    torch.manual_seed(0)
    x = torch.randn(2, 8, *size).contiguous(memory_format=torch.channels_last)
    for kernel, stride, groups in ((3, 2, 8), (5, 2, 8), (3, 1, 1), (1, 1, 1)):
        conv = Conv2dSame(8, 8, kernel, stride=stride, groups=groups, bias=True)
        for activation in (torch.nn.ReLU6(), torch.nn.SiLU(), torch.nn.Identity()):
            fused = FusedConv2d(conv, activation)
            fused.onednn = fused.onednn and onednn
            with torch.no_grad():
                torch.testing.assert_close(fused(x), activation(conv(x)), rtol=1e-5, atol=1e-5)


def test_depthwise_conv_with_asymmetric_padding_reads_its_input_in_place():
    """Stride 2 on an even side pads (0, 1) or (1, 2): the depthwise kernel gets leading zero taps and symmetric
    padding instead of a padded copy of its input (per input size and dtype); a full convolution keeps the copy."""
    from timm.layers import Conv2dSame

    from rlr.backbone import FusedConv2d

    torch.manual_seed(0)
    x = torch.randn(2, 8, 32, 32).contiguous(memory_format=torch.channels_last)
    depthwise = FusedConv2d(Conv2dSame(8, 8, 5, stride=2, groups=8), torch.nn.Identity())
    _, weight, padding = depthwise._same_padding(x)
    assert tuple(weight.shape[-2:]) == (6, 6) and padding == [2, 2] and not weight[..., 0, :].any()
    full = FusedConv2d(Conv2dSame(8, 8, 3, stride=2), torch.nn.Identity())
    padded, weight, padding = full._same_padding(x)
    assert tuple(padded.shape[-2:]) == (33, 33) and weight is full.weight and padding == [0, 0]
    depthwise.to(torch.bfloat16)   # the shifted weight is made again in the new dtype
    assert depthwise._same_padding(x.bfloat16())[1].dtype == torch.bfloat16


def test_a_batchnorm_whose_conv_output_is_read_twice_stays_unfolded():
    from rlr.backbone import FeatureExtractor

    class Channels:
        def channels(self):
            return [4]

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.feature_info = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), Channels()
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

        def forward(self, x):
            y = self.conv(x)
            return [self.bn(y) + y]   # the conv's output is read by the BatchNorm and by the sum: folding is wrong

    toy = Toy().eval()
    extractor = FeatureExtractor(toy, "toy", 16, False, "id")
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(RuntimeWarning, match="runs unfolded"):
        tokens = extractor(x)
    with torch.no_grad():
        expected = toy(x)[0].flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens[0], expected, rtol=1e-5, atol=1e-5)


def test_bf16_fast_runtime_holds_bf16_weights_and_stays_close():
    from rlr.inference import bf16_is_native

    if not bf16_is_native(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16")
    extractor = create_backbone("tf_efficientnet_lite0", input_size=64)
    x = extractor.preprocess(list(np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)))
    assert {p.dtype for p in extractor.inference_network("cpu", torch.bfloat16).parameters()} == {torch.bfloat16}
    for low, full in zip(extractor(x, dtype=torch.bfloat16), extractor(x)):
        assert low.dtype == torch.float32
        assert float((low - full).abs().max() / full.abs().max()) < 0.1


def test_unknown_runtime_is_named():
    with pytest.raises(ValueError, match="backbone runtime must be one of"):
        create_backbone("tf_efficientnet_lite0", RANDOM_WEIGHTS, input_size=64, runtime="compiled")


def test_decode_ahead_keeps_order_resizes_and_reports_each_bad_file(tmp_path):
    from PIL import Image

    from rlr.backbone import decode_ahead
    from rlr.data import DatasetError, load_image

    rng = np.random.default_rng(2)
    paths = []
    for i, shape in enumerate([(20, 30), (16, 16), (40, 10), None, (25, 25)]):
        path = tmp_path / f"{i}.png"
        if shape is None:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    array = rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)
    batches = list(decode_ahead(paths + [array], 16, 2))
    assert [len(b) for b in batches] == [2, 2, 2]
    futures = [f for b in batches for f in b]
    for path, future in zip(paths, futures):
        if path.endswith("3.png"):
            with pytest.raises(DatasetError, match="3.png"):
                future.result()
            continue
        image, shape = future.result()
        original = load_image(path)
        assert shape == original.shape[:2]
        np.testing.assert_array_equal(image, resize_image(original, 16))
    image, shape = futures[-1].result()
    assert shape == (12, 14) and image.shape == (16, 16, 3)


def test_allocator_setting_can_be_declined():
    import os
    import subprocess
    import sys

    code = "import rlr.backbone as b; print(b.keep_freed_memory())"
    declined = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "RLR_KEEP_FREED_MEMORY": "0"}).stdout.strip()
    assert declined == "False"
    if sys.platform.startswith("linux"):
        made = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert made.strip() in ("True", "False")   # True on glibc; musl has no mallopt
