#!/usr/bin/env bash
# train.py end to end on a lent GPU (no network): install what the image lacks from the
# wheelhouse .wheels/ (built here by bench/gpu_wheels.sh), then train Multi30k with
# configs/multi30k_gpu.py, translate test2016 and score it (bench/gpu_train.py). Writes
# bench/results/gpu_train_<gpu>.json after every section.
#
#   bash bench/gpu_train.sh            # on the GPU (about 7 minutes; training 5)
#   bash bench/gpu_train.sh --smoke    # tiny model on any machine (checks the whole path)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
BUDGET_S="${GPU_TRAIN_BUDGET_S:-420}"

"$PYTHON" -c 'import platform, sys; print("python", platform.python_version(), "glibc", "-".join(platform.libc_ver()), "on", sys.executable)'
# Dependencies the GPU image lacks; jax/jaxlib/flax/optax/orbax/torch are never reinstalled.
missing=()
for mod in tensorflow_datasets grain array_record ml_collections num2words tensorboardX absl \
    flatbuffers; do
  "$PYTHON" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
if ((${#missing[@]})); then
  echo "missing: ${missing[*]}"
  if [[ ! -d .wheels ]]; then
    echo "no .wheels/ folder: run 'bash bench/gpu_wheels.sh' on a machine with network" >&2
    exit 2
  fi
  # --no-index: only the wheelhouse; what the image has already (jax, jaxlib, numpy, ...)
  # satisfies the requirements and is left as it is.
  # tensorflow-datasets without pyarrow (never imported here; not in the wheelhouse).
  "$PYTHON" -m pip install --no-index --find-links .wheels \
    grain array-record ml-collections num2words tensorboardX absl-py dm-tree \
    "etils[edc,enp,epath,epy,etree]" immutabledict promise protobuf psutil requests \
    simple-parsing tensorflow-metadata termcolor toml tqdm wrapt flatbuffers
  "$PYTHON" -m pip install --no-index --find-links .wheels --no-deps tensorflow-datasets
fi

if command -v nvidia-smi >/dev/null; then
  gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '_')"
else
  gpu="nogpu"
fi
smoke=""
for a in "$@"; do [[ "$a" == "--smoke" ]] && smoke="_smoke"; done
out="${GPU_TRAIN_OUT:-bench/results/gpu_train_${gpu}${smoke}.json}"
workdir="$(mktemp -d)/run"
timeout "$BUDGET_S" "$PYTHON" bench/gpu_train.py --out "$out" --workdir "$workdir" "$@"
echo "wrote $out"
