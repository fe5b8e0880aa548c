"""Build of bquant: the extension ``bquant_kernels._C`` (C++ CPU kernels always, CUDA kernels when
nvcc and a CUDA-enabled torch are present), compiled with ninja.

Knobs (environment):
  BQUANT_CUDA=0|1        skip / require the CUDA kernels (default: build them when possible)
  CUDA_HOME              CUDA toolkit (default /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST   GPU targets (default "8.0;9.0+PTX")
  MAX_JOBS               parallel compile jobs
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[bquant setup] {msg}", file=sys.stderr, flush=True)


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return home if os.path.exists(os.path.join(home, "bin", "nvcc")) else None


def _extensions():
    import torch
    from torch.utils import cpp_extension

    want = os.environ.get("BQUANT_CUDA", "auto")
    if want not in ("0", "1", "auto"):
        raise SystemExit(f"BQUANT_CUDA must be 0, 1 or unset, got {want!r}")
    cuda_home = _cuda_home()
    why_not = None
    if want == "0":
        why_not = "BQUANT_CUDA=0"
    elif torch.version.cuda is None:
        why_not = f"torch {torch.__version__} is a CPU-only build"
    elif cuda_home is None:
        why_not = "no nvcc under CUDA_HOME or /usr/local/cuda"
    if why_not and want == "1":
        raise SystemExit(f"BQUANT_CUDA=1 but the CUDA kernels cannot be built: {why_not}")
    with_cuda = why_not is None

    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/ops.cpp", "csrc/bindings.cpp"]
    # -ffp-contract=off: no fused multiply-adds the source does not spell out, so every CPU kernel
    # (and each of its instruction-set variants) rounds exactly as the scalar spec code does.
    # -Wno-unknown-pragmas / -Wno-psabi: ATen's vector headers use `#pragma unroll` (not a GCC
    # pragma) and pass AVX vectors by value (GCC notes the 2011 ABI change); csrc/cpu/kernels_avx2.cpp.
    # No -std flag: torch's cpp_extension adds the standard its headers need (C++20 for torch 2.14).
    cxx = ["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", "-ffp-contract=off"]
    cxx += ["-Wno-unknown-pragmas", "-Wno-psabi"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    if with_cuda:
        # torch's cpp_extension reads CUDA_HOME at import; make sure it sees the real toolkit.
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("BQUANT_WITH_CUDA", "1"))
        # No -std flag: torch's cpp_extension adds the standard its headers need (C++17 or C++20).
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler=-Wall"]
        ext = cpp_extension.CUDAExtension(
            "bquant_kernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
        _log(f"building CPU + CUDA kernels (CUDA_HOME={cuda_home}, arch {os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        ext = cpp_extension.CppExtension(
            "bquant_kernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
        )
        _log(f"building CPU kernels only ({why_not})")
    _log(f"sources: {' '.join(sources)}")
    return [ext], cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


ext_modules, build_ext = _extensions()

setup(
    name="bquant",
    version="0.1.0",
    packages=find_packages(include=["bquant_kernels", "bquant_kernels.*", "qfa", "qfa.*"]),
    package_data={"qfa.published": ["*.jsonl"]},  # the published Pareto front (qfa eval --subnets published-pareto)
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    entry_points={"console_scripts": ["qfa = qfa.cli:entry"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "train": ["torchvision", "scikit-learn", "pyyaml"],
        "search": ["pymoo", "matplotlib", "onnx"],
    },
)
