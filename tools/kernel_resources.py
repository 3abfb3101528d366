"""The GPU kernels compiled here, without a GPU, and what they use: registers, spills, shared
memory, tensor-core instructions and theoretical occupancy, per kernel x dtype x head dim x arch.

    python -m tools.kernel_resources                       # the full grid: a table, and the limits checked
    python -m tools.kernel_resources --arch 90 --dtype bf16 --head-dim 64
    python -m tools.kernel_resources --json builds.json    # the records, for tests and other tools
    python -m tools.kernel_resources --write-docs          # regenerate the tables of docs/kernels.md
                                                           # (Triton, and the CUDA extension through nvcc)

Triton: every kernel of both ops (and ``_row_dot_kernel``) is compiled by
``rlr_kernels/triton/aot.py`` with the launch configuration the launchers choose on that GPU
(A100: sm_80, 108 SMs; H100/H200: sm_90, 132 SMs; B200: sm_100, 148 SMs), for
``aot.Problem(head_dim)``, the paper's 32x32 level. The cubin is read with the ``cuobjdump`` of the
triton wheel: registers and stack from its resource usage, spills from the SASS (bytes stored to and
loaded from local memory, ``STL``/``LDL``: what ``ptxas -v`` reports as spill stores/loads), tensor
cores from the SASS (``HMMA``, ``HGMMA`` = wgmma, ``UTC*MMA`` = tcgen05), shared memory from
Triton's metadata.

A build fails the check (exit status 1, each failure named) on a compile error, shared memory over
the architecture's per-block limit, an attention kernel without tensor-core instructions, or a
register spill in a 16-bit (fp16/bf16) build. fp32 spills are reported, not failed.

CUDA extension (``--cuda``, part of ``--write-docs``): ``.ci/compile_cuda.sh`` with ``ptxas -v``
for every architecture; the registers, spills, stack and static shared memory of each kernel
instantiation.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "kernels.md"
DTYPES = ("fp32", "bf16", "fp16")
HEAD_DIMS = (16, 32, 64, 128)
ROW_DOT = "_row_dot_kernel"   # the one kernel that is no attention: no tensor cores expected


@dataclass(frozen=True)
class Arch:
    """Per-SM and per-block limits of one compute capability (CUDA C Programming Guide, "Technical
    Specifications per Compute Capability"; the occupancy rules of CUDA's cuda_occupancy.h)."""

    capability: int
    gpu: str
    sms: int
    shared_per_block: int          # bytes, opt-in maximum (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    shared_per_sm: int             # bytes
    registers_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    reserved_shared_per_block: int = 1024
    shared_granularity: int = 128
    register_granularity: int = 256   # registers per warp are allocated in units of this
    sub_partitions: int = 4

    @property
    def name(self) -> str:
        return f"sm_{self.capability}"

    def occupancy(self, registers: int, warps: int, shared: int) -> float:
        """Theoretical occupancy: resident warps per SM over the maximum, as cuda_occupancy.h
        computes it (registers allocated per warp in 256s, per sub-partition; shared memory in
        128-byte units plus the 1 KiB the system reserves per block)."""
        regs_per_warp = math.ceil(registers * 32 / self.register_granularity) * self.register_granularity
        by_regs = (self.registers_per_sm // self.sub_partitions // regs_per_warp * self.sub_partitions // warps
                   if regs_per_warp else self.max_blocks_per_sm)
        smem = math.ceil(shared / self.shared_granularity) * self.shared_granularity + self.reserved_shared_per_block
        by_smem = self.shared_per_sm // smem
        blocks = min(by_regs, by_smem, self.max_warps_per_sm // warps, self.max_blocks_per_sm)
        return blocks * warps / self.max_warps_per_sm


ARCHES = {
    80: Arch(80, "A100", 108, shared_per_block=166912, shared_per_sm=167936),
    90: Arch(90, "H100/H200", 132, shared_per_block=232448, shared_per_sm=233472),
    100: Arch(100, "B200", 148, shared_per_block=232448, shared_per_sm=233472),
}


@dataclass
class Build:
    """One kernel compiled for one (dtype, head dim, architecture), and what its cubin uses."""

    kernel: str
    op: str
    dtype: str
    head_dim: int
    capability: int
    config: dict                   # the launch's constexprs and options: BLOCK_M, BLOCK_N, num_warps, ...
    copies: int = 1                # reference copies R of the local op's call
    num_warps: int = 0
    registers: int = 0
    spill_stores: int = 0          # bytes, static count over the SASS (ptxas -v's "spill stores")
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0                # bytes per block (dynamic + static)
    tensor_core: dict = field(default_factory=dict)   # SASS opcode -> count
    occupancy: float = 0.0
    compile_s: float = 0.0
    error: Optional[str] = None

    @property
    def name(self) -> str:
        return self.kernel + (f" R={self.copies}" if self.copies > 1 else "")

    @property
    def label(self) -> str:
        return f"{self.name} {self.dtype} d{self.head_dim} sm_{self.capability}"

    def failures(self) -> list:
        """What makes this build unfit for its GPU (empty: it passes)."""
        if self.error:
            return [f"{self.label}: compile error: {self.error}"]
        arch, found = ARCHES[self.capability], []
        if self.shared > arch.shared_per_block:
            found.append(f"{self.label}: {self.shared} B of shared memory, over the {arch.shared_per_block} B "
                         f"per block of {arch.name}")
        if self.kernel != ROW_DOT and not self.tensor_core:
            found.append(f"{self.label}: no tensor-core instruction (HMMA/HGMMA/UTC*MMA) in its SASS")
        if self.dtype != "fp32" and self.spill_stores:
            found.append(f"{self.label}: spills {self.spill_stores} B of registers "
                         f"({self.registers} registers, {self.num_warps} warps, config {self.config})")
        return found


# ------------------------------------------------------------------------------------ the cubin


def _nvidia_tool(knob: str, file_name: Optional[str] = None) -> str:
    """Path of a CUDA tool of the triton wheel: ``triton.knobs.nvidia.<knob>`` where this triton has
    it, else the wheel's ``backends/nvidia/bin/<file_name>``."""
    import triton
    tool = getattr(getattr(getattr(triton, "knobs", None), "nvidia", None), knob, None)
    path = getattr(tool, "path", None)
    return path or str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / (file_name or knob))


_TENSOR_CORE = re.compile(r"\b(HMMA|HGMMA|UTC\w*MMA|IMMA|QMMA|BMMA)\b")
_LOCAL = re.compile(r"\b(STL|LDL)((?:\.\w+)*)\s")
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def local_memory_bytes(sass: str) -> tuple:
    """(bytes stored, bytes loaded) by the STL / LDL instructions of a SASS listing: register spills
    (the kernels keep no arrays in local memory)."""
    stored = loaded = 0
    for opcode, suffixes in _LOCAL.findall(sass):
        width = next((_WIDTH[s] for s in suffixes.split(".") if s in _WIDTH), 4)
        if opcode == "STL":
            stored += width
        else:
            loaded += width
    return stored, loaded


def tensor_core_counts(sass: str) -> dict:
    counts: dict = {}
    for opcode in _TENSOR_CORE.findall(sass):
        counts[opcode] = counts.get(opcode, 0) + 1
    return counts


def inspect_cubin(cubin: bytes) -> dict:
    """registers, stack (bytes), static shared memory, spills and tensor-core opcodes of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", text)
    if usage is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text[:2000]}")
    stores, loads = local_memory_bytes(text)
    return dict(registers=int(usage[1]), stack=int(usage[2]), static_shared=int(usage[3]), spill_stores=stores,
                spill_loads=loads, tensor_core=tensor_core_counts(text))


# ------------------------------------------------------------------------------------ the builds


def _torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def build_task(capability: int, dtype: str, head_dim: int) -> list:
    """Every distinct kernel launched by both ops' forward and backward (``aot.Problem(head_dim)``)
    on ``ARCHES[capability]``, compiled and inspected: the local op with one reference copy (the
    model's default) and with two (its delta kernel, and the loops over copies not specialised
    away; ``copies`` 2 in the record)."""
    from rlr_kernels.triton import aot, utils
    arch = ARCHES[capability]
    target = utils.GpuTarget(capability, arch.sms)
    builds, seen = [], set()
    for op, copies in (("local", 1), ("local", 2), ("masked", 1)):
        for launch in aot.launches(op, aot.Problem(head_dim=head_dim, copies=copies), _torch_dtype(dtype), target):
            name = launch.kernel.__name__
            key = (name, 1 if name == ROW_DOT else copies)   # row_dot is the same kernel in both ops
            if key in seen:
                continue
            seen.add(key)
            config = {k: v for k, v in launch.meta.items() if k != "PRECISION"}
            build = Build(name, op, dtype, head_dim, capability, config, copies=key[1])
            start = time.perf_counter()
            try:
                compiled = aot.compile_launch(launch, target)
            except Exception as err:  # a compile error is a finding, reported with the others
                build.error = f"{type(err).__name__}: {str(err).strip()[-1500:]}"
                builds.append(build)
                continue
            build.compile_s = round(time.perf_counter() - start, 2)
            found = inspect_cubin(compiled.asm["cubin"])
            build.num_warps = compiled.metadata.num_warps
            build.registers, build.stack = found["registers"], found["stack"]
            build.spill_stores, build.spill_loads = found["spill_stores"], found["spill_loads"]
            build.shared = compiled.metadata.shared + found["static_shared"]
            build.tensor_core = found["tensor_core"]
            build.occupancy = arch.occupancy(build.registers, build.num_warps, build.shared)
            builds.append(build)
    return builds


def supported_capabilities(wanted) -> list:
    """The capabilities of ``wanted`` the ptxas of the triton wheel can compile for."""
    supported = []
    for capability in wanted:
        path = _nvidia_tool("ptxas_blackwell", "ptxas-blackwell") if capability >= 100 else _nvidia_tool("ptxas")
        try:
            help_text = subprocess.run([path, "--help"], capture_output=True, text=True).stdout
        except OSError:
            continue
        if f"sm_{capability}" in help_text:
            supported.append(capability)
    return supported


def run_grid(capabilities, dtypes, head_dims, jobs: int) -> list:
    """All builds of the grid, ``jobs`` processes compiling side by side."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: the interpreter replaces the kernels, nothing would compile "
                           "(unset it for this tool)")
    tasks = [(c, t, d) for c in capabilities for t in dtypes for d in head_dims]
    if jobs <= 1:
        return [b for task in tasks for b in build_task(*task)]
    with ProcessPoolExecutor(jobs) as pool:
        return [b for builds in pool.map(build_task, *zip(*tasks)) for b in builds]


