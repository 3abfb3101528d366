"""rlr/distributed.py: shards and epoch orders, and two-rank gloo training launched by torchrun.

The launches run real processes on CPU (gloo) with tiny settings. The default set launches one
2-rank training and tests the run it writes; the failure and resume launches are marked slow.
"""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _pipeline import make_dataset
from rlr.distributed import (Distributed, class_balanced_order, class_quotas, epoch_seed, samples_per_rank, shard_indices,
                             shard_order)
from rlr.features import file_digest

pytestmark = pytest.mark.timm   # the lite0 backbone: timm, which imports torchvision

REPO = Path(__file__).resolve().parents[1]
TINY_FLAGS = ["--backbone", "tf_efficientnet_lite0", "--backbone-weights", "random", "--input-size", "64",
              "--heads", "2", "--layers", "1", "--d-models", "16,32", "--window", "8=3", "--window", "4=3",
              "--batch-size", "2", "--backend", "reference", "--quiet"]
LAUNCH_TIMEOUT = 300   # seconds; a launch takes ~20 s on 2 idle cores


# ---------------------------------------------------------------------------- shards and orders

@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_shards_are_disjoint_and_cover_every_image(world):
    for count in range(world, 40):
        shards = [shard_indices(count, rank, world) for rank in range(world)]
        flat = [i for shard in shards for i in shard]
        assert sorted(flat) == list(range(count))                    # every image, each once
        assert len(set(flat)) == len(flat)
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1 and max(sizes) == samples_per_rank(count, world)


def test_epoch_orders_are_equal_in_length_seeded_and_stay_in_the_shard():
    count, world = 11, 3
    length = samples_per_rank(count, world)
    for epoch in range(3):
        orders = [shard_order(len(shard_indices(count, r, world)), length, 0, epoch, r) for r in range(world)]
        assert {len(o) for o in orders} == {length}                    # the same number of steps on every rank
        for rank, order in enumerate(orders):
            size = len(shard_indices(count, rank, world))
            assert set(order.tolist()) == set(range(size))             # a permutation of the shard (+ padding)
            assert torch.equal(order, shard_order(size, length, 0, epoch, rank))   # reproducible
    assert not torch.equal(shard_order(20, 20, 0, 0, 0), shard_order(20, 20, 0, 1, 0))   # reshuffled per epoch
    assert len({epoch_seed(0, 1, e, r) for e in range(10) for r in range(8)}) == 80
    with pytest.raises(ValueError, match="fewer images than ranks"):
        shard_order(0, 1, 0, 0, 0)


def test_class_quotas_follow_the_image_counts_to_the_power_one_minus_balance():
    assert class_quotas([9, 2, 5], 12, 1.0) == [4, 4, 4]
    assert class_quotas([9, 2, 5], 13, 1.0) == [5, 4, 4]               # a tie: the earlier class
    assert class_quotas([5, 5, 5], 660, 1.0) == [220, 220, 220]        # no float floor below 220
    assert class_quotas([400, 100], 30, 0.5) == [20, 10]               # square roots 20 : 10
    assert class_quotas([9, 2, 5], 16, 0.0) == [9, 2, 5]
    quotas = class_quotas([209, 50, 400], 659, 0.5)                    # realmini under the fast recipe
    ideal = [659 * n ** 0.5 / (209 ** 0.5 + 50 ** 0.5 + 400 ** 0.5) for n in (209, 50, 400)]   # 229.4, 112.2, 317.4
    assert quotas == [230, 112, 317] and all(abs(q - i) < 1 for q, i in zip(quotas, ideal))


@pytest.mark.parametrize("balance", [0.5, 1.0])
def test_class_balanced_order_draws_the_class_quotas(balance):
    classes = torch.tensor([0] * 9 + [1] * 2 + [2] * 5)
    order = class_balanced_order(classes, 30, torch.Generator().manual_seed(0), balance)
    assert torch.bincount(classes[order], minlength=3).tolist() == class_quotas([9, 2, 5], 30, balance)


