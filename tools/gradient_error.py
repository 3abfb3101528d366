"""How far a bf16 training step's gradients are from float32's, with each CPU attention path.

    python -m tools.gradient_error --run runs/realmini-fast --data-root ../shared/data/realmini [--batches 4]

Takes a trained run and a few training batches (jittered exactly as in training, fixed seeds) and
computes the gradient of the training loss with respect to every parameter three ways:
float32 (the reference here), bf16 autocast with the masked attention on AMX tiles, and bf16
autocast with the AMX path off (``RLR_CPU_AMX=0``: the attention computes in float32 from bf16
inputs). It prints, per batch, the relative error ``|g - g_fp32| / |g_fp32|`` of the whole gradient
and the parameters with the largest error; for scale, it first prints how far each batch's float32
gradient lies from the mean gradient of the batches. If both bf16 rows agree, the AMX attention
adds nothing measurable to the error that bf16 autocast itself brings.
"""
import argparse
import os
from unittest import mock

import torch

from rlr.data import load_dataset
from rlr.inference import open_run
from rlr.features import FeatureCache
from rlr.train import add_jitter, reconstruction_loss, training_samples
from rlr_kernels.cpp import masked_amx_available


def gradients(model, batches, jitter_scale: float, bf16: bool, amx: bool) -> list:
    """One {name: grad} dict per batch; the jitter of batch b is drawn from seed b."""
    result = []
    # The extension reads RLR_CPU_AMX on every call.
    with mock.patch.dict(os.environ, {"RLR_CPU_AMX": "1" if amx else "0"}):
        for seed, clean in enumerate(batches):
            noise = torch.Generator().manual_seed(seed)
            noisy = [add_jitter(f, jitter_scale, noise) for f in clean]
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                reconstructions = model(noisy)
            sum(reconstruction_loss(r, f) for r, f in zip(reconstructions, clean)).backward()
            result.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})
    return result


def relative_errors(got: dict, want: dict) -> tuple:
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])
    total = ((flat(got) - flat(want)).norm() / flat(want).norm()).item()
    per_parameter = {n: ((got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-30)).item() for n in want}
    return total, per_parameter


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a trained run folder (rlr train --out)")
    p.add_argument("--data-root", required=True)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--cache-dir")
    args = p.parse_args(argv)

    run, extractor, device = open_run(args.run, "cpu", backend="cpp")
    config, model = run.config, run.model.train()
    data = run.checkpoint["data"]
    samples, _ = training_samples(load_dataset(args.data_root, data["classes"], data.get("layout", "auto")),
                                  config.holdout, config.seed)   # the images the run trained on
    if not 1 <= args.batches <= len(samples) // config.batch_size:
        p.error(f"--batches must be from 1 to {len(samples) // config.batch_size} (full batches of "
                f"{config.batch_size} among the {len(samples)} training images), got {args.batches}")
    # Features of the drawn images only (the cache usually holds them all from training).
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
    drawn = order[:args.batches * config.batch_size]
    table = FeatureCache(extractor, args.cache_dir, device="cpu").features([samples[i].path for i in drawn],
                                                                            "train features")
    batches = [table.tensors(range(b * config.batch_size, (b + 1) * config.batch_size), "cpu")
               for b in range(args.batches)]

    reference = gradients(model, batches, config.jitter_scale, bf16=False, amx=False)
    # For scale: how far one batch's float32 gradient is from the mean over the batches (sampling noise).
    mean_gradient = {n: sum(g[n] for g in reference) / len(reference) for n in reference[0]}
    spread = [relative_errors(g, mean_gradient)[0] for g in reference]
    print("float32: each batch's gradient against the batches' mean (sampling noise) "
          + " ".join(f"{e:.4f}" for e in spread))
    paths = [("bf16, float32-compute attention", False)]
    if masked_amx_available():
        paths.insert(0, ("bf16, AMX attention", True))
    else:
        print("this CPU has no AMX: only the float32-compute attention path exists here")
    for label, amx in paths:
        errors = [relative_errors(got, want)
                  for got, want in zip(gradients(model, batches, config.jitter_scale, True, amx), reference)]
        print(f"{label}: relative gradient error per batch " + " ".join(f"{total:.4f}" for total, _ in errors))
        mean = {n: sum(e[1][n] for e in errors) / len(errors) for n in reference[0]}
        for name in sorted(mean, key=mean.get, reverse=True)[:3]:
            print(f"    {mean[name]:.4f}  {name}")


if __name__ == "__main__":
    main()
