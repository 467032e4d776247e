#!/usr/bin/env bash
# The GPU check, in about 8 minutes, on a machine with a CUDA device and a Python that has a
# CUDA build of torch and Triton: GPU-marked tests, the kernel throughput benchmark, the
# end-to-end benchmark with --device cuda (then --device cpu on the same pair, if time is left),
# and train-mem under FSDP where the machine has two GPUs (tests/test_train_fsdp.py).
#
#   bash benchmarks/gpu_check.sh [DEST]     # from anywhere; DEST: also copy the results there
#
# Figures land in benchmarks/results/ (kernel_throughput_cuda.*, extrapolate_e2e_cuda.*,
# extrapolate_e2e_cpu_gpuhost.*) with a log, kernel_gpu_check.log. Each step has its own time
# limit, so one slow step cannot eat the others; the exit status is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEST=${1:-}
RESULTS=benchmarks/results
LOG=$RESULTS/kernel_gpu_check.log
export PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
: >"$LOG"
status=0

step() {  # step SECONDS NAME COMMAND...: run with a time limit, log it, remember a failure
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

step 30 machine bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, \
torch.version.cuda, triton.__version__, torch.cuda.get_device_name(0))'"
step 90 install "$PY" -m pip install -q --no-deps --no-build-isolation -e .
# only the modules that hold GPU tests: a module needing a package this machine lacks must not
# stop them from being collected
mapfile -t gpu_tests < <(grep -l "mark.gpu" tests/test_*.py)
step 120 gpu-tests "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider "${gpu_tests[@]}"
# train-mem under FSDP (two processes, NCCL): runs where two GPUs exist, skips otherwise
step 300 fsdp "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_train_fsdp.py
step 120 kernel-throughput "$PY" benchmarks/kernel_throughput.py --device cuda
step 150 e2e-cuda "$PY" benchmarks/extrapolate_e2e.py --device cuda --params 1B \
    --tools floor,moxkit --no-double --repeats 2 --stem extrapolate_e2e_cuda
step 60 e2e-cpu "$PY" benchmarks/extrapolate_e2e.py --device cpu --params 1B \
    --tools moxkit --no-double --repeats 1 --stem extrapolate_e2e_cpu_gpuhost

if [ -n "$DEST" ]; then
    mkdir -p "$DEST"
    cp "$LOG" "$RESULTS"/kernel_throughput_cuda.* "$RESULTS"/extrapolate_e2e_cuda.* \
        "$RESULTS"/extrapolate_e2e_cpu_gpuhost.json "$DEST"/ 2>/dev/null
fi
echo "gpu_check: exit $status" | tee -a "$LOG"
exit "$status"
