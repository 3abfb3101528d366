"""rlr/original.py: the original formulation and the import of its checkpoints."""
import argparse

import pytest
import torch

from rlr.original import (CheckpointError, OriginalRLR, import_official_run, load_official_checkpoint,
                          save_original_checkpoint)

# The original code's parameter names for one level with 2 encoder layers (blocks mca + nsa).
ORIGINAL_KEYS = {
    "embedding.project_embedding.project.weight", "embedding.project_embedding.project.bias", "ref_mca",
    "ref_mca_embedding.project_embedding.project.weight", "ref_mca_embedding.project_embedding.project.bias",
    "encoder.norm.weight", "encoder.norm.bias", "projection.weight", "projection.bias",
} | {
    f"encoder.encode_layers.{i}.{part}" for i in range(2) for part in (
        "mca.in_proj_weight", "mca.in_proj_bias", "mca.out_proj.weight", "mca.out_proj.bias",
        "nsa.in_proj_weight", "nsa.in_proj_bias", "nsa.out_proj.weight", "nsa.out_proj.bias",
        "norm1.weight", "norm1.bias", "ffn.fc1.weight", "ffn.fc1.bias", "ffn.fc2.weight", "ffn.fc2.bias",
        "norm2.weight", "norm2.bias")
}


def original_levels(ref_len=1):
    """Two levels on an input of 64 px (grids 8x8 and 4x4), perturbed so no bias stays zero."""
    torch.manual_seed(0)
    levels = [OriginalRLR(64, 6, 16, heads=2, layers=2, ref_len=ref_len, window=3),
              OriginalRLR(16, 10, 32, heads=2, layers=2, ref_len=ref_len, window=3)]
    with torch.no_grad():
        for level in levels:
            for p in level.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return levels


def load(path, ref_len=1, **kw):
    return load_official_checkpoint(path, input_size=64, out_indices=(2, 3), heads=2, ref_len=ref_len,
                                    windows={8: 3, 4: 3}, backend="reference", **kw)


def test_mask_building_variants_agree():
    from rlr.original import dense_window_mask, loop_window_mask

    for inside in (True, False):
        assert torch.equal(dense_window_mask(6, 3, inside), loop_window_mask(6, 3, inside))
    levels = original_levels()
    rebuilt = OriginalRLR(64, 6, 16, heads=2, layers=2, window=3, rebuild_masks=True)
    rebuilt.load_state_dict(levels[0].state_dict())
    x = torch.randn(2, 64, 6)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), levels[0](x))


def test_in_memory_conversion():
    from rlr.original import model_from_original_states

    levels = original_levels()
    model = model_from_original_states([lv.state_dict() for lv in levels], input_size=64, heads=2,
                                       windows={8: 3, 4: 3}, backend="reference")
    x = torch.randn(2, 16, 10)
    with torch.no_grad():
        torch.testing.assert_close(model.levels[1](x), levels[1](x), rtol=1e-5, atol=2e-5)


def test_state_dict_uses_original_names():
    assert set(original_levels()[0].state_dict()) == ORIGINAL_KEYS


@pytest.mark.parametrize("ref_len", [1, 2])
def test_import_reproduces_original_outputs(tmp_path, ref_len):
    levels = original_levels(ref_len)
    path = tmp_path / "latest.pth"
    save_original_checkpoint(path, levels, epoch=7)
    model = load(path, ref_len)
    assert model.config.layers == 2 and model.config.d_models == (16, 32) and model.config.ffn_ratio == 4
    gen = torch.Generator().manual_seed(3)
    features = [torch.randn(3, 64, 6, generator=gen), torch.randn(3, 16, 10, generator=gen)]
    with torch.no_grad():
        ours = model(features)
        theirs = [level(f) for level, f in zip(levels, features)]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


def test_original_checkpoint_with_numpy_scalars_loads_safely(tmp_path):
    import numpy as np

    levels = original_levels()
    path = tmp_path / "best-img.pth"
    torch.save({"state_dict": [lv.state_dict() for lv in levels], "epoch": 3, "best_img_auc": np.float64(0.9),
                "best_img_aucs": [np.float64(0.9), np.float64(0.8)]}, path)
    load(path)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        load(junk)
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": [], "args": argparse.Namespace(lr=1)}, evil)   # arbitrary objects: refused
    with pytest.raises(CheckpointError, match="trust"):
        load(evil)
    no_state = tmp_path / "nostate.pth"
    torch.save({"model": {}}, no_state)
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        load(no_state)
    levels = original_levels()
    one_level = tmp_path / "one.pth"
    torch.save({"state_dict": [levels[0].state_dict()]}, one_level)
    with pytest.raises(CheckpointError, match="holds 1 levels"):
        load(one_level)
    gated = tmp_path / "gated.pth"
    states = [lv.state_dict() for lv in levels]
    states[0]["encoder.gate"] = torch.ones(2, 2)
    torch.save({"state_dict": states}, gated)
    with pytest.raises(CheckpointError, match="encoder.gate"):
        load(gated)
    path = tmp_path / "ok.pth"
    save_original_checkpoint(path, levels)
    with pytest.raises(CheckpointError, match="pass the settings"):
        load_official_checkpoint(path, input_size=128, out_indices=(2, 3), heads=2, windows={16: 5, 8: 3})


@pytest.mark.timm
def test_import_writes_a_run_folder(tmp_path):
    from rlr.config import RLRConfig
    from rlr.run import load_run

    path = tmp_path / "latest.pth"
    levels = original_levels()
    save_original_checkpoint(path, levels)
    run_dir = tmp_path / "run"
    import_official_run(path, run_dir, input_size=64, out_indices=(2, 3), heads=2, backbone="tf_efficientnet_lite0",
                        windows={8: 3, 4: 3}, backend="reference")
    config = RLRConfig.load(run_dir)
    assert config.backbone == "tf_efficientnet_lite0" and config.d_models == (16, 32)
    model = load_run(run_dir).model
    features = [torch.randn(2, 64, 6), torch.randn(2, 16, 10)]
    with torch.no_grad():
        for ours, level, f in zip(model(features), levels, features):
            torch.testing.assert_close(ours, level(f), rtol=1e-5, atol=2e-5)
    with pytest.raises(Exception, match="already holds a run"):
        import_official_run(path, run_dir, input_size=64, out_indices=(2, 3), heads=2, windows={8: 3, 4: 3})