@pytest.mark.parametrize("length", [12, 13, 30])
def test_class_balanced_order_draws_every_class_equally(length):
    classes = torch.tensor([0] * 9 + [1] * 2 + [2] * 5)               # 9, 2 and 5 images
    order = class_balanced_order(classes, length, torch.Generator().manual_seed(0))
    assert len(order) == length
    counts = torch.bincount(classes[order], minlength=3).tolist()
    assert max(counts) - min(counts) <= 1 and sum(counts) == length
    for name in range(3):                                              # within a class: whole passes first
        picked = order[classes[order] == name].tolist()
        members = torch.nonzero(classes == name).flatten().tolist()
        assert set(picked) <= set(members)
        assert len(set(picked)) == min(len(picked), len(members))     # no repeat before every member was drawn
    assert torch.equal(order, class_balanced_order(classes, length, torch.Generator().manual_seed(0)))
    assert not torch.equal(order, class_balanced_order(classes, length, torch.Generator().manual_seed(1)))


def test_balanced_epoch_orders_keep_every_rank_in_step():
    classes = torch.tensor([0, 0, 0, 0, 1, 2, 2, 2, 2, 2, 2])          # the class of each shard item
    order = shard_order(len(classes), 12, 0, 0, 0, classes)
    assert len(order) == 12 and torch.bincount(classes[order]).tolist() == [4, 4, 4]
    single = Distributed(0, 0, 1, torch.device("cpu"))
    noise = torch.Generator()
    plain = single.epoch_order(0, 11, 11, torch.Generator().manual_seed(1), noise, 0, classes)
    assert torch.bincount(classes[plain]).tolist() == [4, 4, 3]


def test_single_process_context_is_the_plain_loop():
    single = Distributed(0, 0, 1, torch.device("cpu"))
    items = list("abcde")
    assert single.shard(items) == items and single.gather(items) == items
    assert single.sum(3.0, 5) == (3.0, 5) and single.checkpoint_info(4) == {}
    model = torch.nn.Linear(2, 2)
    assert single.wrap(model) is model
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    noise = torch.Generator().manual_seed(2)
    before = noise.get_state()
    assert torch.equal(single.epoch_order(3, 9, 9, a, noise, seed=0), torch.randperm(9, generator=b))
    assert torch.equal(noise.get_state(), before)                      # the noise stream is untouched
    assert single.from_main(lambda x: x + 1, 1) == 2
    with pytest.raises(ValueError, match="cannot be shared"):
        Distributed(0, 0, 3, torch.device("cpu")).shard([1, 2])


def test_other_commands_refuse_to_run_under_torchrun(monkeypatch, capsys):
    from rlr.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    assert main(["test", "--run", "nowhere"]) == 2
    assert "single-process command" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")                                     # the same refusal, reported by rank 0 only
    assert main(["predict", "--run", "nowhere", "x.png", "--out", "o"]) == 2
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------- launches

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def torchrun(args, nproc=2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "rlr"] + [str(a) for a in args]
    return subprocess.run(command, cwd=REPO, env=worker_env(), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT)


def spawn_ranks(args, world=2, **extra) -> list:
    """The ranks of a job started by hand (what torchrun does, without its agent that kills the rest)."""
    port = free_port()
    worker = REPO / "tests" / "_ddp_worker.py"
    return [subprocess.Popen([sys.executable, str(worker)] + [str(a) for a in args], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=worker_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                                            RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                                            **extra))
            for rank in range(world)]


