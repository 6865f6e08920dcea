#!/usr/bin/env bash
# Both GPU scripts in one device call, within 8 minutes: bench/gpu_train.sh (wheelhouse
# install, Multi30k through train.py, test2016 BLEU; at most 330 s) then bench/gpu.sh
# (matmul peaks, the MFU levers, ours vs torch.nn.Transformer; the rest of 470 s). Each
# writes its JSON after every section, so a cut run keeps what it measured.
#
#   bash bench/gpu_all.sh              # on the GPU, with .wheels/ carried
#   bash bench/gpu_all.sh --smoke      # tiny sizes on any machine
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
TOTAL_S="${GPU_ALL_BUDGET_S:-470}"
train_args=("$@")
# 3.5 minutes of training leave time for the final test2016 evaluation, the synthetic step
# and the translation inside 330 s (bench/gpu_train.sh alone trains the config's 5 minutes).
[[ " $* " == *" --smoke "* ]] || train_args+=("--config.max_train_minutes=3.5")
GPU_TRAIN_BUDGET_S="${GPU_TRAIN_BUDGET_S:-330}" bash bench/gpu_train.sh "${train_args[@]}"
echo "gpu_train.sh: exit $?"
left=$((TOTAL_S - ($(date +%s) - start)))
if ((left < 60)); then
  echo "no time left for bench/gpu.sh ($left s)"; exit 0
fi
# gpu.sh starts no section after its --budget_s; its own timeout is 480 s, ours is what is left.
# The levers first (the new rows), then ours vs torch.nn.Transformer while time is left.
timeout "$left" bash bench/gpu.sh --budget_s $((left - 60)) --sections peak,levers,train "$@"
echo "gpu.sh: exit $?"
