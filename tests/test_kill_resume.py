"""`rlr train` killed with SIGKILL at random moments resumes every time and ends bitwise where an
uninterrupted run ends (the real command line, in subprocesses, on a tiny generated data set)."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from _pipeline import make_dataset
from rlr.run import CHECKPOINT_FILE, load_checkpoint

pytestmark = pytest.mark.timm   # trains or loads the lite0 backbone: timm, which imports torchvision

KILLS = 5
# 2 classes x 4 images, batch 2: 4 optimiser steps per epoch, a checkpoint after every step.
TRAIN = ["--backbone", "tf_efficientnet_lite0", "--backbone-weights", "random", "--input-size", "64", "--heads", "2",
         "--layers", "1", "--d-models", "16,32", "--window", "8=3", "--window", "4=3", "--batch-size", "2",
         "--epochs", "8", "--lr", "1e-3", "--backend", "reference", "--precision", "fp32", "--seed", "3"]


def _tensors(value, prefix=""):
    """(name, tensor) of every tensor in a nested checkpoint value."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{prefix}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{prefix}/{i}")


def _checkpoint_id(path):
    """Changes with every rewrite: each one renames a new file (a new inode) over the old."""
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_training_killed_at_random_moments_resumes_to_the_same_weights(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=4)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")   # same threads in every process
    common = ["--save-every", "1", "--quiet", "--cache-dir", str(tmp_path / "cache")]

    def start(out, resume):
        args = ["--resume"] if resume else ["--data-root", str(data), *TRAIN]
        return subprocess.Popen([sys.executable, "-m", "rlr", "train", "--out", str(out), *args, *common], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    reference = start(tmp_path / "once", resume=False)   # the uninterrupted run, alongside
    seed = random.randrange(2 ** 32)
    rng = random.Random(seed)
    run, kills = tmp_path / "killed", 0
    checkpoint = run / CHECKPOINT_FILE
    while kills < KILLS:
        process = start(run, resume=checkpoint.exists())
        # Let it write 1 to 3 new checkpoints (progress), then kill it anywhere within the next step or write.
        for _ in range(rng.randint(1, 3)):
            seen = _checkpoint_id(checkpoint)
            while _checkpoint_id(checkpoint) == seen and process.poll() is None:
                time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))
        assert process.poll() is None, (f"seed {seed}: `rlr train` ended before kill {kills + 1} (status "
                                        f"{process.returncode}): {process.stderr.read()}")
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
        kills += 1
        load_checkpoint(run)   # readable after every kill
    final = start(run, resume=True)
    _, errors = final.communicate(timeout=300)
    assert final.returncode == 0, f"seed {seed}: the last resume failed: {errors}"
    _, errors = reference.communicate(timeout=300)
    assert reference.returncode == 0, errors

    once, killed = load_checkpoint(tmp_path / "once"), load_checkpoint(run)
    assert killed["epoch"] == once["epoch"] == 8 and killed["step"] == once["step"] == 0
    for key in ("model", "optimizer", "rng"):
        expected = dict(_tensors(once[key]))
        got = dict(_tensors(killed[key]))
        assert got.keys() == expected.keys() and expected
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), f"seed {seed}: {key}{name} differs after {kills} kills"
    assert [h["loss"] for h in killed["history"]] == [h["loss"] for h in once["history"]]
    # no temporary left behind; the threshold stored at the end is the uninterrupted run's
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "threshold.json"]
    assert (run / "threshold.json").read_text() == (tmp_path / "once" / "threshold.json").read_text()