def load(run):
    return torch.load(Path(run) / "checkpoint.pt", weights_only=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ddp") / "data", n_train=3, n_test_good=1, n_test_defect=2)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data):
    """2 ranks, 2 epochs, a shared feature cache."""
    root = tmp_path_factory.mktemp("ddp_run")
    run, cache = root / "run", root / "cache"
    done = torchrun(["train", "--data-root", data, "--out", run, "--epochs", 2, "--cache-dir", cache] + TINY_FLAGS)
    assert done.returncode == 0, done.stdout + done.stderr
    return run, cache, done


def test_torchrun_trains_a_valid_run_that_rlr_test_reads(ddp_run, data, capsys):
    from rlr.cli import main

    run, cache, done = ddp_run
    # Rank 0 alone logs; nothing went wrong on either rank.
    assert done.stdout.count("epoch 2/2") == 1 and done.stdout.count("next: rlr test") == 1
    assert "global batch 4" in done.stdout and "rlr: error" not in done.stderr
    state = load(run)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert state["distributed"] == {"world_size": 2, "backend": "gloo", "global_batch": 4}
    assert state["data"]["train_images"] == 6
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "threshold.json"]   # no temporary file
    # Each rank cached its own shard: two shards, disjoint, together the 6 training images.
    folder, = (cache / "features").iterdir()
    shards = [s["hashes"] for s in json.loads((folder / "index.json").read_text())["shards"].values()]
    train_images = sorted(p for p in Path(data).glob("*/train/good/*.png"))
    assert len(shards) == 2 and all(len(s) == 3 for s in shards)
    assert sorted(shards[0] + shards[1]) == sorted(file_digest(str(p)) for p in train_images)
    # `rlr test` (one process) reads the run and writes metrics.json in the schema.
    assert main(["test", "--run", str(run), "--cache-dir", str(cache), "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    names = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")
    assert set(metrics["classes"]) == {"fabric", "washer"} and set(metrics["mean"]) == set(names)
    for values in metrics["classes"].values():
        assert set(values) == set(names) and all(0 <= values[m] <= 1 for m in names)
    assert "I-AUROC" in capsys.readouterr().out


@pytest.mark.slow
def test_lost_rank_stops_the_job_and_resume_continues_exactly(ddp_run, data, tmp_path):
    reference, cache, _ = ddp_run
    run = tmp_path / "run"
    # Rank 1 dies at its first step of epoch 2 (3 images per rank, batch 2: 2 steps per epoch).
    ranks = spawn_ranks(["train", "--data-root", data, "--out", run, "--epochs", 2, "--cache-dir", cache] + TINY_FLAGS,
                        RLR_TEST_FAIL="1:2:exit")
    outputs = [rank.communicate(timeout=LAUNCH_TIMEOUT) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [2, 17]
    message = outputs[0][1]
    assert "rlr: error: rank 0/2: lost contact with the other ranks" in message and "--resume" in message
    assert load(run)["epoch"] == 1                                   # the last complete epoch
    # Restarting with --resume continues exactly: the same weights as the uninterrupted 2-epoch run.
    done = torchrun(["train", "--out", run, "--resume", "--cache-dir", cache, "--quiet"])
    assert done.returncode == 0, done.stdout + done.stderr
    resumed, uninterrupted = load(run), load(reference)
    assert resumed["epoch"] == 2
    for name, value in uninterrupted["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=0, msg=name)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in uninterrupted["history"]]


@pytest.mark.slow
def test_stalled_rank_ends_the_job_after_the_timeout(data, tmp_path):
    ranks = spawn_ranks(["train", "--data-root", data, "--out", tmp_path / "run", "--epochs", 2, "--cache-dir",
                         tmp_path / "cache", "--dist-timeout", "0.1"] + TINY_FLAGS, RLR_TEST_FAIL="1:2:hang")
    try:
        _, err = ranks[0].communicate(timeout=LAUNCH_TIMEOUT)
        assert ranks[0].returncode == 2
        assert "lost contact" in err and "0.1 min timeout" in err and "--resume" in err
    finally:
        ranks[1].send_signal(signal.SIGKILL)
        ranks[1].communicate()


@pytest.mark.slow
def test_setup_failure_on_one_rank_is_reported_once(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=3, n_test_good=1, n_test_defect=1)
    broken = sorted((data / "fabric" / "train" / "good").iterdir())[1]   # image 1: rank 1's shard
    broken.write_bytes(b"not an image")
    done = torchrun(["train", "--data-root", data, "--out", tmp_path / "run", "--cache-dir", tmp_path / "cache"]
                    + TINY_FLAGS)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("rlr: error")]
    assert len(errors) == 1, done.stderr                            # once, by the rank it happened on
    assert errors[0].startswith(f"rlr: error: rank 1/2: cannot read image {broken}")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_distributed_does_not_import_training():
    code = "import sys, rlr.distributed; assert 'rlr.train' not in sys.modules, 'rlr.distributed imports rlr.train'"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))
