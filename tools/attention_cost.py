"""How the two attention ops' cost grows with the token grid, timed side by side.

    python -m tools.attention_cost [--grids 32=5,40=7,48=7,64=9] [--batch 8] [--heads 2] [--head-dim 32]

Times forward + backward of masked_key_attention and local_reference_attention (the fast
recipe's level-2 shape by default: batch 8, 2 heads of 32) for each grid side and window, the
sizes interleaved round by round so that a machine whose speed drifts (shared cores) slows all
of them alike; prints the median round. The ratios between grids are the figure to read: the
masked op scales with L^2 = side^4, the local op with L * window^2.
"""
from __future__ import annotations

import argparse
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


def time_ops(grids, batch: int, heads: int, head_dim: int, rounds: int, backend=None) -> dict:
    """{(side, window): (masked seconds, local seconds)}, the median of ``rounds`` interleaved rounds."""
    generator = torch.Generator().manual_seed(0)
    ops = {}
    for side, window in grids:
        length = side * side

        def leaf(*shape):
            return torch.randn(*shape, generator=generator).requires_grad_()

        q, v, k = leaf(batch, heads, length, head_dim), leaf(batch, heads, length, head_dim), leaf(heads, length, head_dim)
        k_ref, v_ref = leaf(1, heads, length, head_dim), leaf(1, heads, length, head_dim)
        grid = (side, side)
        ops[(side, window)] = (
            lambda q=q, k=k, v=v, grid=grid, window=window: rlr_kernels.masked_key_attention(
                q, k, v, grid=grid, window=window, backend=backend).sum().backward(),
            lambda q=q, k=k_ref, v=v_ref, grid=grid, window=window: rlr_kernels.local_reference_attention(
                q, k, v, grid=grid, window=window, backend=backend).sum().backward(),
        )
    times = {key: ([], []) for key in ops}
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
    args = p.parse_args(argv)
    result = time_ops(args.grids, args.batch, args.heads, args.head_dim, args.rounds, args.backend)
    base_masked, base_local = next(iter(result.values()))
    print(f"forward + backward, batch {args.batch}, {args.heads} heads of {args.head_dim}, float32, "
          f"{torch.get_num_threads()} threads; ratio to the first grid")
    for (side, window), (masked, local) in result.items():
        print(f"grid {side}x{side} window {window}: masked {1000 * masked:7.0f} ms ({masked / base_masked:5.1f}x)  "
              f"local {1000 * local:6.0f} ms ({local / base_local:4.1f}x)")
    return result


if __name__ == "__main__":
    main()