# ------------------------------------------------------------------------------------ CUDA extension


def cuda_home() -> Optional[str]:
    """CUDA_HOME, or the toolkit folder of the nvcc on PATH (which may be a wrapper script)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    from shutil import which
    nvcc = which("nvcc")
    if nvcc is None:
        return None
    text = Path(nvcc).read_text(errors="replace") if Path(nvcc).stat().st_size < 100_000 else ""
    real = re.search(r"(/\S*?/bin/nvcc)\b", text)
    real_nvcc = real[1] if real else os.path.realpath(nvcc)
    return str(Path(real_nvcc).parent.parent)


@dataclass
class CudaBuild:
    kernel: str                    # demangled, e.g. "masked_forward_kernel<__nv_bfloat16>"
    capability: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    static_shared: int


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)a?'")
_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_log(text: str, demangle=lambda names: names) -> list:
    """The per-kernel records of ``ptxas -v`` output (nvcc -Xptxas -v)."""
    builds, current = [], None
    for line in text.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            current = dict(kernel=m[1], capability=int(m[2]), stack=0, spill_stores=0, spill_loads=0)
        elif current is not None and (m := _PTXAS_PROPS.search(line)):
            current.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif current is not None and (m := _PTXAS_USED.search(line)):
            current.update(registers=int(m[1]), static_shared=int(m[2] or 0))
            builds.append(CudaBuild(**current))
            current = None
    names = demangle([b.kernel for b in builds])
    for build, name in zip(builds, names):
        build.kernel = name
    return builds


def _demangler(home: str):
    """Demangle with the toolkit's cu++filt, or binutils' c++filt (same Itanium mangling); names
    lose the return type, the parameters and the namespaces."""
    def demangle(names):
        from shutil import which
        tool = Path(home) / "bin" / "cu++filt"
        tool = str(tool) if tool.exists() else which("c++filt")
        if not names or tool is None:
            return names
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
        return [re.sub(r"^void |\(.*$", "", n.replace("rlr::cuda::", "").replace("(anonymous namespace)::", ""))
                for n in out[:len(names)]]
    return demangle


def cuda_builds(capabilities) -> list:
    """Every CUDA kernel of csrc/cuda compiled by ``.ci/compile_cuda.sh`` for each capability, with
    ptxas's figures."""
    home = cuda_home()
    if home is None:
        raise RuntimeError("no CUDA toolkit: set CUDA_HOME or put nvcc on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "ptxas.log"
        arch_list = " ".join(f"{c // 10}.{c % 10}" for c in capabilities)
        env = dict(os.environ, CUDA_HOME=home, TORCH_CUDA_ARCH_LIST=arch_list, PTXAS_LOG=str(log),
                   COMPILE_CUDA_SKIP_CPP="1")
        result = subprocess.run(["bash", str(REPO / ".ci" / "compile_cuda.sh")], capture_output=True, text=True,
                                env=env)
        if result.returncode != 0:
            raise RuntimeError(f".ci/compile_cuda.sh failed:\n{result.stderr[-3000:]}")
        return parse_ptxas_log(log.read_text(), _demangler(home))


# ------------------------------------------------------------------------------------ tables

BEGIN, END = "<!-- kernel-resources:begin -->", "<!-- kernel-resources:end -->"
CONFIG_BEGIN, CONFIG_END = "<!-- block-sizes:begin -->", "<!-- block-sizes:end -->"


def _tiles(config: dict) -> str:
    tiles = "×".join(str(config[k]) for k in ("BLOCK_M", "BLOCK_N") if k in config)
    return f"{tiles} w{config.get('num_warps', 4)} s{config.get('num_stages', 3)}"


def _name(build: Build) -> str:
    return f"`{build.kernel}`" + (f" R={build.copies}" if build.copies > 1 else "")


def _tensor_core(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "–"


def triton_table(builds: list) -> str:
    """One markdown table per architecture: kernel x dtype x head dim."""
    order = {name: i for i, name in enumerate(
        ["_local_fwd_kernel", "_local_bwd_delta_kernel", "_local_bwd_dq_kernel", "_local_bwd_dkdv_kernel",
         "_masked_fwd_kernel", ROW_DOT, "_masked_bwd_dq_kernel", "_masked_bwd_dkdv_kernel"])}
    lines = []
    for capability in sorted({b.capability for b in builds}):
        arch = ARCHES[capability]
        rows = sorted((b for b in builds if b.capability == capability),
                      key=lambda b: (b.copies, order.get(b.kernel, 99), DTYPES.index(b.dtype), b.head_dim))
        lines += [f"#### {arch.name} ({arch.gpu}, {arch.sms} SMs, {arch.shared_per_block // 1024} KiB shared "
                  "per block)", "",
                  "| kernel | dtype | d | tiles (M×N), warps, stages | registers | spills (B) | shared (KiB) "
                  "| occupancy | tensor-core SASS |",
                  "|---|---|---:|---|---:|---:|---:|---:|---|"]
        for b in rows:
            if b.error:
                lines.append(f"| {_name(b)} | {b.dtype} | {b.head_dim} | {_tiles(b.config)} | compile error "
                             "| | | | |")
                continue
            spills = f"**{b.spill_stores}**" if b.spill_stores else "0"
            lines.append(f"| {_name(b)} | {b.dtype} | {b.head_dim} | {_tiles(b.config)} | {b.registers} | "
                         f"{spills} | {b.shared / 1024:.1f} | {b.occupancy:.0%} | {_tensor_core(b.tensor_core)} |")
        lines.append("")
    return "\n".join(lines)


def cuda_table(builds: list) -> str:
    """One row per kernel instantiation, the architectures side by side (registers / spill bytes)."""
    capabilities = sorted({b.capability for b in builds})
    rows: dict = {}
    for b in builds:
        rows.setdefault(b.kernel, {})[b.capability] = b
    lines = ["| kernel | " + " | ".join(f"sm_{c} registers / spills (B)" for c in capabilities)
             + " | stack (B) | static shared (B) |",
             "|---|" + "---:|" * (len(capabilities) + 2)]
    for kernel in sorted(rows):
        by_arch = rows[kernel]
        cells = [f"{by_arch[c].registers} / {by_arch[c].spill_stores}" if c in by_arch else "–" for c in capabilities]
        stack = max(b.stack for b in by_arch.values())
        shared = max(b.static_shared for b in by_arch.values())
        lines.append(f"| `{kernel}` | " + " | ".join(cells) + f" | {stack} | {shared} |")
    return "\n".join(lines) + "\n"


def summary(builds: list) -> str:
    spilled = [b for b in builds if b.spill_stores]
    by_dtype = {t: (sum(1 for b in spilled if b.dtype == t), sum(1 for b in builds if b.dtype == t)) for t in DTYPES}
    counts = ", ".join(f"{t} {s} of {n}" for t, (s, n) in by_dtype.items() if n)
    return f"{len(builds)} builds; spilling: {counts}; compile errors: {sum(1 for b in builds if b.error)}"


def config_table() -> str:
    """The GPU launch configurations of ``utils.GPU_TILES`` as a markdown table."""
    from rlr_kernels.triton import utils
    names = {"local_fwd": "local forward", "masked_fwd": "masked forward", "local_delta": "local delta (R > 1)",
             "local_dq": "local dq", "masked_dq": "masked dq", "local_dkdv": "local dk/dv",
             "masked_dkdv": "masked dk/dv"}
    lines = ["| kernel | fp16/bf16, d ≤ 16 | 32 | 64 | ≥ 128 | fp32, d ≤ 16 | 32 | 64 | ≥ 128 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for role in utils.KERNEL_ROLES:
        cells = [f"{m}×{n}, {w}, {s}" for width in (16, 32) for m, n, w, s in utils.GPU_TILES[role, width]]
        lines.append(f"| {names[role]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fill(text: str, begin: str, end: str, body: str, path: Path) -> str:
    if begin not in text or end not in text:
        raise RuntimeError(f"{path} has no {begin} ... {end} block to fill")
    head, rest = text.split(begin, 1)
    return head + begin + "\n" + body + end + rest.split(end, 1)[1]


def write_docs(builds: list, cuda: list, path: Path = DOCS) -> None:
    from rlr.atomic import atomic_write_text
    text = _fill(path.read_text(), CONFIG_BEGIN, CONFIG_END, config_table(), path)
    if BEGIN not in text or END not in text:
        raise RuntimeError(f"{path} has no {BEGIN} ... {END} block to fill")
    import triton
    body = [BEGIN, "",
            f"Generated by `python -m tools.kernel_resources --write-docs` (triton {triton.__version__}, "
            f"{summary(builds)}).", "", triton_table(builds)]
    if cuda:
        body += ["#### CUDA extension (`csrc/cuda`, `nvcc -Xptxas -v` through `.ci/compile_cuda.sh`)", "",
                 "The kernels take the head dim at run time, so one build serves every d; the dynamic shared "
                 "memory each launch asks for is computed by its launcher from d and the window (not in this "
                 "table).", "", cuda_table(cuda)]
    body.append(END)
    head, rest = text.split(BEGIN, 1)
    atomic_write_text(path, head + "\n".join(body) + rest.split(END, 1)[1])


# ------------------------------------------------------------------------------------ CLI


def _list(kind):
    def parse(text):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return values
    return parse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.kernel_resources", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=_list(int), default=sorted(ARCHES),
                   help="compute capabilities, comma-separated (default: 80,90,100; those the bundled ptxas "
                        "lacks are left out)")
    p.add_argument("--dtype", type=_list(str), default=list(DTYPES), help="fp32,bf16,fp16 (default: all)")
    p.add_argument("--head-dim", type=_list(int), default=list(HEAD_DIMS), help="default: 16,32,64,128")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes (default: all cores)")
    p.add_argument("--json", type=Path, help="write every build record to this file")
    p.add_argument("--cuda", action="store_true", help="also the CUDA extension's kernels (nvcc -Xptxas -v)")
    p.add_argument("--write-docs", action="store_true",
                   help=f"regenerate the tables in {DOCS.relative_to(REPO)} (implies --cuda)")
    args = p.parse_args(argv)
    for name in args.dtype:
        if name not in DTYPES:
            p.error(f"--dtype takes {','.join(DTYPES)}, got {name!r}")
    for capability in args.arch:
        if capability not in ARCHES:
            p.error(f"--arch takes {','.join(map(str, ARCHES))}, got {capability}")
    os.environ.pop("TRITON_INTERPRET", None)   # before triton is imported, here and in the workers
    capabilities = supported_capabilities(args.arch)
    for missing in sorted(set(args.arch) - set(capabilities)):
        print(f"kernel_resources: the bundled ptxas cannot compile for sm_{missing}: left out", file=sys.stderr)
    start = time.perf_counter()
    builds = run_grid(capabilities, args.dtype, args.head_dim, args.jobs)
    elapsed = time.perf_counter() - start
    cuda = cuda_builds(capabilities) if (args.cuda or args.write_docs) else []
    if args.json:
        from rlr.atomic import atomic_write_json
        atomic_write_json(args.json, {"builds": [asdict(b) for b in builds], "cuda": [asdict(b) for b in cuda],
                                      "seconds": round(elapsed, 1)})
    print(triton_table(builds))
    if cuda:
        print(cuda_table(cuda))
    if args.write_docs:
        write_docs(builds, cuda)
    failures = [f for b in builds for f in b.failures()]
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    print(f"kernel_resources: {summary(builds)}; {len(failures)} failures; {elapsed:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
