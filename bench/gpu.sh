#!/usr/bin/env bash
# GPU benchmark in one go (about 5-8 minutes on one H100/H200): ours vs torch.nn.Transformer,
# fp32/TF32 and bf16, base and big at ~25k tokens per side, matmul peaks and MFU, attention
# xla vs chunked vs cuDNN, cached decoding. Needs jax (CUDA), flax, optax, numpy and torch;
# no network, no dataset. Writes bench/results/gpu_<gpu>_<time>.json and prints the rows.
#
#   bash bench/gpu.sh            # the full run on a GPU
#   bash bench/gpu.sh --smoke    # tiny sizes on any device, seconds (checks the script)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # jax and torch share the GPU in one process
PYTHON="${PYTHON:-python}"

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '_')"
else
  gpu="nogpu"
fi
out="bench/results/gpu_${gpu}_$(date -u +%Y%m%dT%H%M%SZ).json"
# 480 s hard limit; the script itself stops starting sections after --budget_s (420 s).
timeout 480 "$PYTHON" bench/gpu_bench.py --out "$out" "$@"
