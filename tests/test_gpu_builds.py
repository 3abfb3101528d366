"""The Triton kernels built for real GPUs here, without one: every kernel of both ops (and
``_row_dot_kernel``) compiled ahead of time for sm_80 (A100) and sm_90 (H100/H200), and sm_100
(B200) where the bundled ptxas has it, with the launch configuration the launchers choose on that
GPU; a build fails on a compile error, shared memory over the per-block limit, an attention kernel
without tensor-core instructions, or a register spill in a 16-bit build (tools/kernel_resources.py).
Also the pieces that need no compiler: configuration by target, the occupancy rule, the SASS and
ptxas-log parsers, and the roofline's work counts (tools/roofline.py)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
from bench.kernels import KernelShape  # noqa: E402
from rlr_kernels.triton import aot, utils  # noqa: E402
from rlr_kernels.window import window_sizes  # noqa: E402
from tools import kernel_resources as kr  # noqa: E402
from tools import roofline  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KERNELS = {"_local_fwd_kernel", "_local_bwd_delta_kernel", "_local_bwd_dq_kernel", "_local_bwd_dkdv_kernel",
           "_masked_fwd_kernel", "_row_dot_kernel", "_masked_bwd_dq_kernel", "_masked_bwd_dkdv_kernel"}
ROLE = {"_local_fwd_kernel": "local_fwd", "_local_bwd_delta_kernel": "local_delta",
        "_local_bwd_dq_kernel": "local_dq", "_local_bwd_dkdv_kernel": "local_dkdv",
        "_masked_fwd_kernel": "masked_fwd", "_masked_bwd_dq_kernel": "masked_dq",
        "_masked_bwd_dkdv_kernel": "masked_dkdv"}


# ------------------------------------------------------------------------------------ no compiler


@pytest.mark.parametrize("target", [utils.A100, utils.H100, utils.B200], ids=lambda t: f"sm_{t.capability}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_launchers_configure_for_the_target_they_are_given(target, dtype, head_dim):
    """What aot.py compiles is what the launchers launch: each launch carries block_config's answer for
    its kernel on that target, and the dk/dv launch splits the batch for that target's SM count."""
    problem = aot.Problem(head_dim=head_dim)
    for op in ("local", "masked"):
        launches = aot.launches(op, problem, dtype, target)
        names = [x.kernel.__name__ for x in launches]
        assert set(names) <= KERNELS and len(names) == 4, names
        for x in launches:
            if x.kernel.__name__ == "_row_dot_kernel":
                continue
            cfg = utils.block_config(ROLE[x.kernel.__name__], head_dim, dtype, target)
            assert {k: x.meta[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages")} == \
                utils.launch_meta(cfg)
        dkdv = launches[-1]
        L = problem.height * problem.width
        programs = (problem.copies if op == "local" else 1) * problem.heads * math.ceil(L / dkdv.meta["BLOCK_N"])
        assert dkdv.grid[2] == utils.batch_splits(problem.batch, programs, target)
    assert utils.batch_splits(16, 64, utils.A100) == 4 and utils.batch_splits(16, 64, utils.H100) == 5


def test_without_a_gpu_or_capture_the_launchers_configure_for_the_interpreter():
    assert utils.launch_target(torch.device("cpu")) is None
    assert utils.block_config("masked_fwd", 32, torch.float32, None) == utils.BlockConfig(32, 32, 32, 4, 1)
    with utils.capture(utils.H100):
        assert utils.launch_target(torch.device("cpu")) == utils.H100
    assert utils.launch_target(torch.device("cpu")) is None
    with pytest.raises(ValueError, match="kernel must be one of"):
        utils.block_config("masked_forward", 32, torch.float32, None)


def test_occupancy_follows_the_cuda_occupancy_rules():
    h100 = kr.ARCHES[90]
    assert h100.occupancy(255, 4, 0) == 8 / 64          # 8 KiB registers a warp: 2 warps per sub-partition
    assert h100.occupancy(128, 8, 0) == 16 / 64         # two blocks of 8 warps
    assert h100.occupancy(32, 4, 0) == 1.0              # 16 blocks of 4 warps fill the 64 warps
    assert h100.occupancy(64, 4, 100 * 1024) == 8 / 64  # shared memory: two blocks of 100 KiB (+1 KiB each)
    assert kr.ARCHES[80].occupancy(64, 4, 100 * 1024) == 4 / 64


def test_spills_and_tensor_cores_are_read_from_the_sass():
    sass = """
        /*0100*/                   STL [R1+0x4], R12 ;
        /*0110*/                   STL.64 [R1+0x8], R14 ;
        /*0120*/                   STL.128 [R1+0x10], R16 ;
        /*0130*/                   LDL.LU R12, [R1+0x4] ;
        /*0140*/                   HMMA.16816.F32.BF16 R20, R4, R8, R20 ;
        /*0150*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0160*/                   HMMA.16816.F32.BF16 R20, R4, R8, R20 ;
    """
    assert kr.local_memory_bytes(sass) == (4 + 8 + 16, 4)
    assert kr.tensor_core_counts(sass) == {"HMMA": 2, "HGMMA": 1}


def test_ptxas_log_of_nvcc_is_parsed_per_kernel():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooIfEvPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooIfEvPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 380 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_80'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers, 352 bytes cmem[0]
"""
    builds = kr.parse_ptxas_log(log)
    assert [(b.kernel, b.capability, b.registers, b.spill_stores, b.spill_loads, b.stack, b.static_shared)
            for b in builds] == [("_Z3fooIfEvPf", 90, 40, 8, 12, 16, 1024), ("_Z3barv", 80, 12, 0, 0, 0, 0)]


def _build(**fields):
    base = dict(kernel="_masked_fwd_kernel", op="masked", dtype="bf16", head_dim=64, capability=90,
                config={"BLOCK_M": 64}, num_warps=4, registers=168, shared=40 * 1024, tensor_core={"HGMMA": 24})
    return kr.Build(**{**base, **fields})


def test_a_build_fails_on_spills_in_16_bit_shared_memory_and_missing_tensor_cores():
    assert _build().failures() == []
    assert "spills 16 B" in _build(spill_stores=16).failures()[0]
    assert _build(dtype="fp32", spill_stores=16).failures() == []          # fp32 spills are reported only
    assert "shared memory" in _build(capability=80, shared=200 * 1024).failures()[0]
    assert "no tensor-core instruction" in _build(tensor_core={}).failures()[0]
    assert _build(kernel="_row_dot_kernel", tensor_core={}).failures() == []
    assert "compile error" in _build(error="CompilationError: boom").failures()[0]


def test_roofline_counts_the_tiles_the_kernels_visit():
    shape = KernelShape(batch=2, heads=3, height=16, width=16, head_dim=32, window=5)
    works = {(w.op, w.kernel): w for w in roofline.model("bfloat16", "h100", [shape])}
    L = shape.tokens
    fwd = works[("masked", "_masked_fwd_kernel")]
    bm = bn = 64                                       # the 16-bit forward tiles at d = 32
    assert fwd.tensor_flops == shape.batch * shape.heads * (L // bm) * (L // bn) * 2 * 2 * bm * bn * 32
    assert fwd.exp2 == shape.batch * shape.heads * L * L
    local = works[("local", "_local_fwd_kernel")]
    pairs = shape.batch * shape.heads * int(window_sizes(16, 16, 5).sum())
    assert pairs <= local.exp2 < fwd.exp2               # every window pair, far from all L^2 pairs
    q_bytes = shape.batch * shape.heads * L * 32 * 2
    assert fwd.bytes == 3 * q_bytes + shape.heads * L * 32 * 2 + shape.batch * shape.heads * L * 4
    fp32 = {(w.op, w.kernel): w for w in roofline.model("float32", "h100", [shape])}
    cfg = utils.block_config("masked_fwd", 32, torch.float32, utils.H100)
    tiles = shape.batch * shape.heads * (L // cfg.block_m) * (L // cfg.block_n)
    assert fp32[("masked", "_masked_fwd_kernel")].tensor_flops == 3 * tiles * 4 * cfg.block_m * cfg.block_n * 32


def test_roofline_names_the_bound():
    peak = roofline.PEAKS["h100"]
    base = dict(op="masked", pass_="fwd", shape="s", dtype="bfloat16", kernel="k", programs=1000, config="")
    seconds, bound = roofline.Work(**base, tensor_flops=989.4e9, exp2=0, bytes=0).predict(peak)
    assert bound == "tensor" and seconds == pytest.approx(1e-3)
    assert roofline.Work(**base, tensor_flops=0, exp2=0, bytes=3.35e9).predict(peak) == (pytest.approx(1e-3), "memory")
    assert roofline.Work(**base, tensor_flops=1e9, exp2=1e9, bytes=0).predict(peak)[1] == "exp2"
    few = roofline.Work(**{**base, "programs": 66}, tensor_flops=989.4e9, exp2=0, bytes=0)
    assert few.predict(peak)[0] == pytest.approx(2e-3)    # half the SMs idle
    assert roofline.Work(**{**base, "dtype": "float32"}, tensor_flops=494.7e9, exp2=0,
                         bytes=0).predict(peak)[0] == pytest.approx(1e-3)


# ------------------------------------------------------------------------------------ compiled


def _compile_grid(tmp_path, *args):
    """tools.kernel_resources in a fresh process (the test session runs triton's interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "builds.json"
    result = subprocess.run([sys.executable, "-m", "tools.kernel_resources", "--json", str(out), *args], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=3600)
    assert out.exists(), result.stderr[-4000:]
    return result, json.loads(out.read_text())["builds"]


# Per (arch, dtype, head dim): the local op with one reference copy (the model's default) and with
# two (its delta kernel; loops over copies not specialised away), the masked op, and row_dot.
BUILDS = {(k, 1) for k in KERNELS - {"_local_bwd_delta_kernel"}} | {
    (k, 2) for k in ("_local_fwd_kernel", "_local_bwd_delta_kernel", "_local_bwd_dq_kernel", "_local_bwd_dkdv_kernel")}


def _check(result, builds, capabilities, dtypes, head_dims):
    capabilities = kr.supported_capabilities(capabilities)
    assert {(b["capability"], b["dtype"], b["head_dim"], b["kernel"], b["copies"]) for b in builds} == {
        (c, t, d, k, r) for c in capabilities for t in dtypes for d in head_dims for k, r in BUILDS}
    failures = [line for line in result.stderr.splitlines() if line.startswith("FAIL")]
    assert result.returncode == 0 and not failures, "\n".join(failures) or result.stderr[-4000:]
    spilled = [f"{b['kernel']} R={b['copies']} {b['dtype']} d{b['head_dim']} sm_{b['capability']}: "
               f"{b['spill_stores']} B" for b in builds if b["spill_stores"]]
    print(f"{len(builds)} builds; fp32 spills: {spilled or 'none'}")


@pytest.mark.skipif(not kr.supported_capabilities([80, 90]), reason="the triton wheel ships no ptxas for sm_80/sm_90")
def test_every_kernel_compiles_for_a100_h100_and_b200_without_16_bit_spills(tmp_path):
    result, builds = _compile_grid(tmp_path)
    _check(result, builds, sorted(kr.ARCHES), list(kr.DTYPES), list(kr.HEAD_DIMS))
