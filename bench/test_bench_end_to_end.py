"""pytest-benchmark entry points of the end-to-end suite: ``pytest bench --benchmark-only``.

A training step (both levels, tf_efficientnet_lite0 shapes at 256 px, batch 4) and inference
(batch 16) of every method of bench/end_to_end.py, on CUDA when available, else CPU.
"""
import pytest
import torch

from bench import end_to_end
from bench.common import Skip

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LITE0 = dict(end_to_end.BACKBONE_SHAPES)["lite0"]


def _synchronised(call):
    def run():
        result = call()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
        return result
    return run


def _model(method):
    try:
        return end_to_end.build_model(method, LITE0, DEVICE)
    except Skip as skip:
        pytest.skip(str(skip))


@pytest.mark.parametrize("method", end_to_end.e2e_methods(DEVICE))
def test_train_step(benchmark, method):
    from rlr.train import add_jitter, reconstruction_loss

    model = _model(method).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    clean = end_to_end._features(end_to_end.ModelShape("lite0", LITE0, 4), DEVICE)
    noise = torch.Generator(device=DEVICE).manual_seed(1)

    def step():
        optimizer.zero_grad(set_to_none=True)
        noisy = [add_jitter(f, 4.0, noise) for f in clean]
        loss = sum(reconstruction_loss(r, f) for r, f in zip(model(noisy), clean))
        loss.backward()
        optimizer.step()

    benchmark.group = "train_step lite0 B4"
    benchmark.pedantic(_synchronised(step), rounds=3, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("method", end_to_end.e2e_methods(DEVICE))
def test_inference(benchmark, method):
    model = _model(method).eval()
    features = end_to_end._features(end_to_end.ModelShape("lite0", LITE0, 16), DEVICE)

    def infer():
        with torch.no_grad():
            return model(features)

    benchmark.group = "inference lite0 B16"
    benchmark.pedantic(_synchronised(infer), rounds=3, warmup_rounds=1, iterations=1)
