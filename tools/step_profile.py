"""Where a training step's time goes: one RLR model's forward + backward + Adam, by operator.

    python -m tools.step_profile [--d-models 128,256] [--heads 4] [--layers 2] [--batch-size 8]
                                 [--input-size 256] [--precision auto|fp32|bf16] [--compile] [--steps 10]

Builds the model the run would build (its backbone's channels and grids at ``--input-size``: lite2's
for the wide recipe, else lite0's; the recipe's windows), feeds it random tokens of the cached
features' shapes and times ``--steps`` steps after a warm-up; prints the median step time and the
torch.profiler table grouped into the step's parts (the two attention ops, the dense layers, layer
norms, the loss, the optimiser, the rest).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from rlr.config import OFFLINE_BACKBONE, RLRConfig
from rlr.model import RLRModel
from rlr.train import training_loss, trains_in_bf16


def level_shapes(config) -> tuple:
    """Channels and grids of the config's levels, from the extractor a run would build (random weights: none loaded).

    A recipe on a backbone without offline weights (the paper's) is profiled at the offline lite0's.
    """
    from rlr.backbone import OFFLINE_PACKAGES, RANDOM_WEIGHTS, create_backbone

    name = config.backbone if config.backbone.split(".")[0] in OFFLINE_PACKAGES else OFFLINE_BACKBONE
    extractor = create_backbone(name, weights=RANDOM_WEIGHTS, out_indices=config.out_indices,
                                input_size=config.input_size, avg_pool=config.avg_pool, runtime="eager")
    return list(extractor.channels), list(extractor.grids)

PARTS = (
    ("local attention", ("rlr::local",)),
    # On CPUs without AVX-512 the float32 masked op runs inside ATen's flash attention (docs/extension.md).
    ("masked attention", ("rlr::masked", "aten::_scaled_dot_product_flash_attention_for_cpu")),
    ("dense (Linear/FFN)", ("aten::addmm", "aten::mm", "aten::linear", "aten::bmm", "aten::matmul", "aten::gelu",
                            "aten::gelu_backward")),
    ("layer norm", ("aten::native_layer_norm", "aten::native_layer_norm_backward", "aten::layer_norm")),
    ("optimiser", ("aten::_fused_adam_", "Optimizer.step")),
)


@contextlib.contextmanager
def labelled_kernels():
    """Name each kernel call in the profile (in eager mode the ops call the backends' kernels directly)."""
    from rlr_kernels import dispatch
    launchers = dispatch._launchers

    def labelled(op, backend):
        def wrap(kernel, what):
            def call(*args):
                with torch.profiler.record_function(f"rlr::{op}_{what}"):
                    return kernel(*args)
            return call
        forward, backward = launchers(op, backend)
        return wrap(forward, "forward"), wrap(backward, "backward")

    dispatch._launchers = labelled
    try:
        yield
    finally:
        dispatch._launchers = launchers


def build(args) -> tuple:
    config = RLRConfig.from_recipe(args.recipe, d_models=args.d_models, heads=args.heads, layers=args.layers,
                                   batch_size=args.batch_size, input_size=args.input_size, precision=args.precision)
    channels, grids = level_shapes(config)
    torch.manual_seed(0)
    model = RLRModel(config, channels, grids)
    return config, model, channels, grids


def make_step(config, model, channels, grids, compile_model: bool):
    device = torch.device("cpu")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    bf16 = trains_in_bf16(config, device)
    generator = torch.Generator().manual_seed(0)
    clean = [torch.randn(config.batch_size, g[0] * g[1], c, generator=generator) for c, g in zip(channels, grids)]
    forward = torch.compile(model) if compile_model else model

    def step():
        loss = training_loss(forward, clean, config.jitter_scale, generator, bf16, device.type)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step, bf16


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="fast")
    p.add_argument("--d-models", type=lambda s: tuple(int(v) for v in s.split(",")))
    p.add_argument("--heads", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--input-size", type=int)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"))
    p.add_argument("--compile", action="store_true", help="torch.compile the model (forward and backward)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-profile", action="store_true", help="time only")
    args = p.parse_args(argv)
    config, model, channels, grids = build(args)
    step, bf16 = make_step(config, model, channels, grids, args.compile)
    started = time.perf_counter()
    step()
    print(f"first step {time.perf_counter() - started:.2f} s (compile included: {args.compile})")
    for _ in range(2):
        step()
    times, cpu_times = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    # CPU time (all threads of this process) is the steadier figure on a shared machine.
    print(f"D {config.level_d_models()} heads {config.heads} layers {config.layers} batch {config.batch_size} "
          f"grids {grids} {'bf16' if bf16 else 'fp32'} threads {torch.get_num_threads()}: "
          f"step median {statistics.median(times) * 1e3:.1f} ms (min {min(times) * 1e3:.1f}), "
          f"CPU time median {statistics.median(cpu_times) * 1e3:.1f} ms")
    if args.no_profile:
        return 0
    with labelled_kernels(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    events = prof.key_averages()
    # record_function ranges have no self time of their own beyond the kernel they wrap
    total = sum(e.self_cpu_time_total for e in events)
    shares = {name: 0.0 for name, _ in PARTS}
    shares["other"] = 0.0
    for e in events:
        for name, keys in PARTS:
            if any(k in e.key for k in keys):
                shares[name] += e.self_cpu_time_total
                break
        else:
            shares["other"] += e.self_cpu_time_total
    for name, value in shares.items():
        print(f"  {name:22s} {100 * value / total:5.1f} %")
    print(events.table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
