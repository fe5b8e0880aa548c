#!/usr/bin/env bash
# GPU check of bquant on one CUDA machine: records the environment, builds the extension in place
# with its CUDA kernels, runs the GPU tests (tests/kernels/, tests/qfa/; the argument-check test first,
# alone, then a probe of C++ throws), the kernel benchmarks (bench/kernels.py, bench/lsq_multi.py,
# bench/train_step.py, bench/epilogue.py) and a profile, measures the device-to-device copy bandwidth
# and writes a JSON summary of every stage. Each stage has its own time limit and a failed stage does
# not stop the next, so one run yields as much as it can. Whole run: under 9.5 minutes.
#
# Usage: OUT=/some/dir bash bench/gpu_check.sh        (OUT defaults to ./gpu_out)
#        STAGES="build kernels" bash bench/gpu_check.sh   (a subset, e.g. for a second, shorter run)
# Files under $OUT (these 8 only: the device tool brings back at most 8): env.txt build.log pytest.log
# bench.log kernels.json lsq_multi.json train_step.json gpu_check.json (epilogue.json goes into it)
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
BUDGET_S=${BUDGET_S:-535}  # hard end of the last stage; the summary gets (at most) 30 s more, under 9.5 minutes
RUN="${STAGES:-build isolated throw_probe native_bt pytest kernels lsq_multi train_step epilogue profile}"
STAGES=""           # "name:rc:seconds" entries for the summary

# Run a stage under `timeout`: min(its own limit, what is left of the budget minus `reserve` seconds
# kept for the stages after it). Output goes to the given log (appended) and to stdout's tail.
stage() {
  local name="$1" limit="$2" reserve="$3" log="$4"
  shift 4
  if [[ " $RUN " != *" $name "* ]]; then
    STAGES="$STAGES $name:not-run:0"
    return
  fi
  local left=$((BUDGET_S - SECONDS - reserve))
  ((left < limit)) && limit=$left
  if ((limit < 5)); then
    echo "[gpu_check] $name: skipped, no time left" | tee -a "$log"
    STAGES="$STAGES $name:skipped:0"
    return
  fi
  echo "[gpu_check] $name (limit ${limit}s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "[gpu_check] $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$log"
  STAGES="$STAGES $name:$rc:$((SECONDS - t0))"
}

# ----------------------------------------------------------------------------- environment
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -a)"
  echo "python: $($PY --version 2>&1)"
  timeout 60 $PY - <<'EOF' 2>&1
import torch
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "cuda available:", torch.cuda.is_available())
try:
    import triton
    print("triton:", triton.__version__)
except ImportError as err:
    print("triton: not importable:", err)
EOF
  echo "nvcc: $(/usr/local/cuda/bin/nvcc --version 2>&1 | tail -n 2 | tr '\n' ' ')"
  timeout 30 nvidia-smi 2>&1
} | tee "$OUT/env.txt"

# ----------------------------------------------------------------------------- build
export CUDA_HOME=/usr/local/cuda BQUANT_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
stage build 120 450 "$OUT/build.log" $PY -m pip install --no-build-isolation --no-deps -v -e .
timeout 60 $PY -c "import bquant_kernels as bk; print(bk.backends())" 2>&1 | tee -a "$OUT/build.log"

# ----------------------------------------------------------------------------- tests
# The input-checking test alone first, without xdist and with faulthandler: a crash there (seen once)
# then leaves its stack in the log instead of a lost worker.
stage isolated 25 435 "$OUT/pytest.log" $PY -X faulthandler -m pytest -q -s -p no:cacheprovider -p no:xdist \
  tests/kernels/test_cuda.py -k "bad_input"
# One C++ throw per path (torch itself, the CPU kernel and autograd ops, the nvcc-compiled kernel op,
# each before and after CUDA is initialised, and a minimal extension built on the spot), each in
# its own process, with the compilers and C++ runtime: which throws crash, and so where the fault lies
# (it never happens on a CPU machine).
stage throw_probe 50 405 "$OUT/pytest.log" $PY bench/throw_probe.py
# If it crashed: its native stack, from cuda-gdb (the image has no gdb; cuda-gdb debugs host code too).
if [[ "$STAGES" == *" isolated:0:"* ]]; then
  RUN="${RUN/native_bt/}"
fi
stage native_bt 40 395 "$OUT/pytest.log" /usr/local/cuda/bin/cuda-gdb -batch -ex run -ex bt -ex quit --args \
  $PY -m pytest -q -s -p no:cacheprovider -p no:xdist tests/kernels/test_cuda.py -k "bad_input"
# The GPU-relevant tests (every backend x device pair, the CUDA and Triton suites, ops, modules, the
# quantized layers); the CPU-only rest runs in CI. pytest-xdist spreads them over 6 processes.
GPU_TESTS="tests/kernels/test_cuda.py tests/kernels/test_parity.py tests/kernels/test_triton.py tests/kernels/test_ops.py tests/kernels/test_modules.py
  tests/qfa/test_qfa_layers.py tests/qfa/test_qfa_train_step.py
  tests/kernels/test_epilogue.py::test_fused_on_cuda_matches_float64_composition
  tests/kernels/test_epilogue.py::test_residual_on_cuda_matches_float64_composition
  tests/kernels/test_gated.py::test_on_cuda_matches_float64_composition"
