"""The Triton kernels compile for the GPUs we target, with no GPU here: the interpreter that runs the
Triton suite in CI does not type-check kernels the way the compiler does, and the "last program
finishes" step must become what its memory ordering relies on (one predicated acq_rel atomic per
program after a barrier, L2 reads of the partials)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")

REPO = Path(__file__).resolve().parents[2]

# Run without TRITON_INTERPRET (set for the rest of the suite by conftest): the interpreter replaces
# the jit functions that triton.compile needs.
SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bquant_kernels.backends.triton import batchquant, epilogue, gated, lsq

CONSTEXPRS = {"BLOCK": 1024, "TILE": 2048, "BLOCK_I": 64, "BLOCK_C": 128, "WITH_QPARAMS": True,
              "FINISH_S": 4, "FINISH_C": 256, "FROM_RANGE": False, "ACT": 2, "RANGE": True, "QUANT": True,
              "BATCH": True, "BLOCK_R": 32, "RESID": True, "KEEP": True, "GRAD_ACT": True, "BLOCK_N": 2,
              "BLOCK_S": 8, "CL": False, "GATED": False}
FLOATS = {"qmin", "qmax", "qn", "qp", "eps"}
BF16 = {"x_ptr", "y_ptr", "gate_ptr"}  # 16-bit data; the epilogue's also in and out of these (elsewhere fp32)
EPILOGUE_BF16 = {"out_ptr", "g_ptr", "gy_ptr", "r_ptr", "kept_ptr", "ga_ptr", "gr_ptr"}
GATED_DATA = {"x_ptr", "y_ptr", "gate_ptr", "g_ptr", "gx_ptr", "gg_ptr"}  # the gated kernels' data in x's dtype
KERNELS = [batchquant._channel_minmax_planes, batchquant._channel_minmax_rows, batchquant._quantize,
           batchquant._quantize_backward, lsq._lsq_quantize, lsq._lsq_quantize_backward,
           epilogue._stats_pass, epilogue._act_range_pass, epilogue._forward_elements, epilogue._backward_sums,
           epilogue._backward_elements, gated._gated_backward]
# (kernel, name suffix, constexpr overrides, data dtype): further instances; the gated op's forward is
# batchquant.py's kernels with GATED
VARIANTS = [(kernel, "", {}, "bf16") for kernel in KERNELS] + [
    (batchquant._channel_minmax_planes, " gated", {"GATED": True}, "bf16"),
    (batchquant._channel_minmax_rows, " gated", {"GATED": True}, "bf16"),
    (batchquant._quantize, " gated", {"GATED": True}, "bf16"),
    (batchquant._quantize, " gated range_fp32", {"GATED": True, "FROM_RANGE": True}, "fp32"),
    (gated._gated_backward, " cl_fp32", {"CL": True}, "fp32"),
]

def jit_of(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel

out = {}
for arch in (80, 90):
    for kernel, suffix, overrides, data in VARIANTS:
        fn = jit_of(kernel)
        sig, consts = {}, {}
        for i, name in enumerate(fn.arg_names):
            if fn.params[i].is_constexpr:
                sig[name], consts[name] = "constexpr", overrides.get(name, CONSTEXPRS[name])
            elif name.endswith("_ptr"):
                # 16-bit data in and out (y: the forward's 16-bit branch), float32 qparams and partials
                if fn.__module__.endswith("gated"):
                    bf16 = name in GATED_DATA
                else:
                    bf16 = name in BF16 or (name in EPILOGUE_BF16 and fn.__module__.endswith("epilogue"))
                bf16 = bf16 and data == "bf16"
                sig[name] = "*i32" if "counter" in name else "*bf16" if bf16 else "*fp32"
            else:
                sig[name] = "fp32" if name in FLOATS else "i64" if name == "numel" else "i32"
        ptx = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                             target=GPUTarget("cuda", arch, 32)).asm["ptx"]
        lines = ptx.splitlines()
        atomics = [i for i, l in enumerate(lines) if "atom.global" in l]
        barrier_before = all(any("bar.sync" in l for l in lines[max(0, i - 40):i]) for i in atomics)
        out[f"sm_{arch} {fn.__name__}{suffix}"] = {
            "atomics": [lines[i].strip() for i in atomics],
            "barrier_before_atomic": barrier_before,
            "cg_loads": sum("ld.global.cg" in l for l in lines),
        }
print(json.dumps(out))
"""


def test_triton_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(kernels) == 34
    elementwise = {"_quantize", "_lsq_quantize", "_forward_elements", "_backward_elements"}
    finishing = [name for name in kernels if name.split()[1] not in elementwise]
    for name in finishing:  # the kernels whose last program finishes the reduction
        k = kernels[name]
        assert len(k["atomics"]) == 1, (name, k)
        atomic = k["atomics"][0]
        assert atomic.startswith("@%p") and ".gpu.acq_rel.add" in atomic, (name, atomic)  # one thread, acq_rel
        assert k["barrier_before_atomic"], name
        assert k["cg_loads"] > 0, name  # the partials are read past L1
    for name in set(kernels) - set(finishing):
        assert kernels[name]["atomics"] == [], name
