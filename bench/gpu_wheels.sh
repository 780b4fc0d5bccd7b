#!/usr/bin/env bash
# Wheels that bench/gpu_check.sh needs on a GPU machine with no network (Python 3.12, torch,
# transformers, tokenizers, typer, rich, safetensors, pyyaml, numpy already there): zarr and
# what it needs. Run here, with network, before sending the repository: they land in .whl/
# (git-ignored), and gpu_check.sh installs them into /tmp/site when .whl/ exists.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for spec in zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.7.1; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$spec"
done
ls -l .whl
