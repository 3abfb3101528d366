"""rlr/backbone.py: offline weights, local weights files, random init (tests), preprocessing."""
import numpy as np
import pytest
import torch

from rlr.backbone import (IMAGENET_MEAN, IMAGENET_STD, RANDOM_WEIGHTS, BackboneError, create_backbone,
                          resize_image, to_tensor)

pytestmark = pytest.mark.timm   # the lite0 backbone: timm, which imports torchvision


def test_offline_lite0_weights_classify_sample_photos():
    """The package's weights, loaded by position into timm's network, recognise ImageNet photos."""
    import skimage.data
    import timm

    from rlr.backbone import _assign_weights, _load_state_file, _offline_lite0_file

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    _assign_weights(model, "tf_efficientnet_lite0", _load_state_file(_offline_lite0_file()), "package")
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
