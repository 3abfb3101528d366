"""The standardising scorings (`rlr train --scoring standardized` / `log-standardized`): statistics of normal
images recorded at the end of training, applied by every scorer; the paper's scoring stays the default and
unchanged."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from _pipeline import make_dataset, tiny_config
from rlr.config import ConfigError, RLRConfig
from rlr.inference import anomaly_maps, combine_levels, image_scores, level_statistics, token_scores
from rlr.run import CHECKPOINT_FILE, RunError, load_checkpoint


def test_standardized_maps_are_each_level_standardised_then_averaged():
    torch.manual_seed(0)
    grids = [(4, 4), (2, 2)]
    features = [torch.randn(3, 16, 8), torch.randn(3, 4, 12)]
    recon = [torch.randn(3, 16, 8), torch.randn(3, 4, 12)]
    paper = anomaly_maps(features, recon, grids, 8)
    assert torch.equal(anomaly_maps(features, recon, grids, 8, [(0.0, 1.0), (0.0, 1.0)], "standardized"), paper)
    stats = [(0.5, 2.0), (-1.0, 0.25)]
    want = sum((anomaly_maps([f], [r], [g], 8) - m) / s
               for f, r, g, (m, s) in zip(features, recon, grids, stats)) / 2
    torch.testing.assert_close(anomaly_maps(features, recon, grids, 8, stats, "standardized"), want)


def test_log_standardized_maps_standardise_each_levels_log_scores_then_average():
    torch.manual_seed(0)
    grids = [(4, 4), (2, 2)]
    features = [torch.randn(3, 16, 8), torch.randn(3, 4, 12)]
    recon = [torch.randn(3, 16, 8), torch.randn(3, 4, 12)]
    stats = [(0.5, 2.0), (-1.0, 0.25)]
    logs = [torch.log(token_scores(f, r)) for f, r in zip(features, recon)]
    want = sum((combine_levels([s], [g], 8) - m) / sd for s, g, (m, sd) in zip(logs, grids, stats)) / 2
    got = anomaly_maps(features, recon, grids, 8, stats, "log-standardized")
    torch.testing.assert_close(got, want)
    # A weighted geometric mean of the levels: on one grid, with unit statistics, exp(map) is the geometric mean.
    scores = [token_scores(features[0], recon[0]), token_scores(features[0], recon[0] * 2)]
    unit = combine_levels(scores, [(4, 4)] * 2, 4, [(0.0, 1.0)] * 2, "log-standardized")
    torch.testing.assert_close(unit.exp().flatten(1), (scores[0] * scores[1]).sqrt())
    # An exact reconstruction scores 0: its log is floored, not -inf.
    exact = anomaly_maps([features[0]], [features[0]], grids[:1], 8, [(0.0, 1.0)], "log-standardized")
    assert torch.isfinite(exact).all()


@pytest.mark.parametrize("scoring, stats, match", [
    ("paper", [(0.0, 1.0)] * 2, "takes no level statistics"),
    ("standardized", None, "needs one \\(mean, std\\) per level"),
    ("log-standardized", [(0.0, 1.0)], "needs one \\(mean, std\\) per level \\(2\\)"),
    ("zscore", None, "unknown scoring 'zscore'"),
])
def test_a_scoring_and_its_statistics_are_checked_together(scoring, stats, match):
    scores = [torch.rand(1, 16), torch.rand(1, 4)]
    with pytest.raises(ValueError, match=match):
        combine_levels(scores, [(4, 4), (2, 2)], 8, stats, scoring)


def test_level_statistics_are_the_mean_and_std_of_all_token_scores_whatever_the_batches():
    torch.manual_seed(1)

    class Echo(torch.nn.Module):   # "reconstructs" every level as a fixed perturbation of its input
        def forward(self, tokens):
            return [t * 0.5 + 0.1 for t in tokens]

    batches = [[torch.randn(b, 16, 8), torch.randn(b, 4, 12)] for b in (2, 3, 1)]
    stats = level_statistics(Echo(), batches)
    for level, (mean, std) in enumerate(stats):
        scores = torch.cat([token_scores(b[level], b[level] * 0.5 + 0.1).flatten() for b in batches]).double()
        assert mean == pytest.approx(float(scores.mean()), rel=1e-9)
        assert std == pytest.approx(float(scores.std(unbiased=False)), rel=1e-6)
    merged = [[torch.cat([b[level] for b in batches]) for level in range(2)]]
    np.testing.assert_allclose(level_statistics(Echo(), merged), stats, rtol=1e-6)
    with pytest.raises(ValueError, match="at least one normal image"):
        level_statistics(Echo(), [])
    # log-standardized: the statistics of the scores' logarithms.
    for level, (mean, std) in enumerate(level_statistics(Echo(), batches, scoring="log-standardized")):
        logs = torch.cat([token_scores(b[level], b[level] * 0.5 + 0.1).flatten() for b in batches]).double().log()
        assert mean == pytest.approx(float(logs.mean()), rel=1e-6)
        assert std == pytest.approx(float(logs.std(unbiased=False)), rel=1e-5)
    with pytest.raises(ValueError, match="takes no statistics"):
        level_statistics(Echo(), batches, scoring="paper")


def test_scoring_is_checked_and_the_recipes_keep_the_papers():
    with pytest.raises(ConfigError, match="scoring must be one of"):
        RLRConfig(scoring="zscore")
    assert RLRConfig.from_recipe("paper").scoring == "paper"
    assert RLRConfig().scoring == "paper"


@pytest.mark.timm   # the lite0 backbone: timm, which imports torchvision
class TestStandardizedRun:
    @pytest.fixture(scope="class")
    def runs(self, tmp_path_factory):
        from rlr.train import train

        root = tmp_path_factory.mktemp("scoring")
        data = make_dataset(root / "data", n_train=6)
        quiet = {"cache_dir": root / "cache", "progress": False, "log": lambda *_: None}
        train(root / "paper", data, tiny_config(holdout=0.34), **quiet)
        train(root / "std", data, tiny_config(holdout=0.34, scoring="standardized"), **quiet)
        train(root / "logstd", data, tiny_config(holdout=0.34, scoring="log-standardized"), **quiet)
        return root

    @pytest.mark.parametrize("folder, scoring", [("std", "standardized"), ("logstd", "log-standardized")])
    def test_training_records_statistics_of_the_held_out_images(self, runs, folder, scoring):
        from rlr.features import FeatureCache
        from rlr.inference import open_run

        state = load_checkpoint(runs / folder)
        assert json.loads((runs / folder / "config.json").read_text())["config"]["scoring"] == scoring
        assert load_checkpoint(runs / "paper")["level_stats"] is None
        run, extractor, device = open_run(runs / folder, "cpu")
        held_out = [p for paths in state["data"]["holdout"]["images"].values() for p in paths]
        assert len(held_out) == 4   # 2 of 6 per class
        table = FeatureCache(extractor, runs / "cache", progress=False).features(held_out, "held out")
        want = level_statistics(run.model, [table.tensors(range(len(held_out)))], scoring=scoring)
        np.testing.assert_allclose(state["level_stats"], want, rtol=1e-5)
        np.testing.assert_allclose(run.level_stats, want, rtol=1e-5)

    @pytest.mark.parametrize("folder, scoring", [("std", "standardized"), ("logstd", "log-standardized")])
    def test_same_weights_as_the_papers_scoring_and_every_scorer_applies_the_statistics(self, runs, folder, scoring):
        import rlr
        from rlr.evaluate import evaluate
        from rlr.threshold import load as load_threshold

        paper, std = load_checkpoint(runs / "paper"), load_checkpoint(runs / folder)
        for name, weights in paper["model"].items():   # scoring does not change training
            assert torch.equal(weights, std["model"][name]), name
        quiet = {"cache_dir": runs / "cache", "progress": False, "log": lambda *_: None}
        metrics = evaluate(runs / folder, **quiet)
        assert metrics["classes"] != evaluate(runs / "paper", **quiet)["classes"]
        detector = rlr.load(runs / folder)
        images = sorted((runs / "data").glob("*/test/*/*.png"))
        scores = np.array([r.score for r in detector.predict([str(p) for p in images])])
        stats = std["level_stats"]
        by_hand = []
        for path in images:
            tokens = detector.scorer.tokens_from_images([np.asarray(Image.open(path).convert("RGB"))])
            with torch.no_grad():
                recon = detector.run.model(tokens)
            maps = anomaly_maps(tokens, recon, detector.run.model.grids, detector.input_size, stats, scoring).numpy()
            by_hand.append(float(image_scores(maps)[0]))
        np.testing.assert_allclose(scores, by_hand, rtol=1e-5, atol=1e-5)   # batched vs one at a time
        # The threshold was chosen on the standardised scores: a normal held-out image scores near it, not near
        # the paper scoring's scale.
        cut = load_threshold(runs / folder).global_cut.threshold
        assert abs(cut) < 20 and cut != pytest.approx(load_threshold(runs / "paper").global_cut.threshold)

    def test_missing_statistics_are_named(self, runs, tmp_path):
        import shutil

        from rlr.atomic import atomic_save
        from rlr.run import load_run

        shutil.copytree(runs / "std", tmp_path / "run")
        state = load_checkpoint(tmp_path / "run")
        state["level_stats"] = None
        atomic_save(tmp_path / "run" / CHECKPOINT_FILE, lambda handle: torch.save(state, handle))
        with pytest.raises(RunError, match="holds no level statistics yet.*--resume"):
            load_run(tmp_path / "run")
        state["level_stats"] = [[0.1, 0.0], [0.2, 1.0]]
        atomic_save(tmp_path / "run" / CHECKPOINT_FILE, lambda handle: torch.save(state, handle))
        with pytest.raises(RunError, match="malformed level statistics"):
            load_run(tmp_path / "run")

    def test_a_stopped_run_has_statistics_and_resuming_renews_them(self, runs, tmp_path):
        from rlr.train import train

        quiet = {"cache_dir": runs / "cache", "progress": False, "log": lambda *_: None}
        config = tiny_config(holdout=0.34, scoring="standardized", epochs=3)
        train(tmp_path / "run", runs / "data", config, stop_after=1, **quiet)
        first = load_checkpoint(tmp_path / "run")["level_stats"]
        assert first is not None and not (tmp_path / "run" / "threshold.json").exists()
        train(tmp_path / "run", resume=True, **quiet)
        state = load_checkpoint(tmp_path / "run")
        assert state["epoch"] == 3 and not np.allclose(state["level_stats"], first)
        assert (tmp_path / "run" / "threshold.json").exists()

    def test_cli_sets_the_scoring_and_resume_refuses_to_change_it(self, runs, capsys):
        from rlr.cli import _train_config, build_parser, main

        def config(*argv):
            return _train_config(build_parser().parse_args(["train", "--data-root", "d", "--out", "o", *argv]))

        assert config("--recipe", "fast").scoring == "paper"
        assert config("--recipe", "fast", "--scoring", "standardized").scoring == "standardized"
        assert main(["train", "--out", str(runs / "std"), "--resume", "--scoring", "paper"]) != 0
        assert "--scoring given" in capsys.readouterr().err
