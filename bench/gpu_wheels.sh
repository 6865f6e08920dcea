#!/usr/bin/env bash
# Build the wheelhouse .wheels/ (git-ignored) that bench/gpu_train.sh installs from on a GPU
# machine without network: the dependencies its image lacks, as binary wheels for CPython
# 3.11-3.13 on manylinux_2_28 x86_64 (glibc >= 2.28). jax, jaxlib, flax, optax, orbax, numpy,
# torch, sentencepiece and sacrebleu come with the image and are not downloaded, nor is
# pyarrow (53 MB; tensorflow-datasets lists it but the project never imports it, so
# gpu_train.sh installs tensorflow-datasets with --no-deps). One Python version is ~20 MB:
# carry only the device's (check it first, e.g. `python -V` on the device).
#
#   bash bench/gpu_wheels.sh              # all three Python versions
#   bash bench/gpu_wheels.sh 3.12         # one
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
PACKAGES=(tensorflow-datasets grain array-record ml-collections num2words tensorboardX absl-py
          flatbuffers)
# Their own dependencies that the GPU image may lack; over there pip takes from the wheelhouse
# only what is not installed already (it never upgrades the image's packages).
EXTRA=(dm-tree etils simple-parsing termcolor toml tqdm wrapt immutabledict psutil
       requests protobuf cloudpickle more-itertools typing-extensions importlib-resources
       zipp fsspec attrs einops tensorflow-metadata googleapis-common-protos docstring-parser
       urllib3 idna charset-normalizer certifi six)
versions=("$@")
((${#versions[@]})) || versions=(3.11 3.12 3.13)
mkdir -p .wheels
for v in "${versions[@]}"; do
  "$PYTHON" -m pip download --only-binary=:all: --python-version "$v" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any --no-deps -d .wheels \
    "${PACKAGES[@]}" "${EXTRA[@]}"
done
# num2words needs docopt and tensorflow-datasets promise, published only as source archives:
# build their (pure Python) wheels here.
"$PYTHON" -m pip wheel --no-deps -w .wheels docopt promise
du -sh .wheels
