#!/usr/bin/env bash
# The GPU checks in one run (a lent device machine: one command, ~10 minutes): the test suite on CUDA (the Triton
# kernel tests on CUDA tensors, compiled for real: tests/flab_kernels/conftest.py; the engine against HF generate), the Triton kernel timings, and the engine benchmark on the
# Llama-3.2-1B and Qwen3-0.6B shapes (random weights, built on the machine). Every stage has its own time limit,
# so one that hangs costs only its share. Logs, markdown tables and JSON land in $OUT (default gpu_out/).
#
#   bash tests/gpu_check.sh            # everything
#   STAGES="tests kernels" bash tests/gpu_check.sh
#
# Needs no network and no pip: the UI tests (gradio, plotly) are left out, everything else uses packages that
# machine's image has (torch, transformers, triton, psutil, pytest, hypothesis).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
STAGES=${STAGES:-"env tests kernels bench"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0

stage() {  # stage NAME SECONDS COMMAND...: run when NAME is in $STAGES, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  [[ " $STAGES " == *" $name "* ]] || return 0
  echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - start)) s"
  [[ $rc == 0 ]] || status=1
}

stage env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__,
  triton.__version__, torch.cuda.get_device_name())"'
stage tests 300 python3 -m pytest -q -p no:cacheprovider tests --ignore=tests/ui --timeout=120
stage kernels 120 python3 -m flab_kernels.bench --json "$OUT/kernels.json"
for model in llama-3.2-1b qwen3-0.6b; do
  stage bench 240 python3 -m backend.tools.bench --model "tiny:$model" --device cuda --num-requests 64 \
    --workloads throughput latency shared_prefix --json "$OUT/bench_$model.json"
  [[ -f "$OUT/bench.log" ]] && mv "$OUT/bench.log" "$OUT/bench_$model.log"
done
exit $status
