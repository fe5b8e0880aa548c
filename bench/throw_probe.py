"""Which C++ exceptions crash this machine: one probe per throw path, each in its own process.

On one GPU machine (H200, torch 2.11, Python 3.12, extension built there) every argument check that
threw in C++ killed the process with SIGSEGV instead of raising: one from the CUDA host code and one
from the CPU code through the dispatcher. It never happens on the CPU machines. Each probe below
throws from one more place; which ones crash (and the toolchain facts printed with them) tell where
the fault lies: torch itself, our extension as built there, only once CUDA is initialised, or only
in the nvcc-compiled code.

Usage: python bench/throw_probe.py            (exit status 1 if any probe crashed or failed)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

# name -> (what it needs: "" | "cuda build" | "gpu" | "ninja", code that must raise an exception in Python)
PROBES: dict[str, tuple[str, str]] = {
    "torch_builtin": ("", "torch.ones(2) + torch.ones(3)"),
    "cpu_kernel_op": ("", "torch.ops.bquant.native_lsq_bwd(w, w, s, 4, True, 1)"),
    "cpu_autograd_op": ("", "torch.ops.bquant.native_lsq_multi([w], [s], [4], True, [1])"),
    "cpu_kernel_op_after_cuda_init": ("gpu", "torch.cuda.init(); torch.ops.bquant.native_lsq_bwd(w, w, s, 4, True, 1)"),
    "cpu_autograd_op_after_cuda_init": (
        "gpu",
        "torch.cuda.init(); torch.ops.bquant.native_lsq_multi([w], [s], [4], True, [1])",
    ),
    "cuda_kernel_op": ("gpu", "torch.ops.bquant.native_lsq_fwd(w.cuda().double(), s.cuda(), 4, True, 12)"),
    # A minimal extension built here and now (pybind11 + c10 only, torch's default flags): whether any
    # extension built on this machine crashes on a throw, or only ours.
    "fresh_extension": ("ninja", "fresh_extension().throw_check(-1)"),
}

FRESH_SOURCE = r"""
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>
void throw_check(int v) { TORCH_CHECK(v > 0, "probe: v must be positive, got ", v); }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("throw_check", &throw_check); }
"""

PRELUDE = """
import torch
import bquant_kernels
from bquant_kernels import extension
assert extension.ext is not None, extension.unavailable_reason
w, s = torch.randn(4, 3), torch.ones(1)


def fresh_extension():
    import atexit, os, shutil, tempfile
    from torch.utils import cpp_extension
    build = tempfile.mkdtemp(prefix="bq-throw-probe-")
    atexit.register(shutil.rmtree, build, True)
    with open(os.path.join(build, "probe.cpp"), "w") as f:
        f.write({fresh_source!r})
    return cpp_extension.load("bq_throw_probe", [os.path.join(build, "probe.cpp")], build_directory=build)


try:
    {code}
except (RuntimeError, ValueError, TypeError) as err:
    print(type(err).__name__ + ": " + str(err).splitlines()[0][:120])
else:
    raise SystemExit("no exception")
"""


def start_probe(code: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-X", "faulthandler", "-c", PRELUDE.format(code=code, fresh_source=FRESH_SOURCE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def verdict(proc: subprocess.Popen) -> tuple[str, str]:
    """(verdict, detail): 'raised' when the exception reached Python, else 'CRASH' or 'FAIL'."""
    out, _ = proc.communicate(timeout=120)
    if proc.returncode == 0:
        return "raised", out.strip().splitlines()[-1]  # the exception line (after any warnings)
    tail = " | ".join(out.strip().splitlines()[-3:])
    if proc.returncode < 0:
        return f"CRASH (signal {-proc.returncode})", tail
    return f"FAIL (exit {proc.returncode})", tail


def toolchain() -> list[str]:
    """The compilers the build used and the C++ runtime the process loads."""
    lines = [f"python: {sys.version.split()[0]} ({sys.executable})"]
    for tool in ("c++", "g++", "gcc", "cc"):
        path = shutil.which(tool)
        if path:
            out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.splitlines()
            lines.append(f"{tool}: {os.path.realpath(path)}: {out[0] if out else '?'}")
    for var in ("CC", "CXX", "NVCC_CCBIN", "NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS", "LD_PRELOAD"):
        if os.environ.get(var):
            lines.append(f"{var}={os.environ[var]}")
    code = (
        "import torch, bquant_kernels, re\n"
        "from bquant_kernels import extension\n"
        "print('extension:', getattr(extension.ext, '__file__', None))\n"
        "maps = open('/proc/self/maps').read().splitlines()\n"
        "libs = sorted({ln.split()[-1] for ln in maps if re.search(r'lib(stdc\\+\\+|gcc_s|c10)[.-]', ln)})\n"
        "print('loaded:', ' '.join(libs))\n"
        "print('torch built with the cxx11 abi:', torch._C._GLIBCXX_USE_CXX11_ABI)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines += (proc.stdout + proc.stderr).strip().splitlines()
    ext = [ln.split("extension: ", 1)[1] for ln in lines if ln.startswith("extension: ")]
    if ext and shutil.which("ldd") and os.path.exists(ext[0]):
        ldd = subprocess.run(["ldd", ext[0]], capture_output=True, text=True).stdout.splitlines()
        lines += ["ldd: " + ln.strip() for ln in ldd if re.search(r"lib(stdc\+\+|gcc_s|c10|cudart)[.-]", ln)]
    return lines


def main() -> int:
    import torch

    from bquant_kernels import extension

    have = {
        "": True,
        "gpu": torch.cuda.is_available(),
        "cuda build": extension.ext is not None and extension.has_cuda(),
        "ninja": shutil.which("ninja") is not None,
    }
    print("# toolchain")
    for line in toolchain():
        print("  " + line)
    print("# probes (each in its own process, run side by side)", flush=True)
    started = {name: start_probe(code) for name, (needs, code) in PROBES.items() if have[needs]}
    crashed = False
    for name, (needs, _code) in PROBES.items():
        if name not in started:
            print(f"  {name:32s} skipped: needs a {needs}")
            continue
        result, detail = verdict(started[name])
        crashed |= result != "raised"
        print(f"  {name:32s} {result}: {detail}", flush=True)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
