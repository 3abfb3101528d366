"""rlr/train.py: loss and jitter, exact resume, atomic checkpoints, run-folder guards."""
import json
import math

import pytest
import torch

from _pipeline import make_dataset, tiny_config
from rlr.run import CHECKPOINT_FILE, RunError, load_checkpoint
import rlr.train
from rlr.train import add_jitter, bf16_is_native, reconstruction_loss, train, trains_in_bf16

pytestmark = pytest.mark.timm   # the lite0 backbone: timm, which imports torchvision


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "set")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_loss_is_mse_plus_one_minus_cosine():
    target = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    output = torch.tensor([[[1.0, 1.0], [0.0, 2.0]]])
    mse = 1.0 / 4
    cos_gap = ((1 - 1 / math.sqrt(2)) + 0.0) / 2
    assert reconstruction_loss(output, target).item() == pytest.approx(mse + cos_gap)


def test_jitter_scale_follows_token_norm():
    tokens = torch.zeros(2, 500, 8)
    tokens[0, :, 0] = 8.0            # norm 8, C = 8 -> noise std 1 * s
    gen = torch.Generator().manual_seed(0)
    noisy = add_jitter(tokens, 4.0, gen)
    assert (noisy[0] - tokens[0]).std().item() == pytest.approx(4.0, rel=0.05)
    assert torch.equal(noisy[1], tokens[1])                   # zero tokens get no noise
    assert add_jitter(tokens, 0.0, gen) is tokens


@pytest.mark.parametrize("class_balance, precision", [(False, "fp32"), (True, "bf16")])
def test_resume_continues_exactly(tmp_path, data, cache, class_balance, precision):
    config = tiny_config(epochs=2, class_balance=class_balance, precision=precision)
    full = train(tmp_path / "full", data, config, cache_dir=cache, progress=False, log=lambda *_: None)
    half = train(tmp_path / "half", data, tiny_config(epochs=1, class_balance=class_balance, precision=precision),
                 cache_dir=cache, progress=False, log=lambda *_: None)
    assert half.epochs == 1
    resumed = train(tmp_path / "half", resume=True, epochs=2, cache_dir=cache, progress=False, log=lambda *_: None)
    assert resumed.epochs == 2 and full.epochs == 2
    a = load_checkpoint(tmp_path / "full")
    b = load_checkpoint(tmp_path / "half")
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=0, atol=1e-6, msg=name)
    assert [h["loss"] for h in b["history"]] == pytest.approx([h["loss"] for h in a["history"]], abs=1e-6)
    # Nothing more to do: a resume at the configured epoch count trains nothing.
    messages = []
    again = train(tmp_path / "half", resume=True, cache_dir=cache, progress=False, log=messages.append)
    assert len(again.history) == 2 and "already trained for 2 epochs" in " ".join(messages)


@pytest.mark.parametrize("precision, native, bf16", [("auto", True, True), ("auto", False, False),
                                                     ("fp32", True, False), ("bf16", False, True)])
def test_auto_precision_trains_in_bf16_only_where_it_is_native(monkeypatch, precision, native, bf16):
    monkeypatch.setattr(rlr.train, "bf16_is_native", lambda device: native)
    assert trains_in_bf16(tiny_config(precision=precision), torch.device("cpu")) is bf16


@pytest.mark.parametrize("amx, avx512_bf16", [(False, False), (True, False), (False, True)])
def test_native_bf16_on_cpu_follows_the_cpu_features(monkeypatch, amx, avx512_bf16):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert bf16_is_native(torch.device("cpu")) is (amx or avx512_bf16)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert bf16_is_native(torch.device("cpu")) is False     # a torch without the probes: fp32, the safe choice


def test_existing_run_is_not_overwritten(tmp_path, data, cache):
    train(tmp_path / "run", data, tiny_config(epochs=1), cache_dir=cache, progress=False, log=lambda *_: None)
    with pytest.raises(RunError, match="--resume"):
        train(tmp_path / "run", data, tiny_config(epochs=1), cache_dir=cache, progress=False, log=lambda *_: None)
    with pytest.raises(RunError, match="does not exist"):
        train(tmp_path / "missing", resume=True, cache_dir=cache, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no checkpoint"):
        train(tmp_path / "empty", resume=True, cache_dir=cache, progress=False)


def test_checkpoint_write_is_atomic(tmp_path, data, cache, monkeypatch):
    run = tmp_path / "run"
    train(run, data, tiny_config(epochs=1), cache_dir=cache, progress=False, log=lambda *_: None)
    before = (run / CHECKPOINT_FILE).read_bytes()

    import rlr.run

    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)                         # leave a torn file behind, as a crash would
        raise OSError("disk full")

    monkeypatch.setattr(rlr.run.torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        train(run, resume=True, epochs=2, cache_dir=cache, progress=False, log=lambda *_: None)
    monkeypatch.setattr(rlr.run.torch, "save", real_save)
    assert (run / CHECKPOINT_FILE).read_bytes() == before       # the last complete epoch is intact
    assert load_checkpoint(run)["epoch"] == 1
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "threshold.json"]   # no temporary file


