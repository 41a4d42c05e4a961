#!/usr/bin/env bash
# One prepared check of the CUDA paths, under 8 minutes on an H100/H200, writing BENCHMARKS.md sections:
#   1. Stage-1 training throughput of r50, fp32 vs AMP (bf16 / fp16 + scaler), channels_last
#   2. extraction throughput (8 views, AMP, pinned loader) as a ratio to the bare backbone forward
#   3. cRT of one head and the 27-point ablation grid on a WBCBench-sized synthetic cache
# Uses .venv when present, else the machine's python3 (its torch must see CUDA). No network needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WBC_NO_PROGRESS=1
$PY - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA GPU"
print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY
echo "== 1/3 Stage-1 r50 training throughput, fp32 vs AMP"
timeout 150 $PY tools/bench_stage1.py --throughput r50 --device cuda --steps 20
echo "== 2/3 extraction vs bare forward (lite0, 224 px, 8 views)"
timeout 150 $PY tools/bench_extract.py --device cuda --backbone tf_efficientnet_lite0 --section extract-gpu
echo "== 3/3 cRT and the 27-point grid on a 38,535 x 8 x 2048 synthetic cache"
timeout 150 $PY tools/bench_crt.py --skip-sequential
echo "done: see BENCHMARKS.md"
