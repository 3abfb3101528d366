"""Builds and runs the CUDA kernels of csrc/cuda on the CPU (tests/cuda_emulation/): a check of
their LOGIC, not of their speed, and no substitute for running them on a GPU.

The very files nvcc compiles (every csrc/cuda/*.cu, with the headers they share with the CPU
kernels, csrc/*.h) are compiled with g++ against the stand-in CUDA headers of tests/cuda_emulation. Two CUDA-only syntaxes are rewritten on the way, mechanically,
keeping every line where it was (``#line`` points errors and reports at the original file):
``kernel<<<config>>>(args)`` becomes ``::emu::launch("file:line", config)(kernel, args)`` and
``extern __shared__ T name[];`` becomes a pointer to the emulated block's shared memory. The kernel
files are compiled with ``-fsanitize=thread`` so that every memory access calls the shadow-memory
checks of runtime.cpp (no TSan runtime is involved). Builds are cached by the hash of everything that
goes into them.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from rlr.atomic import atomic_write_bytes

REPO = Path(__file__).resolve().parent.parent
CUDA_SOURCES = REPO / "csrc" / "cuda"
# Headers the CUDA and CPU kernels share (csrc/window.h, ...), included as "../window.h".
SHARED_HEADERS = REPO / "csrc"
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"
COMMON_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-I", str(EMULATION / "include"),
                "-I", str(EMULATION), "-I", str(CUDA_SOURCES)]
# -fsanitize=thread only inserts the access hooks (runtime.cpp defines them); loop distribution
# would turn fill loops into memset calls, which are not hooked.
KERNEL_FLAGS = ["-fsanitize=thread", "-fno-tree-loop-distribute-patterns"]

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # rlr::cuda::DType
STAT_NAMES = ("launches", "optin_launches", "blocks", "threads", "barriers", "shared_accesses")


class EmulationError(RuntimeError):
    """A launcher returned an error, or the emulation saw a race, a barrier skipped, a bad access."""


def compiler() -> str | None:
    return shutil.which("g++")


# ------------------------------------------------------------------------------------------------
# Source rewriting.

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\((\s*\))?", re.S)
_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:]*)\s+(\w+)\s*\[\s*\]\s*;")
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


def translate(text: str, name: str) -> str:
    """The .cu source `text` (shown as `name` in reports) as C++ that g++ compiles against cuda_emu.h."""

    def launch(m: re.Match) -> str:
        line = text.count("\n", 0, m.start()) + 1
        kernel, config, empty_args = m.group(1), m.group(2), m.group(3)
        where = f'"{name}:{line} ({kernel})"'
        return f"::emu::launch({where}, {config})({kernel}" + (")" if empty_args else ", ")

    out = _LAUNCH.sub(launch, text)
    out = _EXTERN_SHARED.sub(lambda m: f"{m.group(1)}* const {m.group(2)} = ::emu::dynamic_shared<{m.group(1)}>();",
                             out)
    code = _COMMENT.sub("", out)
    for token, what in (("<<<", "a kernel launch"), ("__shared__", "a __shared__ declaration")):
        if token in code:
            line = _COMMENT.sub(lambda m: "\n" * m.group(0).count("\n"), out)[: code.index(token)].count("\n") + 1
            raise ValueError(f"{name}:{line}: the CUDA emulation cannot rewrite {what} of this form (it "
                             f"handles `kernel<<<...>>>(...)` and `extern __shared__ T x[];`)")
    return f'#line 1 "{name}"\n{out}'


# ------------------------------------------------------------------------------------------------
# Build (cached).


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _headers_digest(cxx: str) -> str:
    headers = sorted(EMULATION.rglob("*.h")) + sorted(CUDA_SOURCES.glob("*.cuh")) + sorted(CUDA_SOURCES.glob("*.h"))
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    return _digest(version, COMMON_FLAGS, KERNEL_FLAGS, *(p.read_bytes() for p in headers))


def _compile(cxx: str, source_text: str, suffix: str, flags: list[str], cache: Path, headers: str,
             shared: dict[str, str]) -> Path:
    """Compile `source_text` as if it sat in csrc/cuda, next to the `shared` headers (name -> text)
    in the folder above it: the "../window.h" includes see exactly the (patched) text hashed."""
    obj = cache / f"{_digest(headers, source_text, flags)}.o"
    if obj.exists():
        return obj
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in shared.items():
            (Path(tmp) / name).write_text(text)
        src = Path(tmp) / "cuda" / f"source{suffix}.cpp"
        src.parent.mkdir()
        src.write_text(source_text)
        result = subprocess.run([cxx, *COMMON_FLAGS, *flags, "-c", str(src), "-o", str(Path(tmp) / "out.o")],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling the CUDA emulation failed:\n{result.stderr[-6000:]}")
        atomic_write_bytes(obj, (Path(tmp) / "out.o").read_bytes())
    return obj


def build(cache: Path, patches: list[tuple[str, str, str]] = ()) -> Path:
    """The emulation library, built into (or found in) `cache`.

    `patches` are (file, old text, new text), the file a .cu in csrc/cuda or a shared header in csrc
    ("window.h"): the first occurrence of old text is replaced in an in-memory copy before compiling
    (the negative controls plant bugs this way).
    """
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no g++ on PATH")
    cache.mkdir(parents=True, exist_ok=True)
    sources = {p.name: p.read_text() for p in sorted(CUDA_SOURCES.glob("*.cu"))}
    shared = {p.name: p.read_text() for p in sorted(SHARED_HEADERS.glob("*.h"))}
    for file, old, new in patches:
        texts, folder = (sources, "csrc/cuda") if file in sources else (shared, "csrc")
        if file not in texts or old not in texts[file]:
            raise ValueError(f"patch for {folder}/{file}: text {old!r} not found (the source changed?)")
        texts[file] = texts[file].replace(old, new, 1)
    headers = _digest(_headers_digest(cxx), *(part for item in shared.items() for part in item))
    jobs = [(translate(text, f"csrc/cuda/{name}"), f"_{Path(name).stem}", KERNEL_FLAGS)
            for name, text in sources.items()]
    jobs.append(((EMULATION / "runtime.cpp").read_text(), "_runtime", []))
    # runtime.cpp is compiled from the copy in the temporary folder: its includes go through -I.
    with ThreadPoolExecutor(max_workers=2) as pool:
        objects = list(pool.map(lambda job: _compile(cxx, *job, cache, headers, shared), jobs))
    library = cache / f"emulation-{_digest(*(o.name for o in objects))}.so"
    if not library.exists():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "lib.so"
            result = subprocess.run([cxx, "-shared", "-Wl,-z,defs", "-o", str(out), *map(str, objects)],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"linking the CUDA emulation failed:\n{result.stderr[-6000:]}")
            atomic_write_bytes(library, out.read_bytes())
    return library


# ------------------------------------------------------------------------------------------------
# Running the host launchers of csrc/cuda/launch.h.


class _Dims(ctypes.Structure):  # rlr::cuda::Dims
    _fields_ = [(n, ctypes.c_int) for n in ("B", "R", "H", "h", "w", "d", "window")] + [("scale", ctypes.c_float)]


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _nan_like(t: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """Outputs start as NaN: an element a kernel forgets to write fails the comparison."""
    return torch.full(tuple(t.shape) if shape is None else shape, math.nan, dtype=dtype or t.dtype)


class Emulator:
    """The four launchers of csrc/cuda/launch.h on contiguous CPU tensors (float32, float16, bfloat16)."""

    def __init__(self, library: Path):
        self.lib = ctypes.CDLL(str(library))
        for name in ("local_forward", "local_backward", "masked_forward", "masked_backward"):
            getattr(self.lib, f"rlr_emu_{name}").restype = ctypes.c_char_p

    def stats(self) -> dict[str, int]:
        values = (ctypes.c_long * len(STAT_NAMES))()
        self.lib.rlr_emu_stats(values)
        return dict(zip(STAT_NAMES, values))

    def convert(self, direction: str, x: torch.Tensor) -> torch.Tensor:
        """The stand-in conversions of cuda_emu.h: direction 'float_to_half', 'bfloat16_to_float', ..."""
        source, target = direction.split("_to_")
        out = torch.empty(x.shape, dtype=torch.float32 if target == "float" else torch.int16)
        getattr(self.lib, f"rlr_emu_{direction}")(_ptr(x), _ptr(out), ctypes.c_long(x.numel()))
        return out

    def _call(self, name: str, dtype: torch.dtype, dims: _Dims, *tensors) -> None:
        if dtype not in DTYPES:
            raise TypeError(f"the CUDA kernels take float32, float16 or bfloat16, got {dtype}")
        message = getattr(self.lib, f"rlr_emu_{name}")(DTYPES[dtype], ctypes.byref(dims), *map(_ptr, tensors))
        if message:
            raise EmulationError(message.decode())

    @staticmethod
    def _dims(q, copies, grid, window) -> _Dims:
        B, H, L, d = q.shape
        if grid[0] * grid[1] != L:
            raise ValueError(f"grid {grid} does not match L={L}")
        return _Dims(B, copies, H, grid[0], grid[1], d, window, 1.0 / math.sqrt(d))

    def local_forward(self, q, k, v, grid, window):
        B, H, L, _ = q.shape
        out, lse = _nan_like(q), _nan_like(q, (B, k.shape[0], H, L), torch.float32)
        self._call("local_forward", q.dtype, self._dims(q, k.shape[0], grid, window), q, k, v, out, lse)
        return out, lse

    def local_backward(self, q, k, v, lse, grad_out, grid, window):
        dq, dk, dv, D = _nan_like(q), _nan_like(k), _nan_like(v), _nan_like(lse)
        self._call("local_backward", q.dtype, self._dims(q, k.shape[0], grid, window), q, k, v, lse, grad_out, dq,
                   dk, dv, D)
        return dq, dk, dv

    def masked_forward(self, q, k, v, grid, window):
        B, H, L, _ = q.shape
        out, lse = _nan_like(q), _nan_like(q, (B, H, L), torch.float32)
        self._call("masked_forward", q.dtype, self._dims(q, 1, grid, window), q, k, v, out, lse)
        return out, lse

    def masked_backward(self, q, k, v, out, lse, grad_out, grid, window):
        dq, dk, dv, D = _nan_like(q), _nan_like(k), _nan_like(v), _nan_like(lse)
        dk_partial = _nan_like(q, dtype=torch.float32)
        self._call("masked_backward", q.dtype, self._dims(q, 1, grid, window), q, k, v, out, lse, grad_out, dq, dk,
                   dv, D, dk_partial)
        return dq, dk, dv

    def forward_backward(self, op: str, q, k, v, grad_out, grid, window):
        """[out, dq, dk, dv] of one op, the way the cuda backend's autograd function calls the kernels."""
        q, k, v, grad_out = (t.contiguous() for t in (q, k, v, grad_out))
        if op == "local":
            out, lse = self.local_forward(q, k, v, grid, window)
            return [out, *self.local_backward(q, k, v, lse, grad_out, grid, window)]
        out, lse = self.masked_forward(q, k, v, grid, window)
        return [out, *self.masked_backward(q, k, v, out, lse, grad_out, grid, window)]