def test_training_reduces_loss(tmp_path, data, cache):
    result = train(tmp_path / "run", data, tiny_config(epochs=4, lr=3e-3), cache_dir=cache, progress=False,
                   log=lambda *_: None)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.train_images == 10


def test_learning_rate_warmup_then_cosine():
    config = tiny_config(lr=1.0, epochs=3, schedule="cosine", warmup_steps=4)
    steps = 10                                                 # per epoch: 30 steps in all, 26 after warm-up
    assert [config.learning_rate(s, steps) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert config.learning_rate(4, steps) == pytest.approx(1.0)
    assert config.learning_rate(4 + 13, steps) == pytest.approx(0.5)        # half-way: cos(pi/2)
    assert config.learning_rate(29, steps) == pytest.approx(0.5 * (1 + math.cos(math.pi * 25 / 26)))
    assert config.learning_rate(100, steps) == 0.0                         # past the end: stays at 0
    constant = tiny_config(lr=1.0, warmup_steps=2)
    assert [constant.learning_rate(s, steps) for s in (0, 1, 2, 50)] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="schedule"):
        tiny_config(schedule="step")
    with pytest.raises(ValueError, match="warmup_steps"):
        tiny_config(warmup_steps=-1)


def test_scheduled_run_stopped_and_resumed_matches_one_go(tmp_path, data, cache):
    """stop_after + resume follows the same warm-up/cosine schedule as an uninterrupted run."""
    quiet = dict(cache_dir=cache, progress=False, log=lambda *_: None)
    config = dict(epochs=3, lr=3e-3, schedule="cosine", warmup_steps=2)
    full = train(tmp_path / "full", data, tiny_config(**config), **quiet)
    part = train(tmp_path / "part", data, tiny_config(**config), stop_after=1, **quiet)
    assert part.epochs == 1 and load_checkpoint(tmp_path / "part")["epoch"] == 1
    resumed = train(tmp_path / "part", resume=True, **quiet)
    assert resumed.epochs == 3
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=0, atol=1e-6, msg=name)
    lrs = [h["lr"] for h in full.history]
    assert lrs == pytest.approx([h["lr"] for h in b["history"]])
    assert lrs[0] > lrs[1] > lrs[2] > 0                       # decaying; 0 is reached just after the last step
    assert lrs[2] == pytest.approx(tiny_config(**config).learning_rate(8, 3))   # 10 images, batch 4: 3 steps/epoch


def test_fast_recipe_width_and_paper_unchanged():
    from rlr.config import RLRConfig

    fast = RLRConfig.from_recipe("fast")
    assert fast.level_d_models() == (64, 128) and fast.layers == 2 and fast.warmup_steps > 0
    assert RLRConfig.from_recipe("fast", out_indices=(1, 2, 3)).level_d_models() == (32, 64, 128)
    paper = RLRConfig.from_recipe("paper")
    assert (paper.lr, paper.batch_size, paper.epochs, paper.schedule, paper.warmup_steps) == (1e-4, 4, 200, "constant", 0)
    assert paper.level_d_models() == (256, 512) and paper.layers == 4
    assert paper.windows == {16: 5, 32: 7, 64: 11} and fast.windows == {16: 3, 32: 5, 64: 9}
    assert paper.class_balance == 0 and 0 < fast.class_balance <= 1
    assert paper.scoring == fast.scoring == "paper"


def test_wide_recipe_is_the_fast_recipe_at_width_256_and_twice_the_heads_on_lite2():
    from rlr.config import ConfigError, RLRConfig

    fast, wide = RLRConfig.from_recipe("fast"), RLRConfig.from_recipe("wide")
    assert wide.level_d_models() == (256, 256) and wide.heads == 2 * fast.heads == 4
    assert (wide.lr, wide.epochs, wide.scoring) == (1e-3, 32, "log-standardized")
    assert wide.backbone == "tf_efficientnet_lite2" and fast.backbone == RLRConfig().backbone   # paper's default
    assert RLRConfig.from_recipe("wide", backbone="tf_efficientnet_lite0").backbone == "tf_efficientnet_lite0"
    same = ("layers", "batch_size", "schedule", "warmup_steps", "windows", "class_balance", "holdout")
    assert {k: getattr(wide, k) for k in same} == {k: getattr(fast, k) for k in same}
    assert RLRConfig.from_recipe("wide", lr=5e-4, scoring="paper").lr == 5e-4   # explicit settings still win
    assert RLRConfig.from_recipe("wide", out_indices=(2, 3, 4), d_models=(64, 128, 256)).d_models == (64, 128, 256)
    # The recipe's widths are per level: another base or another set of levels must say its widths.
    with pytest.raises(ConfigError, match="instead of d_model_base"):
        RLRConfig.from_recipe("wide", d_model_base=96)
    with pytest.raises(ConfigError, match=r"widths \(256, 256\) are for 2 levels.*--d-models"):
        RLRConfig.from_recipe("wide", out_indices=(2, 3, 4))


