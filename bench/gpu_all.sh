#!/usr/bin/env bash
# Both GPU scripts in one device call, within 8 minutes: bench/gpu_train.sh (wheelhouse
# install, Multi30k through train.py, test2016 BLEU; at most 300 s) then bench/gpu.sh
# (matmul peaks, ours vs torch.nn.Transformer, the MFU levers; the rest of the 480 s). Each
# writes its JSON after every section, so a cut run keeps what it measured.
#
#   bash bench/gpu_all.sh              # on the GPU, with .wheels/ carried
#   bash bench/gpu_all.sh --smoke      # tiny sizes on any machine
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
TOTAL_S="${GPU_ALL_BUDGET_S:-470}"
GPU_TRAIN_BUDGET_S="${GPU_TRAIN_BUDGET_S:-300}" bash bench/gpu_train.sh "$@"
echo "gpu_train.sh: exit $?"
left=$((TOTAL_S - ($(date +%s) - start)))
if ((left < 60)); then
  echo "no time left for bench/gpu.sh ($left s)"; exit 0
fi
# gpu.sh starts no section after its --budget_s; its own timeout is 480 s, ours is what is left.
timeout "$left" bash bench/gpu.sh --budget_s $((left - 60)) "$@"
echo "gpu.sh: exit $?"
