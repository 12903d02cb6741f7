#!/usr/bin/env bash
# The Triton kernels' GPU checks in one command, for a CUDA machine (benchmarks/RESULTS.md "Triton path"):
#
#     bash benchmarks/kernels/gpu_checks.sh [OUTDIR]      # default OUTDIR: gpu-checks
#
# 1. the compiled-kernel tests (`pytest -m triton_cuda`: fp32, fp16 and bf16 against the torch reference);
# 2. benchmark_exit_head_loss.py at the GPU shape (K=4, N=16384, D=4096, V=128256, bf16);
# 3. benchmark_exit_confidence.py at the GPU shape (B=4096 prefill and B=64 decode, D=4096, V=128256).
# Each part has its own time limit (seconds: TEST_S, LOSS_S, CONF_S) and writes its log to OUTDIR, so a
# part that fails or runs out of time leaves the others' figures. PYTHON names the interpreter (python3).
# TRITON_INTERPRET is unset here: the interpreter on CUDA tensors is not the compiled code path.
set -u
out=${1:-gpu-checks}
py=${PYTHON:-python3}
mkdir -p "$out"
unset TRITON_INTERPRET
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nproc
  $py -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/host.txt"
timeout "${TEST_S:-200}" $py -m pytest -q -p no:cacheprovider -m triton_cuda \
  tests/unit/test_kernels_exit_head_loss.py tests/unit/test_kernels_exit_confidence.py 2>&1 \
  | tee "$out/pytest_triton_cuda.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
timeout "${LOSS_S:-200}" $py benchmarks/kernels/benchmark_exit_head_loss.py --device cuda --repeats 5 \
  --rounds "${ROUNDS:-1}" --worker-timeout 150 2>&1 | tee "$out/exit_head_loss.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
timeout "${CONF_S:-150}" $py benchmarks/kernels/benchmark_exit_confidence.py --device cuda --repeats 10 \
  --rounds "${ROUNDS:-1}" --worker-timeout 100 2>&1 | tee "$out/exit_confidence.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
exit $status