@pytest.mark.parametrize("argv, balance", [((), None), (("--class-balance",), 1.0), (("--class-balance", "0.5"), 0.5),
                                           (("--class-balance", "0"), 0.0)])
def test_cli_class_balance_flag_alone_means_every_class_equally(argv, balance):
    from rlr.cli import build_parser

    assert build_parser().parse_args(["train", "--data-root", "d", "--out", "o", *argv]).class_balance == balance


def test_class_balance_is_a_strength_from_0_to_1_and_reads_old_true_false():
    from rlr.config import ConfigError, RLRConfig

    assert RLRConfig(class_balance=True).class_balance == 1.0 and RLRConfig(class_balance=False).class_balance == 0.0
    for bad in (1.5, -0.1, float("nan"), "yes"):
        with pytest.raises(ConfigError, match="class_balance must be a number from 0"):
            RLRConfig(class_balance=bad)


def test_cli_window_overrides_only_the_given_side_of_the_recipe():
    from rlr.cli import _train_config, build_parser

    def config(*argv):
        return _train_config(build_parser().parse_args(["train", "--data-root", "d", "--out", "o", *argv]))

    assert config("--recipe", "fast").windows == {16: 3, 32: 5, 64: 9}
    assert config("--recipe", "fast", "--window", "32=7").windows == {16: 3, 32: 7, 64: 9}
    assert config("--window", "8=3").windows == {8: 3, 16: 5, 32: 7, 64: 11}


class _Stop(Exception):
    pass


@pytest.mark.parametrize("class_balance", [0.0, 1.0])
def test_resume_from_a_mid_epoch_checkpoint_continues_exactly(tmp_path, data, cache, monkeypatch, class_balance):
    config = dict(epochs=2, batch_size=2, class_balance=class_balance, precision="fp32")   # 5 steps per epoch
    train(tmp_path / "once", data, tiny_config(**config), cache_dir=cache, progress=False, log=lambda *_: None)
    real_save, saved = rlr.train.save_checkpoint, []

    def stop_after_the_second_mid_epoch_save(path, state, config):
        real_save(path, state, config)
        saved.append(state["step"])
        if state["step"] and len(saved) == 4:   # steps 3 (epoch 1), then the epoch's end, then steps 1, 3 of epoch 2
            raise _Stop

    monkeypatch.setattr(rlr.train, "save_checkpoint", stop_after_the_second_mid_epoch_save)
    with pytest.raises(_Stop):
        train(tmp_path / "cut", data, tiny_config(**config), cache_dir=cache, progress=False, log=lambda *_: None,
              save_every=3)
    monkeypatch.setattr(rlr.train, "save_checkpoint", real_save)
    cut = load_checkpoint(tmp_path / "cut")
    assert saved == [3, 0, 1, 4] and (cut["epoch"], cut["step"]) == (1, 4)
    train(tmp_path / "cut", resume=True, cache_dir=cache, progress=False, log=lambda *_: None)
    once, resumed = load_checkpoint(tmp_path / "once"), load_checkpoint(tmp_path / "cut")
    for name, value in once["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in once["history"]]


def test_save_every_must_be_positive(tmp_path, data, cache):
    with pytest.raises(ValueError, match="--save-every"):
        train(tmp_path / "run", data, tiny_config(), cache_dir=cache, save_every=0)


def test_config_json_edited_after_training_is_refused_naming_the_settings(tmp_path, data, cache):
    from rlr.run import load_run

    run = tmp_path / "run"
    train(run, data, tiny_config(epochs=1, heads=2, windows={8: 3, 4: 3}), cache_dir=cache, progress=False,
          log=lambda *_: None)
    stored = json.loads((run / "config.json").read_text())
    stored["config"].update(heads=4, windows={"4": 5, "8": 5}, avg_pool=False)   # same parameter shapes
    (run / "config.json").write_text(json.dumps(stored))
    for load in (lambda: load_run(run), lambda: train(run, resume=True, epochs=2, cache_dir=cache, progress=False)):
        with pytest.raises(RunError, match="does not match") as refused:
            load()
        message = str(refused.value)
        assert "heads: 4 in config.json, 2 in checkpoint.pt" in message
        assert "windows" in message and "avg_pool: False in config.json, True in checkpoint.pt" in message
    # Settings a run may change later (epochs, backend) are no mismatch; a checkpoint without its config
    # (written before it travelled with it, same format version) still loads.
    stored["config"].update(heads=2, windows={"4": 3, "8": 3}, avg_pool=True, epochs=9, backend="cpp")
    (run / "config.json").write_text(json.dumps(stored))
    assert load_run(run).config.heads == 2
    state = torch.load(run / CHECKPOINT_FILE, weights_only=True)
    del state["config"]
    torch.save(state, run / CHECKPOINT_FILE)
    assert load_run(run).model.config.heads == 2
