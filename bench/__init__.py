"""rlr benchmarks: ``python -m bench`` (see bench/__main__.py and docs/bench.md)."""
import os

# CPU peak memory is read from torch.profiler (kineto), which otherwise logs a misleading
# "gpuGetDeviceCount failed" ERROR line per measurement on machines without a GPU.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")
