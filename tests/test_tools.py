"""tools/: the nearest-neighbour baseline (on rlr's own features) and the attention cost timer."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _pipeline import make_dataset
from rlr.backbone import create_backbone
from rlr.features import FeatureCache

from tools import attention_cost, level_scores, step_profile
from tools import nn_baseline

pytestmark = pytest.mark.timm   # trains or loads the lite0 backbone: timm, which imports torchvision


@pytest.fixture(scope="module")
def nn():
    return nn_baseline


def test_nearest_distances_are_exact_across_chunk_borders(nn):
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(37, 6, generator=generator) * 3
    bank = torch.randn(23, 6, generator=generator) * 3
    bank[5] = queries[11]   # a query that is in the bank is at distance 0
    want = torch.cdist(queries.double(), bank.double()).min(dim=1).values.float()
    got = nn.nearest_distances(queries, bank, query_chunk=8, bank_chunk=5)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert got[11] < 1e-3


def test_nearest_distances_refuse_mismatched_channels(nn):
    with pytest.raises(ValueError, match="channel"):
        nn.nearest_distances(torch.zeros(3, 4), torch.zeros(5, 6))


def test_memory_bank_keeps_all_tokens_or_a_seeded_subset(nn, tmp_path):
    data = make_dataset(tmp_path / "data", classes=("fabric",), n_train=5)
    extractor = create_backbone("tf_efficientnet_lite0", "random", (2, 3), 64)
    table = FeatureCache(extractor, tmp_path / "cache", progress=False).features(
        sorted(str(p) for p in (Path(data) / "fabric" / "train" / "good").iterdir()))
    full = nn.memory_bank(table, 0, 0, torch.Generator().manual_seed(0))
    assert full.shape == (5 * 8 * 8, extractor.channels[0])
    subset = nn.memory_bank(table, 0, 50, torch.Generator().manual_seed(0))
    assert subset.shape == (50, extractor.channels[0])
    rows = {tuple(r.tolist()) for r in full}
    assert all(tuple(r.tolist()) in rows for r in subset)
    again = nn.memory_bank(table, 0, 50, torch.Generator().manual_seed(0))
    torch.testing.assert_close(subset, again)


def test_cli_scores_every_set_of_levels_and_writes_json(nn, tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "nn.json"
    result = nn.main(["--data-root", str(data), "--backbone-weights", "random", "--input-size", "64",
                      "--out-indices", "2,3", "--bank-size", "100", "--cache-dir", str(tmp_path / "cache"),
                      "--json", str(out), "--quiet"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["settings"]["grids"] == [[8, 8], [4, 4]]
    for name in ("fabric", "washer"):
        variants = result["classes"][name]
        assert list(variants) == ["levels 2", "levels 3", "levels 2+3"]
        for metrics in variants.values():
            assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pixel_auroc"] <= 1
    table = capsys.readouterr().out
    assert "levels 2+3" in table and "fabric" in table


def test_cli_rejects_bad_arguments(nn):
    with pytest.raises(SystemExit):
        nn.main(["--data-root", ".", "--out-indices", "2,x"])
    with pytest.raises(SystemExit):
        nn.main(["--data-root", ".", "--bank-size", "-1"])


def test_attention_cost_times_every_grid(capsys):
    module = attention_cost
    result = module.main(["--grids", "4=3,6=3", "--batch", "1", "--heads", "1", "--head-dim", "4", "--rounds", "1",
                          "--backend", "reference"])
    assert set(result) == {(4, 3), (6, 3)} and all(m > 0 and l > 0 for m, l in result.values())
    assert "grid 6x6 window 3" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        module.main(["--grids", "32"])


def test_attention_cost_times_a_baseline_build_beside_this_one(capsys):
    from rlr_kernels import dispatch
    if "cpp" not in dispatch.available_backends("cpu"):
        pytest.skip("needs the cpp backend")
    from rlr_kernels import _C
    result = attention_cost.main(["--grids", "4=3", "--batch", "1", "--heads", "1", "--head-dim", "16", "--rounds", "1",
                                  "--dtype", "bfloat16", "--baseline-extension", _C.__file__])
    assert len(result[(4, 3)]) == 3 and all(t > 0 for t in result[(4, 3)])
    assert "baseline build's masked" in capsys.readouterr().out


def test_step_profile_times_and_breaks_down_a_recipe_step(capsys):
    assert step_profile.main(["--recipe", "fast", "--input-size", "64", "--steps", "1", "--precision", "fp32",
                              "--d-models", "16,32", "--heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "D (16, 32) heads 2 layers 2 batch 8 grids [(8, 8), (4, 4)] fp32" in out
    for part in ("masked attention", "local attention", "dense (Linear/FFN)", "other"):
        assert part in out


def test_step_profile_builds_each_recipe_on_its_backbones_features():
    import argparse

    def built(recipe):
        args = argparse.Namespace(recipe=recipe, d_models=None, heads=None, layers=None, batch_size=None,
                                  input_size=64, precision="fp32")
        config, _, channels, grids = step_profile.build(args)
        return config.backbone, channels, grids

    assert built("wide") == ("tf_efficientnet_lite2", [48, 120], [(8, 8), (4, 4)])
    assert built("fast")[1:] == ([40, 112], [(8, 8), (4, 4)])   # the paper's backbone: profiled at lite0's


def test_level_scores_of_all_levels_match_rlr_test(tmp_path, monkeypatch):
    from _pipeline import tiny_config
    from rlr.evaluate import evaluate
    from rlr.train import train

    module = level_scores
    data = make_dataset(tmp_path / "data")
    quiet = {"cache_dir": tmp_path / "cache", "progress": False, "log": lambda *_: None}
    train(tmp_path / "run", data, tiny_config(epochs=1), **quiet)
    want = evaluate(tmp_path / "run", **quiet)
    got = module.score_run(tmp_path / "run", cache_dir=tmp_path / "cache", standardized=True)
    # Scoring does not change training: the same settings with a standardising scoring train the same weights,
    # and the tool's column of that scoring is what rlr test gives that run.
    standardized = {}
    for scoring in ("standardized", "log-standardized"):
        train(tmp_path / scoring, data, tiny_config(epochs=1, scoring=scoring), **quiet)
        standardized[scoring] = evaluate(tmp_path / scoring, **quiet)
    for name, metrics in want["classes"].items():
        assert list(got[name]) == ["levels 2", "levels 3", "levels 2+3", "standardized", "log-standardized"]
        assert got[name]["levels 2+3"] == pytest.approx(metrics)
        for scoring, metrics_of_run in standardized.items():
            assert got[name][scoring] == pytest.approx(metrics_of_run["classes"][name])
    # The top-fraction image scores sit beside the run's own map, with that map's pixel metrics.
    tops = module.score_run(tmp_path / "run", cache_dir=tmp_path / "cache", standardized=True,
                            top_fractions=(1e-9, 0.5))
    for name in want["classes"]:
        assert list(tops[name])[-2:] == ["standardized top 1e-09", "standardized top 0.5"]
        assert tops[name]["standardized top 1e-09"] == pytest.approx(tops[name]["standardized"])   # one pixel: the max
        assert tops[name]["standardized top 0.5"]["pixel_auroc"] == pytest.approx(tops[name]["standardized"]["pixel_auroc"])
    # Statistics (mean 0, std 1) leave the maps as they are: the standardized average is rlr's average.
    monkeypatch.setattr(module, "pooled_statistics", lambda *args: [(0.0, 1.0), (0.0, 1.0)])
    unchanged = module.score_run(tmp_path / "run", cache_dir=tmp_path / "cache", standardized=True)
    for name in want["classes"]:
        assert unchanged[name]["standardized"] == pytest.approx(unchanged[name]["levels 2+3"])


def test_top_fraction_image_scores_average_the_blurred_maps_top_pixels():
    from rlr.inference import blur, image_scores

    maps = np.random.default_rng(0).random((3, 20, 20)).astype(np.float32)
    blurred = blur(maps).reshape(3, -1)
    want = np.sort(blurred, axis=1)[:, -40:].mean(axis=1)   # 10 % of 400 pixels
    np.testing.assert_allclose(level_scores.top_fraction_scores(maps, 0.1), want, rtol=1e-6)
    np.testing.assert_allclose(level_scores.top_fraction_scores(maps, 1e-6), image_scores(maps), rtol=1e-6)
    with pytest.raises(ValueError, match="top fraction"):
        level_scores.top_fraction_scores(maps, 0.0)
    with pytest.raises(SystemExit):
        level_scores.main(["--run", "unused", "--top-fractions", "0.01,2"])