stage pytest 110 285 "$OUT/pytest.log" $PY -m pytest -q -rfE --tb=short -p no:cacheprovider -n 6 \
  --durations=10 $GPU_TESTS

# ----------------------------------------------------------------------------- benchmarks
# kernels.py writes its JSON after every case: a run cut by the time limit keeps what it measured.
# The shapes of the acceptance criteria: the largest QFA activation and the two small ones.
stage kernels 130 155 "$OUT/bench.log" $PY bench/kernels.py --shapes 64x144x56x56 64x24x14x14 64x1536 \
  --json "$OUT/kernels.json"
stage lsq_multi 20 135 "$OUT/bench.log" $PY bench/lsq_multi.py --json "$OUT/lsq_multi.json"
# One training step at 224 px, batch 64 (the acceptance setting): FP floor, published eager, fused CUDA.
stage train_step 30 105 "$OUT/bench.log" $PY bench/train_step.py --resolutions 224:224:1 --steps 2 \
  --variants fp eager cuda --json "$OUT/train_step.json"
# The fused epilogue (issue 18) at 224 px: Triton fused vs Triton unfused, step time, kernel time, peak memory.
stage epilogue 75 30 "$OUT/bench.log" $PY bench/epilogue.py --device cuda --resolutions 224:224:1 --steps 2 \
  --json "$OUT/epilogue.json"
stage profile 30 0 "$OUT/bench.log" $PY bench/profile_ops.py --impls cuda triton compiled --reps 10

# ----------------------------------------------------------------------------- summary
STAGES="$STAGES" OUT="$OUT" timeout --kill-after=5 30 $PY - <<'EOF' 2>&1 | tee -a "$OUT/bench.log"
import json
import os
import re
import subprocess
from datetime import datetime, timezone

out = os.environ["OUT"]
summary = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "stages": {}}


def write() -> None:
    summary["benchmarks"] = sorted(f for f in ("kernels.json", "lsq_multi.json", "train_step.json") if os.path.exists(os.path.join(out, f)))
    epilogue = os.path.join(out, "epilogue.json")  # a ninth file would not come back: folded in here
    if os.path.exists(epilogue):
        with open(epilogue) as f:
            summary["epilogue"] = json.load(f)
        os.remove(epilogue)
    summary["files"] = sorted(set(os.listdir(out)) | {"gpu_check.json"})
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(summary, f, indent=2)


for entry in os.environ["STAGES"].split():
    name, rc, seconds = entry.split(":")
    summary["stages"][name] = {"rc": rc, "seconds": int(seconds)}

# The last pytest summary line, e.g. "2 failed, 310 passed, 12 skipped in 95.1s".
try:
    with open(os.path.join(out, "pytest.log")) as f:
        lines = [ln.strip() for ln in f if re.search(r"\b(passed|failed|errors?|skipped|no tests ran)\b", ln)]
    tests = {"summary": lines[-1] if lines else None}
    for key in ("passed", "failed", "skipped", "error", "errors", "xfailed", "xpassed"):
        m = re.search(rf"(\d+) {key}\b", tests["summary"] or "")
        tests[key] = int(m.group(1)) if m else 0
    summary["tests"] = tests
except OSError as err:
    summary["tests"] = {"summary": None, "error": repr(err)}
write()  # first without anything that imports torch: this much survives a hung CUDA

try:
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    summary["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
except Exception as err:  # keep going: every field is optional but the file
    summary["nvidia_smi"] = repr(err)
try:
    import torch

    summary.update(torch=torch.__version__, cuda=torch.version.cuda)
    summary["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
except Exception as err:
    summary["torch_error"] = repr(err)
try:
    import triton

    summary["triton"] = triton.__version__
except Exception as err:
    summary["triton"] = f"not importable: {err!r}"
try:
    import bquant_kernels as bk

    summary["backends"] = {name: {"available": ok, "reason": why} for name, (ok, why) in bk.backends().items()}
except Exception as err:
    summary["backends"] = repr(err)
write()

# Device-to-device copy bandwidth: 1 GiB copied, read + write bytes counted, median of 10.
try:
    n = 2**30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    median = sorted(times)[len(times) // 2]
    summary["d2d_copy"] = {"bytes_copied": n, "median_s": median, "gbps_read_plus_write": 2 * n / median / 1e9}
except Exception as err:
    summary["d2d_copy"] = {"error": repr(err)}
write()
print(json.dumps({k: summary.get(k) for k in ("device", "tests", "stages", "d2d_copy", "benchmarks")}, indent=2))
EOF
echo "[gpu_check] done in ${SECONDS}s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
