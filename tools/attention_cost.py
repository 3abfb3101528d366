"""How the two attention ops' cost grows with the token grid, timed side by side.

    python -m tools.attention_cost [--grids 32=5,40=7,48=7,64=9] [--batch 8] [--heads 2] [--head-dim 32]
                                   [--dtype float32|bfloat16] [--baseline-extension OLD_C.so]

Times forward + backward of masked_key_attention and local_reference_attention (the fast
recipe's level-2 shape by default: batch 8, 2 heads of 32) for each grid side and window, the
sizes interleaved round by round so that a machine whose speed drifts (shared cores) slows all
of them alike; prints the median round. The ratios between grids are the figure to read: the
masked op scales with L^2 = side^4, the local op with L * window^2.

``--baseline-extension`` times the masked op's kernels of another build of rlr_kernels._C (e.g. the
previous release's, kept aside before rebuilding) against this build's, side by side in the same rounds.
"""
from __future__ import annotations

import argparse
import importlib.util
import time

import torch

import rlr_kernels


def parse_grids(text: str) -> list:
    try:
        pairs = [tuple(int(v) for v in item.split("=")) for item in text.split(",") if item.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected SIDE=WINDOW pairs, e.g. 32=5,48=7; got {text!r}")
    return pairs


def load_extension(path: str):
    """Another build of rlr_kernels._C, loaded beside this one (its own module name, the same init symbol)."""
    spec = importlib.util.spec_from_file_location("rlr_baseline._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_pair(extension, q, k, v, grid, window):
    """Forward + backward of the masked op straight through an extension's kernels (the backend contract)."""
    def run():
        out, lse = extension.masked_forward(q, k, v, grid[0], grid[1], window)
        extension.masked_backward(q, k, v, out, lse, torch.ones_like(out), grid[0], grid[1], window)
    return run


def time_ops(grids, batch: int, heads: int, head_dim: int, rounds: int, backend=None, dtype=torch.float32,
             baseline=None) -> dict:
    """{(side, window): (masked seconds, local seconds[, baseline masked seconds])}, the median of ``rounds``
    interleaved rounds."""
    generator = torch.Generator().manual_seed(0)
    ops = {}
    for side, window in grids:
        length = side * side

        def leaf(*shape):
            return torch.randn(*shape, generator=generator).to(dtype).requires_grad_()

        q, v, k = leaf(batch, heads, length, head_dim), leaf(batch, heads, length, head_dim), leaf(heads, length, head_dim)
        k_ref, v_ref = leaf(1, heads, length, head_dim), leaf(1, heads, length, head_dim)
        grid = (side, side)
        ops[(side, window)] = (
            lambda q=q, k=k, v=v, grid=grid, window=window: rlr_kernels.masked_key_attention(
                q, k, v, grid=grid, window=window, backend=backend).sum().backward(),
            lambda q=q, k=k_ref, v=v_ref, grid=grid, window=window: rlr_kernels.local_reference_attention(
                q, k, v, grid=grid, window=window, backend=backend).sum().backward(),
        )
        if baseline is not None:   # both builds through their kernels, so that they pay the same overheads
            from rlr_kernels import _C
            inputs = [t.detach() for t in (q, k, v)]
            ops[(side, window)] = (kernel_pair(_C, *inputs, grid, window), ops[(side, window)][1],
                                   kernel_pair(baseline, *inputs, grid, window))
    times = {key: tuple([] for _ in pair) for key, pair in ops.items()}
    for _ in range(rounds):
        for key, pair in ops.items():
            for op, record in zip(pair, times[key]):
                started = time.perf_counter()
                op()
                record.append(time.perf_counter() - started)
    return {key: tuple(sorted(r)[len(r) // 2] for r in records) for key, records in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", type=parse_grids, default=parse_grids("32=5,40=7,48=7,64=9"),
                   help="SIDE=WINDOW pairs (default 32=5,40=7,48=7,64=9)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--backend", choices=("reference", "triton", "cpp", "cuda"), help="default: the fastest available")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--baseline-extension", metavar="FILE",
                   help="another build of rlr_kernels/_C*.so whose masked op is timed beside this build's")
    args = p.parse_args(argv)
    baseline = load_extension(args.baseline_extension) if args.baseline_extension else None
    result = time_ops(args.grids, args.batch, args.heads, args.head_dim, args.rounds, args.backend,
                      getattr(torch, args.dtype), baseline)
    base_masked, base_local = next(iter(result.values()))[:2]
    print(f"forward + backward, batch {args.batch}, {args.heads} heads of {args.head_dim}, {args.dtype}, "
          f"{torch.get_num_threads()} threads; ratio to the first grid")
    for (side, window), times in result.items():
        masked, local = times[:2]
        line = (f"grid {side}x{side} window {window}: masked {1000 * masked:7.0f} ms ({masked / base_masked:5.1f}x)  "
                f"local {1000 * local:6.0f} ms ({local / base_local:4.1f}x)")
        if baseline is not None:
            line += f"  baseline build's masked {1000 * times[2]:7.0f} ms ({times[2] / masked:.2f}x this build's)"
        print(line)
    return result


if __name__ == "__main__":
    main()
